"""Helpers for the trainer tests: tiny diffusers modules, tiny created models, instance images.

Imported by the tests as `train_helpers` (conftest.py puts this folder on sys.path; pytest runs in importlib mode)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_unet(cross_attention_dim=16, sdxl=False, seed=0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=4 * 6 + 12)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4, **extra)


def tiny_text_encoder(hidden=16, projection=None, seed=1):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def draw_images(folder: Path, count: int = 4, size=(64, 64), seed: int = 0) -> Path:
    """Coloured shapes on a background: distinct, deterministic instance images."""
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        w, h = size
        box = [rng.randrange(w // 2), rng.randrange(h // 2), w // 2 + rng.randrange(w // 2), h // 2 + rng.randrange(h // 2)]
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"a red dog on grass ({i}).png")
    return folder


def make_model(root_path: Path, source: Path, name: str = "m", concepts=None, family: str = "v1", **parameters):
    """Create a model from `source` and write its config with tiny-friendly parameters."""
    from dreambooth.config import Config
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    root = DataRoot(root_path).ensure()
    model = create_model(root, name, str(source), family=family)
    if concepts is None:
        concepts = [{"instance_data_dir": str(draw_images(root_path / "instance")), "instance_token": "zwx",
                     "class_token": "dog", "num_samples": 0}]
    base = dict(resolution=64, num_train_epochs=1, optimizer="adamw", mixed_precision="no", save_every_n_epochs=0,
                sample_every_n_epochs=0, learning_rate=1e-3, text_encoder_learning_rate=1e-3, lr_scheduler="constant",
                save_half=False)
    base.update(parameters)
    data = Config.load(model.config_path).to_dict()
    data["concepts"] = concepts
    data["parameters"].update(base)
    Config.from_dict(data).save(model.config_path)
    return root, model


def read_events(model) -> list[dict]:
    path = model.path / "logs" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kinds(model) -> list[str]:
    return [e["kind"] for e in read_events(model)]


def wait_for(model, kind: str, timeout: float = 300, **fields) -> dict:
    """The first event of `kind` (with these field values) that the running training wrote."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in read_events(model):
            if event["kind"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event {fields or ''} within {timeout} s: {kinds(model)}")


def reset_accelerate() -> None:
    """accelerate keeps process-wide state (precision, accumulation): forget it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict:
    """The environment of a trainer started as its own process: offline, one thread, this checkout's package."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_cmd(root: Path, name: str = "m") -> list[str]:
    import sys

    return [sys.executable, "-m", "dreambooth", "--root", str(root), "train", name]


def kill_after_checkpoint(root, model, step: int) -> int:
    """Train `model` in its own process, SIGKILL it once a checkpoint of at least `step` is written; returns the
    last saved step."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(train_cmd(root.root, model.name), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not any(e["kind"] == "checkpoint" and e["step"] >= step for e in read_events(model)):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before that save"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return max(e["step"] for e in read_events(model) if e["kind"] == "checkpoint")


def decide_as_gpu(monkeypatch, bf16: bool) -> None:
    """Make every dtype and precision decision of a run as on a CUDA GPU (with bf16 or without) while the tensors
    stay on the CPU: precision.detect answers for a GPU, and the accelerator does for fp16 what accelerate does on
    CUDA (autocast and a GradScaler; accelerate leaves both off for a CPU device)."""
    import torch

    from dreambooth.train import loop, precision

    monkeypatch.setattr(precision, "detect", lambda device: precision.Hardware(gpu=True, bf16=bf16))
    make = loop.make_accelerator

    def make_as_on_gpu(params, dtypes, hardware):
        acc = make(params, dtypes, hardware)
        if dtypes.mixed_precision == "fp16":
            acc.native_amp = True
            acc.scaler = torch.amp.GradScaler("cpu")
        return acc

    monkeypatch.setattr(loop, "make_accelerator", make_as_on_gpu)
