"""The four model families: one record of facts per family, one detector for any source, offline CLIP tokenizers.

Detection rule (documented in the README), the same for `create`, the tab and the CLI:
1. a family forced by the user wins (v2 and v2-v may be forced either way; another family the source contradicts is
   an error);
2. a single file: a .yaml beside it (same name) decides: `sgm` target -> sdxl; OpenCLIP text encoder -> v2, or v2-v
   when `parameterization: "v"`; CLIP text encoder -> v1. Else the keys: `conditioner.embedders.*` -> sdxl,
   `cond_stage_model.model.*` (OpenCLIP) -> v2, `cond_stage_model.transformer.*` (CLIP) -> v1. Keys cannot tell
   v-prediction from epsilon, so an OpenCLIP file without a yaml is v2 (512, epsilon) and the caller is told to force
   v2-v for a 768 v-prediction model;
3. a diffusers folder: the family our own import recorded in it, else its configs: a second text encoder (or a UNet
   with SDXL's text-time embedding) -> sdxl; an OpenCLIP text encoder (gelu, 1024 wide) -> v2, or v2-v when the
   scheduler predicts v; else v1.
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

from .errors import UserError

log = logging.getLogger("dreambooth")
RESOURCES = Path(__file__).parent / "resources"
BPE_PATH = RESOURCES / "bpe_simple_vocab_16e6.txt.gz"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The file our import writes into a working diffusers folder: {"family", "detected", "source", ...}.
MODEL_INFO_FILE = "dreambooth_model.json"
CLIP_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"  # OpenAI CLIP pads with <|endoftext|>, the open_clip tokenizers with '!'


@dataclass(frozen=True)
class Family:
    name: str
    resolution: int  # native training and sampling resolution
    prediction_type: str  # diffusers scheduler prediction_type: "epsilon" or "v_prediction"
    is_sdxl: bool
    yaml_name: str  # the original inference yaml shipped in resources/ldm
    architecture: str  # modelspec.architecture
    implementation: str  # modelspec.implementation
    scaling_factor: float  # VAE latent scale
    text_prefixes: tuple  # single-file prefixes of the text encoder(s), in diffusers order
    openclip: tuple  # per text encoder: True for the OpenCLIP layout (fused in_proj, text_projection)
    pad_tokens: tuple  # per tokenizer

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The diffusers component names of the text encoder(s)."""
        return ("text_encoder", "text_encoder_2")[: len(self.text_prefixes)]

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return ("tokenizer", "tokenizer_2")[: len(self.text_prefixes)]

    @property
    def components(self) -> dict[str, str]:
        """Single-file prefix of each diffusers component."""
        return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **dict(zip(self.text_encoders, self.text_prefixes))}

    @property
    def pipeline_class_name(self) -> str:
        return "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"

    def is_openclip(self, component: str) -> bool:
        return component in self.text_encoders and self.openclip[self.text_encoders.index(component)]

    def scheduler_config(self) -> dict:
        """The DDIM scheduler of every Stable Diffusion release (scaled-linear betas), with this family's target."""
        return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=self.prediction_type)


_V2 = dict(is_sdxl=False, implementation="https://github.com/Stability-AI/stablediffusion", scaling_factor=0.18215,
           text_prefixes=("cond_stage_model.model.",), openclip=(True,), pad_tokens=(OPENCLIP_PAD,))
FAMILY_FACTS = {
    "v1": Family("v1", 512, "epsilon", False, "v1-inference.yaml", "stable-diffusion-v1",
                 "https://github.com/CompVis/stable-diffusion", 0.18215, ("cond_stage_model.transformer.",),
                 (False,), (CLIP_PAD,)),
    "v2": Family("v2", 512, "epsilon", yaml_name="v2-inference.yaml", architecture="stable-diffusion-v2-512", **_V2),
    "v2-v": Family("v2-v", 768, "v_prediction", yaml_name="v2-inference-v.yaml",
                   architecture="stable-diffusion-v2-768-v", **_V2),
    "sdxl": Family("sdxl", 1024, "epsilon", True, "sd_xl_base.yaml", "stable-diffusion-xl-v1-base",
                   "https://github.com/Stability-AI/generative-models", 0.13025,
                   ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."), (False, True),
                   (CLIP_PAD, OPENCLIP_PAD)),
}
FAMILIES = tuple(FAMILY_FACTS)


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


MAX_YAML_BYTES = 1 << 20  # an inference yaml is a few KB
MAX_YAML_DEPTH = 32


