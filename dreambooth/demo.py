"""`python -m dreambooth demo`: the whole flow on a built-in tiny model, about a minute on a CPU.

A tiny random v1 checkpoint is written, a model is created from it, four instance images (drawn shapes) are made,
class images are generated with the base model (prior preservation), the model trains for a few epochs with
previews and scheduled saves, and the final checkpoint is exported. The weights are random, so the pictures are
noise-like: the demo shows the machinery, not image quality.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from .errors import UserError
from .store import DataRoot

DEMO_NAME = "demo"


def draw_instance_images(folder: Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Coloured shapes on plain backgrounds, each with a caption file beside it."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shapes = ("circle", "square", "triangle", "ring")
    for i in range(count):
        colour = tuple(rng.randrange(60, 256) for _ in range(3))
        img = Image.new("RGB", (size, size), tuple(rng.randrange(0, 80) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        shape = shapes[i % len(shapes)]
        a, b = size // 5, size - size // 5
        if shape == "circle":
            draw.ellipse((a, a, b, b), fill=colour)
        elif shape == "square":
            draw.rectangle((a, a, b, b), fill=colour)
        elif shape == "triangle":
            draw.polygon([(size // 2, a), (a, b), (b, b)], fill=colour)
        else:
            draw.ellipse((a, a, b, b), outline=colour, width=size // 10)
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a toy {shape} on a dark background\n", encoding="utf-8")
    return folder


def demo_config(instance_dir: Path, resolution: int) -> dict:
    return {
        "concepts": [{
            "instance_data_dir": str(instance_dir), "instance_prompt": "[filewords]", "instance_token": "zwx",
            "class_token": "toy", "class_prompt": "[filewords]", "num_class_images_per_image": 1,
            "class_infer_steps": 4, "class_guidance_scale": 5.0,
            "sample_prompt": "a zwx toy on a dark background", "num_samples": 1, "sample_infer_steps": 6,
            "sample_guidance_scale": 5.0,
        }],
        "parameters": {
            "resolution": resolution, "num_train_epochs": 4, "train_batch_size": 2, "learning_rate": 1e-4,
            "text_encoder_learning_rate": 5e-5, "lr_warmup_steps": 2, "optimizer": "adamw",
            "mixed_precision": "no", "sample_every_n_epochs": 2, "save_every_n_epochs": 2, "save_half": True,
            "use_ema": True, "offset_noise": 0.05, "min_snr_gamma": 5.0,
        },
    }


def run_demo(root: DataRoot) -> int:
    """The demo in `root`, the data root the tab and the CLI use by default (./data), so that its model shows there.
    A model named "demo" that the demo did not make is the user's: refused, never replaced."""
    from .checkpoint.tiny import write_tiny_checkpoint
    from .config import Config
    from .models import create_model, load_config
    from .train import train_model

    import torch

    started = time.time()
    # The demo model is tiny: starting threads costs more than the work, and several threads fight over a busy CPU.
    torch.set_num_threads(1)
    root = root.ensure()
    demo_dir = root.root / "demo-inputs"
    source_path = demo_dir / "tiny-v1.safetensors"
    existing = root.model(DEMO_NAME)
    if existing.exists() and load_config(existing).model.source != str(source_path.resolve()):
        raise UserError(f"a model named {DEMO_NAME!r} already exists in {root.dreambooth} and the demo did not make "
                        f"it; run the demo with --root set to another folder (or delete that model)")
    print(f"demo: data root {root.root}")
    source = write_tiny_checkpoint("v1", source_path, seed=0)
    print(f"demo: wrote the tiny v1 checkpoint {source}")
    model = create_model(root, DEMO_NAME, str(source), family="v1", overwrite=True)
    instance_dir = draw_instance_images(demo_dir / "instance")
    print(f"demo: created model {model.path}; instance images in {instance_dir}")
    config = Config.load(model.config_path).to_dict()
    wanted = demo_config(instance_dir, resolution=64)
    config["concepts"] = wanted["concepts"]
    config["parameters"].update(wanted["parameters"])
    Config.from_dict(config).save(model.config_path)

    result = train_model(root, DEMO_NAME)
    print(result.summary())
    if not result.ok:
        return 1
    print(f"demo: class images in {model.class_images}")
    print(f"demo: previews in {model.samples} ({len(result.samples)} images)")
    for path in result.checkpoints:
        print(f"demo: checkpoint {path}")
    print(f"demo: finished in {time.time() - started:.0f} s")
    return 0
