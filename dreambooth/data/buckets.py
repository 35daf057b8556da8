"""Aspect-ratio buckets and the crop/resize/flip that puts an image into its bucket.

Buckets keep roughly resolution^2 pixels with sides in multiples of `step` (64 at SD resolutions, smaller for tiny
test models) and aspect ratios up to 2:1. Each image goes to the bucket closest to its own aspect ratio, is scaled
to cover it and cropped (centre or random). Without bucketing there is one square bucket.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

MAX_RATIO = 2.0


def bucket_step(resolution: int) -> int:
    return 64 if resolution >= 512 else max(16, (resolution // 8) // 16 * 16)


def make_buckets(resolution: int, bucketing: bool) -> list[tuple[int, int]]:
    """(width, height) pairs, square first."""
    if not bucketing:
        return [(resolution, resolution)]
    step = bucket_step(resolution)
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = resolution
    while True:
        width += step
        height = (area // width) // step * step
        if height < step or width / height > MAX_RATIO:
            break
        buckets.add((width, height))
        buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1])), wh))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int], crop: str, flip: bool, rng: random.Random):
    """Scale `img` to cover `bucket`, crop it, maybe mirror it. Returns (image, (crop_top, crop_left))."""
    w, h = bucket
    scale = max(w / img.width, h / img.height)
    new_size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new_size, Image.BICUBIC)
    if crop == "random":
        left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    else:
        left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img, (top, left)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) float in [0, 1] (white = 1)."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0).contiguous()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