class _ModelYamlLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases (a "billion laughs" file expands nothing) and at most MAX_YAML_DEPTH deep."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not used in model yamls")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_model_yaml(path: Path) -> dict:
    """A model's inference yaml (the `.yaml` beside a checkpoint), read with bounds: at most 1 MiB, no aliases, at
    most 32 levels; a mapping with a `model:` mapping, else a UserError naming the file."""
    from .store import read_bytes

    try:
        raw = read_bytes(Path(path), limit=MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise UserError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB, not a model yaml")
        data = yaml.load(raw.decode("utf-8"), Loader=_ModelYamlLoader)  # noqa: S506 (a safe loader)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable model yaml ({reason[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a model yaml (no `model:` section)")
    return data


def family_from_yaml(path: Path) -> str:
    """The family a (LDM/SGM) inference yaml describes."""
    model = read_model_yaml(path)["model"]
    target = str(model.get("target", ""))
    params = model.get("params") or {}
    cond_stage = params.get("cond_stage_config") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(cond_stage or {}, dict):
        raise UserError(f"{path}: not a model yaml (model.params and its cond_stage_config should be mappings)")
    if target.startswith("sgm.") or "conditioner_config" in params:
        return "sdxl"
    cond = str((cond_stage or {}).get("target", ""))
    if "OpenCLIP" in cond:
        return "v2-v" if params.get("parameterization") == "v" else "v2"
    if "CLIP" in cond:
        return "v1"
    raise UserError(f"{path}: cannot tell the model family from this yaml (its cond_stage_config target is not CLIP)")


def family_from_keys(keys: Iterable[str]) -> str | None:
    """v1 / v2 / sdxl from single-file key names; None for an unknown layout. Never returns v2-v (see module doc)."""
    has_unet = has_sdxl = has_openclip = has_clip = False
    for k in keys:
        if k.startswith(UNET_PREFIX):
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({type(e).__name__})") from e
    return data if isinstance(data, dict) else {}


def family_from_folder(folder: Path) -> str:
    """The family of a diffusers folder (see the module doc, rule 3)."""
    folder = Path(folder)
    recorded = _read_json(folder / MODEL_INFO_FILE).get("family")
    if recorded in FAMILY_FACTS:
        return recorded
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder}: not a diffusers folder (no model_index.json)")
    unet = _read_json(folder / "unet" / "config.json")
    if (folder / "text_encoder_2").is_dir() or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    text = _read_json(folder / "text_encoder" / "config.json")
    if text.get("hidden_act") == "gelu" or text.get("hidden_size") == 1024:
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
        return "v2-v" if scheduler.get("prediction_type") == "v_prediction" else "v2"
    return "v1"


@dataclass(frozen=True)
class Detection:
    family: str
    how: str  # said to the user: "forced by the user", "from X.yaml", "from the keys", ...


def check_forced(found: str, forced: str, what: str) -> None:
    if forced != found and {forced, found} != {"v2", "v2-v"}:
        raise UserError(f"{what}: family {forced!r} does not fit it: it is a {found} model")


def detect_keys(keys: Iterable[str], yaml_path: Path | None = None, forced: str = "auto",
                what: str = "checkpoint") -> Detection:
    """The family of a single-file checkpoint from its keys and the yaml beside it (rules 1 and 2)."""
    by_keys = family_from_keys(keys)
    if by_keys is None and forced != "auto":
        return Detection(family(forced).name, "forced by the user")
    if by_keys is None:
        raise UserError(f"{what}: unknown checkpoint layout (no Stable Diffusion v1 / v2 / SDXL keys: expected "
                        "model.diffusion_model.* with cond_stage_model.* or conditioner.embedders.*)")
    if forced != "auto":
        check_forced(by_keys, family(forced).name, what)
        return Detection(forced, "forced by the user")
    if yaml_path is not None and Path(yaml_path).is_file():
        found = family_from_yaml(Path(yaml_path))
        check_forced(by_keys, found, f"{what} (with {Path(yaml_path).name})")
        return Detection(found, f"from {Path(yaml_path).name}")
    if by_keys == "v2":
        log.warning("family: an OpenCLIP (v2) checkpoint without a yaml beside it is taken as v2 (512, epsilon); "
                    "use --family v2-v for a 768 v-prediction model")
        return Detection("v2", "from the keys (OpenCLIP without a yaml: taken as 512 epsilon)")
    return Detection(by_keys, "from the keys")


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


def pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, family(name).pipeline_class_name)
