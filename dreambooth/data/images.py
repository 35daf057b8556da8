"""Finding and reading training images: whatever a user's folder holds becomes clean RGB, or a named warning."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError
from ..store import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.jpg: the image's loss mask (white = learn), never an image
# Larger images are shrunk on load: training never needs more than a few times the bucket size.
MAX_SIDE = 4096
# An images folder is searched this deep and this wide at most: a folder such as / or a home folder is refused with a
# message instead of being walked (a training set is tens to thousands of images).
MAX_DEPTH = 4
MAX_ENTRIES = 10_000
# Images this long and thin, or this large, are refused (named): a 1x20000 strip costs seconds and hundreds of MB a
# step for nothing a model can learn; a 100-megapixel file takes most of a gigabyte to decode.
MAX_ASPECT = 8.0
MAX_PIXELS = 100_000_000
# What PIL raises on a damaged, truncated, odd or oversized image file.
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageWarning(UserWarning):
    """An image that was skipped; the message names the file and why."""


def find_images(folder: Path, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES) -> list[Path]:
    """Images under `folder`, searched `max_depth` folders deep, in a stable order (hidden files and folders ignored).

    Only reads the folder. UserError when it holds more than `max_entries` files and folders (or cannot be listed)."""
    folder = Path(folder).expanduser()
    found, visited, seen = [], 0, set()
    todo = [(folder, 0)]
    while todo:
        current, depth = todo.pop()
        try:
            identity = (os.stat(current).st_dev, os.stat(current).st_ino)
        except OSError:
            identity = None
        if identity is not None:
            if identity in seen:  # a linked folder seen before (a link loop): its images are already found
                continue
            seen.add(identity)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    visited += 1
                    if visited > max_entries:
                        raise UserError(f"{str(folder)!r}: more than {max_entries} files and folders; choose the "
                                        "folder that holds only the training images")
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir():
                            if depth < max_depth:
                                todo.append((Path(entry.path), depth + 1))
                        elif (entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
                              and not entry.name.lower().endswith(MASK_SUFFIX)):
                            found.append(Path(entry.path))
                    except OSError:
                        continue  # a dangling link or an entry that vanished: not an image
        except OSError as e:
            if current == folder:
                raise UserError(f"{str(folder)!r}: cannot be read ({e.strerror or type(e).__name__})") from e
            warnings.warn(f"skipping folder {current}: cannot be read ({e.strerror or type(e).__name__})",
                          ImageWarning, stacklevel=2)
    unique = {}
    for path in found:  # the same file reached through links counts once
        try:
            unique.setdefault(os.path.realpath(path), path)
        except (OSError, ValueError):
            continue
    return sorted(unique.values())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) greyscale: scale to 8 bits instead of letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, not black: what a viewer shows and what captions describe.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, ...


def load_image(path: Path, max_side: int = MAX_SIDE) -> Image.Image:
    """Read an image as upright 8-bit RGB. Raises OSError (or ValueError) for unreadable files."""
    with Image.open(path) as img:
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size when the file is huge
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    return img


def mask_file(image: Path) -> Path:
    return Path(image).with_name(Path(image).stem + MASK_SUFFIX)


def load_mask(image: Path, max_side: int = MAX_SIDE) -> Image.Image | None:
    """The loss mask of an image as 8-bit greyscale at the size `load_image` gives the image (white = learn): its
    NAME.mask.png, else its alpha channel, else None. A mask that cannot be read, has another size than its image
    or is all black is a UserError naming the file."""
    image = Path(image)
    with Image.open(image) as img:
        upright = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
        size = upright.size
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
        alpha = upright.convert("RGBA").getchannel("A") if has_alpha and not mask_file(image).exists() else None
    path = mask_file(image)
    if path.exists():
        try:
            with Image.open(path) as m:
                m.load()
                mask = ImageOps.exif_transpose(m).convert("L")
        except UNREADABLE_IMAGE as e:
            raise UserError(f"mask {path}: not a readable image ({e})") from None
        if mask.size != size:
            raise UserError(f"mask {path}: {mask.size[0]}x{mask.size[1]} pixels, but its image {image.name} is "
                            f"{size[0]}x{size[1]}; make it the same size")
    elif alpha is not None:
        mask, path = alpha, image
    else:
        return None
    if mask.getextrema()[1] == 0:
        raise UserError(f"mask {path}: is all black (nothing to learn); paint white where the subject is")
    if max(mask.size) > max_side:
        mask.thumbnail((max_side, max_side), Image.BILINEAR)
    return mask


def readable_images(paths: list[Path], max_side: int = MAX_SIDE) -> list[Path]:
    """The paths that open as images; each one that does not is named in a warning."""
    good = []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                raise OSError("empty file")
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ValueError(f"{width}x{height} pixels, more than {MAX_PIXELS // 1_000_000} megapixels; "
                                     "shrink it")
                if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
                    raise ValueError(f"{width}x{height} pixels: one side more than {MAX_ASPECT:g} times the other; "
                                     "crop it")
                img.load()  # decodes everything: truncated files fail here
            good.append(path)
        except UNREADABLE_IMAGE as e:
            warnings.warn(f"skipping {path}: not a usable image ({e})", ImageWarning, stacklevel=2)
    return good


def png_parameters(prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int, width: int,
                   height: int, extra: dict | None = None) -> str:
    """The webui's "parameters" PNG text: prompt, negative prompt, then one line of settings."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    settings = {"Steps": steps, "Sampler": "DDIM", "CFG scale": guidance_scale, "Seed": seed,
                "Size": f"{width}x{height}", **(extra or {})}
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def save_png(image, path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
