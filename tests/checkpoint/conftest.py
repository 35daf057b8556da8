"""Shared fixtures for the checkpoint tests: tiny models of each family, made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub: everything must work offline
sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside the tests (pytest runs in importlib mode)

FAMILIES = ("v1", "v2", "v2-v", "sdxl")


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict:
    """{family: path of a tiny .safetensors (yaml beside it)} written through the CLI verb's function."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_checkpoint(f, folder / f"{f}.safetensors", seed=1) for f in FAMILIES}


@pytest.fixture(scope="session")
def created(tiny_sources, tmp_path_factory) -> dict:
    """{family: (DataRoot, model name)} created from the tiny sources."""
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    root = DataRoot(tmp_path_factory.mktemp("root"))
    result = {}
    for f, path in tiny_sources.items():
        name = f"tiny-{f}"
        create_model(root, name, str(path))
        result[f] = (root, name)
    return result
