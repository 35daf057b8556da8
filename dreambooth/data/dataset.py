"""The training examples of a config and the order they are trained in.

An epoch is one pass over every instance image. Instance images are grouped by aspect bucket, shuffled (seeded by
the run's seed and the epoch, so a resumed run sees the same order), and cut into batches of `train_batch_size`.
Each instance example of a concept with prior preservation is paired with one of that concept's class images, put
into the same bucket, so one batch holds both (the paper's joint loss). Under several processes each takes every
N-th batch; the list is padded (wrapping round) so every process gets the same whole number of optimizer steps.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..config import Config
from ..errors import UserError
from . import captions
from .buckets import fit_to_bucket, make_buckets, mask_to_tensor, nearest_bucket, to_tensor
from .images import find_images, load_image, load_mask, readable_images


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    concept: int
    size: tuple[int, int]  # (width, height) as loaded


@dataclass(frozen=True)
class Item:
    """One row of a batch: an instance example and the bucket it is trained in, or a class example put there."""
    example: Example
    bucket: tuple[int, int]
    is_prior: bool


def _image_size(path: Path) -> tuple[int, int]:
    return load_image(path).size


def collect_instances(config: Config) -> list[list[Example]]:
    """Instance examples per active concept (same order as config.active_concepts)."""
    result = []
    for index, concept in enumerate(config.concepts):
        if not concept.instance_data_dir.strip():
            continue
        folder = Path(concept.instance_data_dir).expanduser()
        label = f"concepts[{index}].instance_data_dir"
        if not folder.is_dir():
            raise UserError(f"{label}: {str(folder)!r} is not a folder")
        paths = find_images(folder)
        if not paths:
            raise UserError(f"{label}: {str(folder)!r} has no png, jpg or webp images")
        paths = readable_images(paths)
        if not paths:
            raise UserError(f"{label}: none of the images in {str(folder)!r} can be read (see the warnings above)")
        examples = []
        for path in paths:
            if config.parameters.masked_loss:
                load_mask(path)  # a bad mask is named before any model loads
            caption = captions.caption_of(path)
            prompt = captions.instance_prompt(concept.instance_prompt, caption, concept.instance_token, concept.class_token)
            examples.append(Example(path, prompt, index, _image_size(path)))
        result.append(examples)
    return result


def split_validation(config: Config, instances: list[list[Example]]) -> tuple[list[list[Example]], list[Example]]:
    """(the instance examples to train on, the validation examples), when validation is on: each concept's
    validation folder; else `validation_holdout` of its instance images, chosen by the run's seed (at least one stays
    to train on); with neither, the training images themselves (their loss at fixed noise). Off: nothing held out."""
    p = config.parameters
    if p.validation_every_n_steps <= 0:
        return instances, []
    train, validation = [], []
    for examples in instances:
        concept = config.concepts[examples[0].concept]
        folder = Path(concept.validation_data_dir).expanduser() if concept.validation_data_dir.strip() else None
        if folder is not None:
            label = f"concepts[{examples[0].concept}].validation_data_dir"
            if not folder.is_dir():
                raise UserError(f"{label}: {str(folder)!r} is not a folder")
            paths = readable_images(find_images(folder))
            if not paths:
                raise UserError(f"{label}: {str(folder)!r} has no readable png, jpg or webp images")
            validation += [Example(path, captions.instance_prompt(concept.instance_prompt, captions.caption_of(path),
                                                                  concept.instance_token, concept.class_token),
                                   examples[0].concept, _image_size(path)) for path in paths]
            train.append(examples)
        elif p.validation_holdout > 0:
            if p.validation_holdout >= len(examples):
                raise UserError(f"concepts[{examples[0].concept}]: validation_holdout {p.validation_holdout} keeps "
                                f"out all its {len(examples)} instance images; hold out fewer")
            rng = random.Random(stable_int(p.seed, "validation", examples[0].concept))
            held = set(rng.sample(range(len(examples)), p.validation_holdout))
            validation += [e for i, e in enumerate(examples) if i in held]
            train.append([e for i, e in enumerate(examples) if i not in held])
        else:
            validation += examples
            train.append(examples)
    return train, validation


def fit_with_time_ids(img, bucket: tuple[int, int], crop: str, flip: bool, rng: random.Random):
    """(pixels (3, H, W) in [-1, 1], SDXL time ids (6,): original size, crop top-left, target size) of an image
    fitted to its bucket."""
    fitted, (top, left) = fit_to_bucket(img, bucket, crop, flip, rng)
    w, h = bucket
    return to_tensor(fitted), torch.tensor([img.height, img.width, top, left, h, w], dtype=torch.float32)


def load_fixed(example: Example, bucket: tuple[int, int]):
    """(pixels, SDXL time ids) of an image centre-cropped to its bucket, unflipped: as validation sees it every
    time."""
    return fit_with_time_ids(load_image(example.path), bucket, "center", False, random.Random(0))


def class_examples_from(pairs: Sequence[tuple[Path, str]], concept: int) -> list[Example]:
    return [Example(Path(p), prompt, concept, _image_size(Path(p))) for p, prompt in pairs]


def stable_int(*parts) -> int:
    """A seed from any values (the same in every process and on every run)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class TrainingData:
    def __init__(self, instances: list[list[Example]], classes: dict[int, list[Example]], params,
                 num_processes: int = 1, process_index: int = 0):
        self.instances = [e for concept in instances for e in concept]
        self.classes = {c: v for c, v in classes.items() if v}
        self.params = params
        self.num_processes = num_processes
        self.process_index = process_index
        self.buckets = make_buckets(params.resolution, params.aspect_ratio_bucketing)
        self.bucket_of = {e.path: nearest_bucket(e.size, self.buckets) for e in self.instances}
        per_rank = math.ceil(self._num_batches() / num_processes)
        self.steps_per_epoch = math.ceil(per_rank / params.gradient_accumulation_steps)
        self.micro_batches_per_epoch = self.steps_per_epoch * params.gradient_accumulation_steps

    @property
    def has_prior(self) -> bool:
        return bool(self.classes)

    def _by_bucket(self) -> dict[tuple[int, int], list[Example]]:
        groups: dict[tuple[int, int], list[Example]] = {}
        for e in self.instances:
            groups.setdefault(self.bucket_of[e.path], []).append(e)
        return groups

    def _num_batches(self) -> int:
        bs = self.params.train_batch_size
        return sum(math.ceil(len(g) / bs) for g in self._by_bucket().values())

    def epoch_batches(self, epoch: int) -> list[list[Item]]:
        """This process's micro-batches of `epoch`, in training order."""
        rng = random.Random(stable_int(self.params.seed, "order", epoch))
        bs = self.params.train_batch_size
        batches = []
        class_counter = {c: epoch * len(v) for c, v in self.classes.items()}
        for bucket, group in sorted(self._by_bucket().items()):
            group = list(group)
            rng.shuffle(group)
            for start in range(0, len(group), bs):
                chunk = group[start:start + bs]
                items = [Item(e, bucket, False) for e in chunk]
                for e in chunk:
                    pool = self.classes.get(e.concept)
                    if pool:
                        items.append(Item(pool[class_counter[e.concept] % len(pool)], bucket, True))
                        class_counter[e.concept] += 1
                batches.append(items)
        rng.shuffle(batches)
        needed = self.micro_batches_per_epoch * self.num_processes
        batches = [batches[i % len(batches)] for i in range(needed)]
        return batches[self.process_index::self.num_processes]

    def item_seed(self, item: Item, epoch: int) -> int:
        """Seeds crop, flip and the VAE's latent sample of one item: the same on a resumed run.

        With cached latents they are drawn once per image, so a cached latent stays valid."""
        key = (self.params.seed, str(item.example.path), item.bucket)
        return stable_int(*key) if self.params.cache_latents else stable_int(*key, epoch)

    def augmentation_rng(self, item: Item, epoch: int) -> random.Random:
        return random.Random(self.item_seed(item, epoch))

    def prompt(self, item: Item, epoch: int) -> str:
        """The prompt an item trains on in `epoch`: a class example's as it is, an instance example's with the
        caption options applied (captions.augmented), seeded by the run's seed, the image and the epoch."""
        if item.is_prior or not captions.varies(self.params):
            return item.example.prompt
        rng = random.Random(stable_int(self.params.seed, "caption", str(item.example.path), epoch))
        return captions.augmented(item.example.prompt, self.params, rng)

    def load_item(self, item: Item, epoch: int):
        """(pixels (3, H, W) in [-1, 1], SDXL time ids (6,), loss mask (1, H, W) in [0, 1] or None). The mask is
        cropped and flipped exactly as its image (the same draws of the same seed)."""
        rng = self.augmentation_rng(item, epoch)
        img = load_image(item.example.path)
        flip = self.params.hflip and rng.random() < 0.5
        pixels, time_ids = fit_with_time_ids(img, item.bucket, self.params.crop, flip, rng)
        mask = load_mask(item.example.path) if self.params.masked_loss and not item.is_prior else None
        if mask is not None:
            again = self.augmentation_rng(item, epoch)
            flip = self.params.hflip and again.random() < 0.5
            mask = mask_to_tensor(fit_to_bucket(mask.resize(img.size, Image.BILINEAR), item.bucket,
                                                self.params.crop, flip, again)[0])
        return pixels, time_ids, mask


def tokenize(tokenizers, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(
        tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in tokenizers
    )

