"""Fixtures for tests/train. Helpers live in train_helpers.py (put on sys.path here for importlib mode)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A tiny v1 checkpoint file (the tiny-checkpoint verb's writer), made once per session."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("source") / "tiny-v1.safetensors"
    return write_tiny_checkpoint("v1", out, seed=0)




@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (precision, accumulation); each test starts clean."""
    from train_helpers import reset_accelerate

    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: thread start-up costs more than the work, and on a busy 2-core box threads fight. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
