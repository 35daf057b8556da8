"""The four model families: their facts, detection from a checkpoint's keys, and offline CLIP tokenizers.

Detection rule (documented in the README):
1. a family forced by the user wins;
2. else a .yaml beside the source decides: `sgm` target -> sdxl; OpenCLIP text encoder -> v2, or v2-v when
   `parameterization: "v"`; CLIP text encoder -> v1;
3. else the keys: `conditioner.embedders.*` -> sdxl, `cond_stage_model.model.*` (OpenCLIP) -> v2,
   `cond_stage_model.transformer.*` (CLIP) -> v1. Keys cannot tell v-prediction from epsilon, so an OpenCLIP file
   without a yaml is v2 (512, epsilon) and the caller is told to force v2-v for a 768 v-prediction model.
"""
from __future__ import annotations

import gzip
import json
import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import yaml

from .config import FAMILIES, FAMILY_RESOLUTION
from .errors import UserError

log = logging.getLogger("dreambooth")
RESOURCES = Path(__file__).parent / "resources"
BPE_PATH = RESOURCES / "bpe_simple_vocab_16e6.txt.gz"


@dataclass(frozen=True)
class Family:
    name: str
    resolution: int
    prediction_type: str  # diffusers scheduler prediction_type: "epsilon" or "v_prediction"
    is_sdxl: bool
    yaml_name: str  # the original inference yaml shipped in resources/ldm
    architecture: str  # modelspec.architecture
    implementation: str  # modelspec.implementation
    scaling_factor: float  # VAE latent scale
    text_prefixes: tuple  # single-file prefixes of the text encoder(s)


FAMILY_FACTS = {
    "v1": Family("v1", 512, "epsilon", False, "v1-inference.yaml", "stable-diffusion-v1",
                 "https://github.com/CompVis/stable-diffusion", 0.18215, ("cond_stage_model.transformer.",)),
    "v2": Family("v2", 512, "epsilon", False, "v2-inference.yaml", "stable-diffusion-v2-512",
                 "https://github.com/Stability-AI/stablediffusion", 0.18215, ("cond_stage_model.model.",)),
    "v2-v": Family("v2-v", 768, "v_prediction", False, "v2-inference-v.yaml", "stable-diffusion-v2-768-v",
                   "https://github.com/Stability-AI/stablediffusion", 0.18215, ("cond_stage_model.model.",)),
    "sdxl": Family("sdxl", 1024, "epsilon", True, "sd_xl_base.yaml", "stable-diffusion-xl-v1-base",
                   "https://github.com/Stability-AI/generative-models", 0.13025,
                   ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")),
}
assert set(FAMILY_FACTS) == set(FAMILIES) and all(FAMILY_FACTS[f].resolution == FAMILY_RESOLUTION[f] for f in FAMILIES)


def family(name: str) -> Family:
    if name not in FAMILY_FACTS:
        raise UserError(f"family {name!r}: must be one of {', '.join(FAMILIES)}")
    return FAMILY_FACTS[name]


def check_family_choice(name: str) -> str:
    if name != "auto":
        family(name)
    return name


def reference_yaml(name: str) -> dict:
    """The original inference yaml of a family, as shipped inside the package."""
    return yaml.safe_load((RESOURCES / "ldm" / family(name).yaml_name).read_text(encoding="utf-8"))


def family_from_yaml(path: Path) -> str:
    """The family a (LDM/SGM) inference yaml describes."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
        target = str(model.get("target", ""))
        params = model.get("params") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable model yaml ({e})") from None
    if target.startswith("sgm.") or "conditioner_config" in params:
        return "sdxl"
    cond = str((params.get("cond_stage_config") or {}).get("target", ""))
    if "OpenCLIP" in cond:
        return "v2-v" if params.get("parameterization") == "v" else "v2"
    if "CLIP" in cond:
        return "v1"
    raise UserError(f"{path}: cannot tell the model family from this yaml (cond_stage_config target {cond!r})")


def family_from_keys(keys: Iterable[str]) -> str | None:
    """v1 / v2 / sdxl from single-file key names; None for an unknown layout. Never returns v2-v (see module doc)."""
    has_unet = has_sdxl = has_openclip = has_clip = False
    for k in keys:
        if k.startswith("model.diffusion_model."):
            has_unet = True
        elif k.startswith("conditioner.embedders."):
            has_sdxl = True
        elif k.startswith("cond_stage_model.model."):
            has_openclip = True
        elif k.startswith("cond_stage_model.transformer."):
            has_clip = True
    if not has_unet:
        return None
    if has_sdxl:
        return "sdxl"
    if has_openclip:
        return "v2"
    if has_clip:
        return "v1"
    return None


def detect_family(state_dict_or_keys, yaml_path: Path | None = None, forced: str = "auto") -> str:
    """The family of a single-file checkpoint (see the module doc for the rule)."""
    if forced != "auto":
        return family(forced).name
    if yaml_path is not None and Path(yaml_path).is_file():
        return family_from_yaml(Path(yaml_path))
    keys = state_dict_or_keys.keys() if hasattr(state_dict_or_keys, "keys") else state_dict_or_keys
    found = family_from_keys(keys)
    if found is None:
        raise UserError("unknown checkpoint layout: no Stable Diffusion v1 / v2 / SDXL keys "
                        "(expected model.diffusion_model.* with cond_stage_model.* or conditioner.embedders.*)")
    if found == "v2":
        log.warning("family: an OpenCLIP (v2) checkpoint without a yaml beside it is taken as v2 (512, epsilon); "
                    "use --family v2-v for a 768 v-prediction model")
    return found


# ---- offline CLIP tokenizers, built from OpenAI's BPE merges ----

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's 49408-token vocabulary and its 48894 merges, exactly as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = tuple(lines[1:49152 - 256 - 2 + 1])
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) that transformers 4.x and 5.x both load."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "model_max_length": max_length, "pad_token": pad_token, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
        }), encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp))
        tokenizer.save_pretrained(str(folder))
    return Path(folder)


def tokenizer_pad_tokens(name: str) -> tuple[str, ...]:
    """Pad token of each tokenizer: OpenAI CLIP pads with <|endoftext|>, the open_clip tokenizers with '!'."""
    return {"v1": ("<|endoftext|>",), "v2": ("!",), "v2-v": ("!",), "sdxl": ("<|endoftext|>", "!")}[family(name).name]


def load_tokenizers(name: str) -> list:
    """The family's CLIP tokenizers (one, or two for SDXL), built offline."""
    from transformers import CLIPTokenizer

    result = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, pad in enumerate(tokenizer_pad_tokens(name)):
            folder = write_tokenizer(Path(tmp) / str(i), pad_token=pad)
            result.append(CLIPTokenizer.from_pretrained(str(folder)))
    return result


def pipeline_class(name: str):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family(name).is_sdxl else diffusers.StableDiffusionPipeline
