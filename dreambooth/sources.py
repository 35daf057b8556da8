"""Where a model comes from: the family shown before creating, and the starter kit a newcomer can click through."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .store import DataRoot, atomic_path
from .jobs import run_cli

TINY_CHECKPOINT = "dreambooth-tiny-v1.safetensors"
DEMO_IMAGES = "demo-images"


def detect_source_family(source: str) -> str:
    """A line of text naming the detected family of a source, read cheaply (file header or folder configs)."""
    from .checkpoint.detect import detect

    path = Path(source).expanduser()
    try:
        if path.is_dir() or (path.suffix.lower() == ".safetensors" and path.is_file()):
            return f"Detected family: {detect(path).family}"
        if path.is_file():
            return "The family of a .ckpt file is detected when the model is created."
        if path.suffix:
            return f"{source}: no such file."
        return "A hub id: the family is detected when the model is created."
    except (UserError, OSError, ValueError) as e:
        return f"Cannot detect the family: {e}"


def _draw_demo_images(folder: Path, count: int = 4, size: int = 64) -> None:
    """A few pictures of one 'subject' (a red disc with a yellow dot) on different backgrounds, with captions."""
    from PIL import Image, ImageDraw

    backgrounds = [(40, 90, 160), (60, 140, 70), (200, 200, 190), (90, 60, 120), (30, 30, 30), (230, 180, 120)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), backgrounds[i % len(backgrounds)])
        draw = ImageDraw.Draw(image)
        r = size // 4 + (i % 3) * 2
        cx, cy = size // 2 + (i - count // 2) * 3, size // 2 - (i % 2) * 4
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(210, 40, 40))
        draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=(250, 220, 40))
        target = folder / f"disc_{i}.png"
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        (folder / f"disc_{i}.txt").write_text("a red disc", encoding="utf-8")


def write_starter_kit(root: DataRoot) -> str:
    """The built-in tiny v1 checkpoint (into models/Stable-diffusion) and a folder of demo images."""
    root.ensure()
    checkpoint = root.checkpoints / TINY_CHECKPOINT
    if not checkpoint.is_file():
        run_cli(root, "tiny-checkpoint", "--family", "v1", "--out", str(checkpoint))
    images = root.root / DEMO_IMAGES
    if not any(images.glob("*.png")):
        _draw_demo_images(images)
    return (f"Wrote the tiny model {checkpoint.name} (pick it under 'From a checkpoint') and demo images in "
            f"{images} (use it as a concept's instance images folder).")


def is_starter(source: str) -> bool:
    return Path(str(source)).name == TINY_CHECKPOINT


def starter_config(root: DataRoot, config):
    """Settings for a model made from the built-in tiny model: a first run that ends in about a minute on a CPU (small
    resolution, few class and preview steps, full precision), with the demo images as its one concept."""
    from .config import Config

    data = config.to_dict()
    data["parameters"].update(resolution=64, mixed_precision="no", optimizer="adamw", learning_rate=1e-4,
                              num_train_epochs=6, save_every_n_epochs=3, sample_every_n_epochs=3)
    data["concepts"] = [{"instance_data_dir": str(root.root / DEMO_IMAGES), "instance_prompt": "[filewords]",
                         "instance_token": "zwx", "class_token": "disc", "class_prompt": "[filewords]",
                         "num_class_images_per_image": 1, "class_infer_steps": 10, "sample_prompt": "a zwx disc",
                         "sample_infer_steps": 10}]
    return Config.from_dict(data)
