"""Fixtures for the LoRA tests: tiny created models of v1, v2 and SDXL (UNet depth of the real models: 2 res blocks
a level, which the webui's name conversion for SD1/SD2 assumes), made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # lora_helpers, webui_reader (pytest runs in importlib mode)

LORA_FAMILIES = ("v1", "v2", "sdxl")


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory) -> dict:
    """{family: (DataRoot, model name)}: tiny models created from tiny single files through the CLI's functions."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    folder = tmp_path_factory.mktemp("lora-sources")
    root = DataRoot(tmp_path_factory.mktemp("lora-root")).ensure()
    result = {}
    for fam in LORA_FAMILIES:
        source = write_tiny_checkpoint(fam, folder / f"{fam}.safetensors", seed=3, unet_layers_per_block=2)
        create_model(root, f"lora-{fam}", str(source))
        result[fam] = (root, f"lora-{fam}")
    return result


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
