"""How well a save has learnt its subject, measured as the DreamBooth paper measures a trained model.

At every save the model renders a fixed evaluation set for each concept (its sample prompts, plus prompts that put
the subject in new contexts, each with fixed seeds, so every save is judged on the same images), and four numbers
compare those images with the concept's instance photos:

  DINO    subject fidelity: the mean cosine similarity of self-supervised DINO ViT embeddings (the CLS token)
          between every generated image and every instance photo
  CLIP-I  the same with CLIP image embeddings
  CLIP-T  prompt fidelity: the mean cosine similarity between each generated image's CLIP embedding and its
          prompt's (the identifier left out: CLIP does not know it)
  copy    for each generated image, its highest DINO similarity to any one instance photo, averaged: it rises as the
          model starts to reproduce its training photos rather than the subject in the prompt's scene

The best save is the one with the highest DINO among the saves whose CLIP-T stays within `fidelity_prompt_margin`
of the first scored save's (the prompt still matters) and whose copy score stays below `fidelity_copy_limit`.

The scoring models are transformers' CLIPModel and a ViT (facebook/dino-vits16 style), from a local folder or a
Hugging Face id (the cache, or the hub when online), safetensors weights only. Images are prepared as both were
trained: resized to the model's input size (shorter side), centre-cropped, normalised with CLIP's and ImageNet's
mean and deviation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import UserError

DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL = "openai/clip-vit-base-patch32", "facebook/dino-vits16"
CONTEXTS = ("on the beach", "in the snow", "on a wooden table", "in a city street")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Scores:
    dino: float
    clip_i: float
    clip_t: float
    copy: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def mean_scores(scores: list[Scores]) -> Scores:
    """The scores of several concepts as one (their mean)."""
    return Scores(*(sum(getattr(s, name) for s in scores) / len(scores) for name in ("dino", "clip_i", "clip_t",
                                                                                      "copy")))


def history(recorded: list[dict], until: int, saved: bool = True) -> list[tuple[int, Scores]]:
    """(step, Scores) of the recorded saves (models.read_fidelity) up to step `until`; with `saved` False, of the
    scores taken on Sample now instead."""
    return [(r["step"], Scores(r["dino"], r["clip_i"], r["clip_t"], r["copy"]))
            for r in recorded if r["step"] <= until and r["saved"] == saved]


def best_save(history: list[tuple[int, Scores]], prompt_margin: float, copy_limit: float) -> int | None:
    """The step of the best save: the highest DINO among saves whose CLIP-T is at least the first save's minus
    `prompt_margin` and whose copy score is at most `copy_limit`; None when no save qualifies."""
    if not history:
        return None
    floor = history[0][1].clip_t - prompt_margin
    eligible = [(scores.dino, step) for step, scores in history if scores.clip_t >= floor and scores.copy <= copy_limit]
    return max(eligible)[1] if eligible else None


def evaluation_prompts(sample_prompts: list[str], instance_token: str, class_token: str) -> list[str]:
    """The prompts every save is judged on: the concept's sample prompts, then its subject in new contexts."""
    subject = " ".join(t for t in (instance_token.strip(), class_token.strip()) if t)
    contexts = [f"a photo of {subject} {where}" for where in CONTEXTS] if subject else []
    return list(dict.fromkeys([*sample_prompts, *contexts]))


def _prepared(images, size: int, mean, std) -> torch.Tensor:
    """PIL images as a model input batch: shorter side to `size` (bicubic), centre crop, normalised."""
    from PIL import Image

    out = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
        out.append((pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(out)


def _load(loader, source: str, what: str, setting: str):
    try:
        return loader(source)
    except Exception as e:  # a missing folder, no network, a hub id unknown, pickle-only weights
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"fidelity scores: cannot load the {what} model {source!r} ({reason}); set "
                        f"'{setting}' to a local folder, or download it once with `huggingface-cli download "
                        f"{source}` while online; training goes on without scores") from e


class Scorers:
    """The CLIP and DINO models, on the training device, and the embeddings of each concept's photos."""

    def __init__(self, clip, tokenizer, dino, device):
        self.clip, self.tokenizer, self.dino, self.device = clip, tokenizer, dino, device
        self.clip_size = clip.config.vision_config.image_size
        self.dino_size = dino.config.image_size
        self._real: dict = {}  # concept position -> (CLIP, DINO) embeddings of its instance photos

    @classmethod
    def load(cls, clip_source: str, dino_source: str, device) -> "Scorers":
        """The two models from their settings (empty: the default ids)."""
        from transformers import AutoModel, CLIPModel, CLIPTokenizer

        clip_source, dino_source = clip_source or DEFAULT_CLIP_MODEL, dino_source or DEFAULT_DINO_MODEL
        clip = _load(lambda s: CLIPModel.from_pretrained(s, use_safetensors=True), clip_source, "CLIP",
                     "Fidelity CLIP model")
        tokenizer = _load(CLIPTokenizer.from_pretrained, clip_source, "CLIP tokenizer of the", "Fidelity CLIP model")
        dino = _load(lambda s: AutoModel.from_pretrained(s, use_safetensors=True), dino_source, "DINO",
                     "Fidelity DINO model")
        return cls(clip.to(device).eval().requires_grad_(False), tokenizer,
                   dino.to(device).eval().requires_grad_(False), device)

    @torch.no_grad()
    def image_embeddings(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP, DINO) embeddings of PIL images, each row of unit length."""
        clip_in = _prepared(images, self.clip_size, CLIP_MEAN, CLIP_STD).to(self.device, self.clip.dtype)
        dino_in = _prepared(images, self.dino_size, IMAGENET_MEAN, IMAGENET_STD).to(self.device, self.dino.dtype)
        clip = self.clip.get_image_features(pixel_values=clip_in)
        dino = self.dino(pixel_values=dino_in).last_hidden_state[:, 0]
        return _unit(_tensor(clip)), _unit(dino)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.clip.config.text_config.max_position_embeddings, return_tensors="pt")
        return _unit(_tensor(self.clip.get_text_features(input_ids=ids.input_ids.to(self.device))))

    def real(self, position: int, load_photos) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings of a concept's instance photos, computed once per run."""
        if position not in self._real:
            self._real[position] = self.image_embeddings(load_photos())
        return self._real[position]

    def score(self, generated, prompts: list[str], real: tuple[torch.Tensor, torch.Tensor]) -> Scores:
        """The four numbers for generated images (PIL) and the prompt each was made from."""
        clip_g, dino_g = self.image_embeddings(generated)
        clip_r, dino_r = real
        text = self.text_embeddings(prompts)
        dino = dino_g @ dino_r.T  # generated x real
        return Scores(dino=float(dino.mean()), clip_i=float((clip_g @ clip_r.T).mean()),
                      clip_t=float((clip_g * text).sum(-1).mean()), copy=float(dino.max(dim=1).values.mean()))


def _tensor(features) -> torch.Tensor:
    """transformers 5 returns a model output where 4.x returned the projected features themselves."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)
