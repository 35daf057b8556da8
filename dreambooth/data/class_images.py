"""Class images for prior preservation: a user's folder as is, or generated once and reused.

Generated images live in <model>/class_images/<prompt-slug>-<hash>/ with the prompt in a .txt beside each image
(and in the PNG info). Next time, images whose prompt is still wanted are reused and only the missing ones are made.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..store import read_bytes
from . import captions
from .images import find_images, readable_images

MAX_PROMPT_BYTES = 100_000  # a class image's prompt is a line


def class_folder(base: Path, concept) -> Path:
    key = f"{concept.class_prompt}\n{concept.class_negative_prompt}\n{concept.class_guidance_scale}\n{concept.class_infer_steps}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", concept.class_prompt).strip("_")[:40] or "class"
    return Path(base) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def wanted_prompts(concept, instance_examples) -> list[str]:
    """One class prompt per class image needed: num_class_images_per_image for each instance image."""
    prompts = []
    for example in instance_examples:
        caption = captions.caption_of(example.path)
        prompt = captions.class_prompt(concept.class_prompt, caption, concept.instance_token)
        prompts.extend([prompt] * concept.num_class_images_per_image)
    return prompts


def user_class_images(concept) -> list[tuple[Path, str]]:
    folder = Path(concept.class_data_dir).expanduser()
    pairs = []
    for path in readable_images(find_images(folder)):
        caption = captions.caption_of(path)
        pairs.append((path, captions.class_prompt(concept.class_prompt, caption, concept.instance_token)))
    return pairs


def existing_class_images(folder: Path) -> list[tuple[Path, str]]:
    pairs = []
    if folder.is_dir():
        for path in readable_images(find_images(folder)):
            txt = path.with_suffix(".txt")
            if txt.is_file():
                try:
                    prompt = read_bytes(txt, limit=MAX_PROMPT_BYTES).decode("utf-8", errors="replace").strip()
                except UserError:
                    continue  # an unreadable prompt file: the image is made again
                pairs.append((path, prompt))
    return pairs


def plan_class_images(folder: Path, prompts: list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(existing images to reuse, prompts still to generate)."""
    wanted = Counter(prompts)
    reuse = []
    for path, prompt in existing_class_images(folder):
        if wanted[prompt] > 0:
            wanted[prompt] -= 1
            reuse.append((path, prompt))
    missing = []
    for prompt in prompts:  # what reuse did not cover, in the order wanted
        if wanted[prompt] > 0:
            wanted[prompt] -= 1
            missing.append(prompt)
    return reuse, missing


def generate_missing(folder: Path, missing: list[str], make_images: Callable[[list[str], list[int]], list],
                     parameters: Callable[[str, int], str], progress: Callable[[int, int], None],
                     batch_size: int = 1) -> list[tuple[Path, str]]:
    """Generate one image per prompt in `missing` and store it with its prompt, `batch_size` prompts per call of
    `make_images(prompts, numbers)` (the last batch may be smaller). Each image is numbered by the first free
    five-digit file name and seeded by that number, so the batch size does not change what is made."""
    from ..store import atomic_write_text
    from .images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    taken = {p.stem for p in folder.iterdir()}
    made = []
    number = 0
    for start in range(0, len(missing), max(1, batch_size)):
        prompts = missing[start:start + max(1, batch_size)]
        numbers = []
        for _ in prompts:
            while f"{number:05d}" in taken:
                number += 1
            taken.add(f"{number:05d}")
            numbers.append(number)
        images = make_images(prompts, numbers)
        for prompt, image_number, image in zip(prompts, numbers, images, strict=True):
            path = folder / f"{image_number:05d}.png"
            # The prompt file first: an image without its .txt is never reused, so a kill between the two is harmless.
            atomic_write_text(path.with_suffix(".txt"), prompt + "\n")
            save_png(image, path, parameters(prompt, image_number))
            made.append((path, prompt))
            progress(len(made), len(missing))
    return made
