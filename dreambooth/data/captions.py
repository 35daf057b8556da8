"""Captions and prompts: the caption of an image and how `[filewords]` becomes a training prompt.

The caption comes from a .txt file beside the image, else from the file name ("a dog on grass (2).jpg" ->
"a dog on grass"). In a prompt, `[filewords]` is replaced by the caption. For instance prompts the instance token is
put before the class token the way the seed extension does it ("a dog on grass" -> "a zwx dog on grass"); when the
caption lacks the class token, "zwx dog, " is put in front. For class prompts the instance token is taken out.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

FILEWORDS = "[filewords]"
MAX_CAPTION_BYTES = 100_000  # a caption is a line or two; more is not a caption


def augmented(prompt: str, params, rng) -> str:
    """An instance prompt as one step trains it: with probability caption_dropout the empty prompt; else its
    comma-separated parts after the first keep_tokens each left out with probability tag_dropout, then shuffled when
    shuffle_tags is on. `rng` (a random.Random seeded per image and epoch) makes it the same on a resumed run."""
    if params.caption_dropout > 0 and rng.random() < params.caption_dropout:
        return ""
    if not params.shuffle_tags and params.tag_dropout <= 0:
        return prompt
    tags = [t.strip() for t in prompt.split(",")]
    kept, rest = tags[:params.keep_tokens], tags[params.keep_tokens:]
    if params.tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= params.tag_dropout]
    if params.shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(t for t in kept + rest if t)


def varies(params) -> bool:
    """Whether instance prompts change from step to step (then their text embeddings are not cached)."""
    return params.caption_dropout > 0 or params.shuffle_tags or params.tag_dropout > 0


class CaptionWarning(UserWarning):
    """A caption file that could not be used; the image's file name stands in. The message names the file."""


def caption_of(image: Path) -> str:
    txt = Path(image).with_suffix(".txt")
    if txt.is_file():
        try:
            with open(txt, "rb") as f:
                raw = f.read(MAX_CAPTION_BYTES + 1)
            if len(raw) > MAX_CAPTION_BYTES:
                raise ValueError(f"longer than {MAX_CAPTION_BYTES} bytes")
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            warnings.warn(f"caption {txt}: cannot be read ({reason}); using the file name instead",
                          CaptionWarning, stacklevel=2)
        else:
            text = raw.decode("utf-8", errors="replace").strip()
            if text:
                return " ".join(text.split())
    stem = Path(image).stem
    stem = re.sub(r"\(\d+\)$", "", stem)          # "name (2)" copies
    stem = re.sub(r"^\d+[-_ ]+", "", stem)        # "0001-name" numbering
    stem = stem.replace("_", " ").replace("-", " ")
    return " ".join(stem.split())


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w]){re.escape(word)}(?![\w])", re.IGNORECASE)


def insert_instance_token(caption: str, instance_token: str, class_token: str) -> str:
    if not instance_token or _word_pattern(instance_token).search(caption):
        return caption
    if class_token and _word_pattern(class_token).search(caption):
        return _word_pattern(class_token).sub(lambda m: f"{instance_token} {m.group(0)}", caption, count=1)
    prefix = f"{instance_token} {class_token}".strip()
    return f"{prefix}, {caption}" if caption else prefix


def remove_instance_token(caption: str, instance_token: str) -> str:
    if not instance_token:
        return caption
    return " ".join(_word_pattern(instance_token).sub("", caption).split()).strip(" ,")


def instance_prompt(template: str, caption: str, instance_token: str, class_token: str) -> str:
    if FILEWORDS not in template:
        return template
    return " ".join(template.replace(FILEWORDS, insert_instance_token(caption, instance_token, class_token)).split())


def class_prompt(template: str, caption: str, instance_token: str) -> str:
    if FILEWORDS not in template:
        return template
    return " ".join(template.replace(FILEWORDS, remove_instance_token(caption, instance_token)).split())
