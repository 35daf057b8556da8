"""Every setting, declared once.

The UI builds its widgets from these declarations, the CLI reads and writes the same JSON, and the trainer reads
the validated values. A model's config JSON has three parts: ``model``, ``concepts`` (a list) and ``parameters``.
Unknown keys are an error, never silently dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, make_dataclass, replace, asdict
from pathlib import Path
from typing import Any

from .errors import UserError

FAMILIES = ("v1", "v2", "v2-v", "sdxl")
# Native training resolution per family; `create` writes it into the new model's parameters.
FAMILY_RESOLUTION = {"v1": 512, "v2": 512, "v2-v": 768, "sdxl": 1024}
CONFIG_VERSION = 1


class ConfigError(UserError):
    """A config that cannot be used; the message names every bad field."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # bool, int, float or str
    default: Any
    label: str
    tooltip: str
    group: str = ""
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None  # UI slider step
    kind: str = ""  # "path", "prompt" or "" - a hint for the UI widget

    def check(self, value: Any) -> tuple[Any, str | None]:
        """Return (coerced value, error or None)."""
        if self.type is bool:
            if isinstance(value, bool):
                return value, None
            return value, f"{self.name}: expected true or false, got {value!r}"
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                return value, f"{self.name}: expected a whole number, got {value!r}"
            value = int(value)
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return value, f"{self.name}: expected a number, got {value!r}"
            value = float(value)
            if value != value:
                return value, f"{self.name}: NaN is not allowed"
        elif self.type is str:
            if not isinstance(value, str):
                return value, f"{self.name}: expected text, got {value!r}"
        if self.choices and value not in self.choices:
            return value, f"{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}"
        if self.min is not None and value < self.min:
            return value, f"{self.name}: {value!r} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return value, f"{self.name}: {value!r} is above the maximum {self.max}"
        return value, None


S = Setting

MODEL_SETTINGS: tuple[Setting, ...] = (
    S("source", str, "", "Source checkpoint", "The checkpoint this model was created from (file, diffusers folder or hub id).", kind="path"),
    S("family", str, "v1", "Model family", "v1 (512), v2 (512, epsilon), v2-v (768, v-prediction) or sdxl (1024).", choices=FAMILIES),
)

CONCEPT_SETTINGS: tuple[Setting, ...] = (
    # Instance
    S("instance_data_dir", str, "", "Instance images folder", "Folder with the 3-20 photos of your subject (png, jpg, webp; searched recursively).", "instance", kind="path"),
    S("instance_prompt", str, "[filewords]", "Instance prompt", "Prompt for the instance images. [filewords] is replaced by each image's caption (.txt beside it, else its file name).", "instance", kind="prompt"),
    S("instance_token", str, "", "Instance token", "The rare identifier for your subject, e.g. zwx. Inserted into [filewords] captions before the class token.", "instance"),
    S("class_token", str, "", "Class token", "The class noun of your subject, e.g. dog.", "instance"),
    # Class (prior preservation)
    S("class_data_dir", str, "", "Class images folder", "Your own class images. Empty: generated into the model's class folder and reused.", "class", kind="path"),
    S("class_prompt", str, "[filewords]", "Class prompt", "Prompt for class images, e.g. 'a photo of a dog'. [filewords] uses the instance captions without the instance token.", "class", kind="prompt"),
    S("class_negative_prompt", str, "", "Class negative prompt", "Negative prompt used when generating class images.", "class", kind="prompt"),
    S("num_class_images_per_image", int, 0, "Class images per instance image", "How many class images per instance image. 0 turns prior preservation off for this concept.", "class", min=0, max=1000),
    S("class_guidance_scale", float, 7.5, "Class CFG scale", "Classifier-free guidance scale for generating class images.", "class", min=0, max=50, step=0.5),
    S("class_infer_steps", int, 40, "Class generation steps", "Denoising steps per generated class image.", "class", min=1, max=200),
    # Samples (previews)
    S("sample_prompt", str, "", "Sample prompt", "Prompt for preview images. Empty: the instance prompt of the first instance image. [filewords] allowed.", "sample", kind="prompt"),
    S("sample_negative_prompt", str, "", "Sample negative prompt", "Negative prompt for preview images.", "sample", kind="prompt"),
    S("num_samples", int, 1, "Samples per preview", "How many preview images to make for this concept each time.", "sample", min=0, max=16),
    S("sample_seed", int, 420, "Sample seed", "Seed for preview images; -1 draws a new one each time.", "sample", min=-1, max=2**31 - 1),
    S("sample_guidance_scale", float, 7.5, "Sample CFG scale", "Classifier-free guidance scale for preview images.", "sample", min=0, max=50, step=0.5),
    S("sample_infer_steps", int, 30, "Sample steps", "Denoising steps per preview image.", "sample", min=1, max=200),
)

OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers", "default")

PARAMETER_SETTINGS: tuple[Setting, ...] = (
    # Learning rate
    S("learning_rate", float, 2e-6, "UNet learning rate", "Learning rate of the UNet. 1e-6 to 5e-6 is usual for a full fine-tune.", "learning rate", min=0, max=1, step=1e-7),
    S("text_encoder_learning_rate", float, 1e-6, "Text encoder learning rate", "Learning rate of the text encoder(s), applied as a separate parameter group.", "learning rate", min=0, max=1, step=1e-7),
    S("lr_scheduler", str, "constant_with_warmup", "Learning rate scheduler", "How the learning rate changes over training.", "learning rate", choices=SCHEDULERS),
    S("lr_warmup_steps", int, 0, "Warmup steps", "Steps over which the learning rate ramps up from 0.", "learning rate", min=0, max=100000),
    S("lr_cycles", int, 1, "Restart cycles", "Number of hard restarts for cosine_with_restarts.", "learning rate", min=1, max=100),
    S("lr_power", float, 1.0, "Polynomial power", "Power of the polynomial scheduler.", "learning rate", min=0.1, max=10, step=0.1),
    # Intervals
    S("num_train_epochs", int, 100, "Training epochs", "Epochs = steps per instance image. 100 is a good start for 5 images.", "intervals", min=1, max=100000),
    S("max_train_steps", int, 0, "Max training steps", "Stop after this many optimizer steps. 0: use the epochs.", "intervals", min=0, max=10000000),
    S("save_every_n_epochs", int, 25, "Save checkpoint every N epochs", "0: only at the end.", "intervals", min=0, max=100000),
    S("sample_every_n_epochs", int, 25, "Preview every N epochs", "0: no previews during training.", "intervals", min=0, max=100000),
    # Batch
    S("train_batch_size", int, 1, "Batch size", "Instance images per step (class images are added alongside).", "batch", min=1, max=256),
    S("gradient_accumulation_steps", int, 1, "Gradient accumulation steps", "Micro-batches per optimizer step.", "batch", min=1, max=1024),
    # Performance
    S("optimizer", str, "adamw_8bit", "Optimizer", "AdamW, 8-bit AdamW (bitsandbytes; least memory) or Adafactor.", "performance", choices=OPTIMIZERS),
    S("mixed_precision", str, "fp16", "Mixed precision", "fp16 for most cards, bf16 for RTX 30xx and newer; no for full fp32.", "performance", choices=PRECISIONS),
    S("attention", str, "sdpa", "Attention backend", "PyTorch SDPA (default), xformers (when installed, GPU only) or the plain implementation.", "performance", choices=ATTENTION),
    S("gradient_checkpointing", bool, False, "Gradient checkpointing", "Trade about 20% speed for much less memory.", "performance"),
    S("cache_latents", bool, True, "Cache latents", "Encode images once with the VAE and keep the latents; faster, disables random crop and flip variety.", "performance"),
    S("adam_beta1", float, 0.9, "Adam beta1", "First-moment decay of AdamW.", "performance", min=0, max=1, step=0.01),
    S("adam_beta2", float, 0.999, "Adam beta2", "Second-moment decay of AdamW.", "performance", min=0, max=1, step=0.001),
    S("adam_epsilon", float, 1e-8, "Adam epsilon", "Numerical stabiliser of AdamW.", "performance", min=0, max=1),
    S("weight_decay", float, 0.01, "Weight decay", "Decoupled weight decay.", "performance", min=0, max=1, step=0.001),
    S("max_grad_norm", float, 1.0, "Max gradient norm", "Gradient clipping; 0 turns it off.", "performance", min=0, max=1000),
    # Text encoder and loss
    S("train_text_encoder_ratio", float, 0.25, "Text encoder step ratio", "The text encoder trains for this fraction of the steps, then freezes. 0: never.", "loss", min=0, max=1, step=0.05),
    S("prior_loss_weight", float, 1.0, "Prior loss weight", "Weight of the class (prior preservation) loss: loss = MSE(instance) + weight x MSE(class).", "loss", min=0, max=100, step=0.05),
    S("offset_noise", float, 0.0, "Offset noise", "Adds a per-channel constant to the noise so the model learns very dark and bright images. 0.05-0.1 typical; 0 off.", "loss", min=0, max=1, step=0.01),
    S("min_snr_gamma", float, 0.0, "Min-SNR gamma", "Min-SNR loss weighting (5 is typical); 0 uses the paper's plain MSE.", "loss", min=0, max=100, step=0.5),
    S("use_ema", bool, False, "Use EMA", "Keep an exponential moving average of the UNet weights.", "loss"),
    S("ema_decay", float, 0.999, "EMA decay", "Decay of the moving average.", "loss", min=0, max=1, step=0.0001),
    # Image processing
    S("resolution", int, 512, "Resolution", "Training resolution (the family's native one by default).", "image processing", min=64, max=4096, step=64),
    S("aspect_ratio_bucketing", bool, True, "Aspect-ratio bucketing", "Group images by aspect ratio instead of cropping them all square.", "image processing"),
    S("crop", str, "center", "Crop", "How an image is cropped to its bucket.", "image processing", choices=("center", "random")),
    S("hflip", bool, False, "Horizontal flip", "Randomly mirror images (not for asymmetric subjects such as text or faces with a parting).", "image processing"),
    S("seed", int, 1234, "Seed", "Seed for noise, timesteps, shuffling and augmentation.", "image processing", min=0, max=2**31 - 1),
    # Saving
    S("checkpoint_format", str, "safetensors", "Checkpoint format", "safetensors (safe, fast) or ckpt.", "saving", choices=("safetensors", "ckpt")),
    S("save_half", bool, True, "Save fp16 checkpoint", "Write the checkpoint in half precision (half the size).", "saving"),
    S("save_ema_weights", bool, True, "Export EMA weights", "When EMA is on, export the averaged UNet instead of the raw one.", "saving"),
    S("save_on_end", bool, True, "Save at the end", "Export a checkpoint when training finishes.", "saving"),
    S("save_on_cancel", bool, True, "Save on cancel", "Export a checkpoint when training is cancelled.", "saving"),
)

GROUPS = ("performance", "intervals", "batch", "learning rate", "loss", "image processing", "saving")
MIN_CONCEPTS = 4  # the UI always offers at least this many concept slots


def _section_class(name: str, settings: tuple[Setting, ...]):
    return make_dataclass(name, [(s.name, s.type, field(default=s.default)) for s in settings], frozen=True)


ModelSettings = _section_class("ModelSettings", MODEL_SETTINGS)
Concept = _section_class("Concept", CONCEPT_SETTINGS)
Parameters = _section_class("Parameters", PARAMETER_SETTINGS)


def _parse_section(section: str, data: Any, settings: tuple[Setting, ...], cls, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{section}: expected an object, got {type(data).__name__}")
        return cls()
    known = {s.name: s for s in settings}
    values = {}
    for key, value in data.items():
        if key not in known:
            errors.append(f"{section}.{key}: unknown setting")
            continue
        value, error = known[key].check(value)
        if error:
            errors.append(f"{section}.{error}")
        else:
            values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class Config:
    model: Any = field(default_factory=ModelSettings)
    concepts: tuple = ()
    parameters: Any = field(default_factory=Parameters)

    @property
    def active_concepts(self) -> tuple:
        """Concepts with an instance folder; empty slots from the UI are ignored."""
        return tuple(c for c in self.concepts if c.instance_data_dir.strip())

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "model": asdict(self.model),
            "concepts": [asdict(c) for c in self.concepts],
            "parameters": asdict(self.parameters),
        }

    def with_parameters(self, **changes) -> "Config":
        return Config.from_dict({**self.to_dict(), "parameters": {**asdict(self.parameters), **changes}})

    @staticmethod
    def from_dict(data: Any) -> "Config":
        errors: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected an object, got {type(data).__name__}")
        for key in data:
            if key not in ("version", "model", "concepts", "parameters"):
                errors.append(f"{key}: unknown section")
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            errors.append(f"version: {version!r} is not supported (expected {CONFIG_VERSION})")
        model = _parse_section("model", data.get("model", {}), MODEL_SETTINGS, ModelSettings, errors)
        raw_concepts = data.get("concepts", [])
        concepts = []
        if not isinstance(raw_concepts, list):
            errors.append("concepts: expected a list")
        else:
            for i, c in enumerate(raw_concepts):
                concepts.append(_parse_section(f"concepts[{i}]", c, CONCEPT_SETTINGS, Concept, errors))
        parameters = _parse_section("parameters", data.get("parameters", {}), PARAMETER_SETTINGS, Parameters, errors)
        if errors:
            raise ConfigError("; ".join(errors))
        return Config(model=model, concepts=tuple(concepts), parameters=parameters)

    @staticmethod
    def load(path: Path) -> "Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return Config.from_dict(data)

    def save(self, path: Path) -> None:
        from .store import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def validate_for_training(config: Config) -> None:
    """Checks that only matter when training starts (a config being edited may be incomplete)."""
    errors = []
    if not config.active_concepts:
        errors.append("concepts: no concept has an instance images folder")
    for i, c in enumerate(config.concepts):
        if not c.instance_data_dir.strip():
            continue
        if not Path(c.instance_data_dir).expanduser().is_dir():
            errors.append(f"concepts[{i}].instance_data_dir: {c.instance_data_dir!r} is not a folder")
        if c.class_data_dir.strip() and not Path(c.class_data_dir).expanduser().is_dir() and c.num_class_images_per_image == 0:
            errors.append(f"concepts[{i}].class_data_dir: {c.class_data_dir!r} is not a folder")
    if errors:
        raise ConfigError("; ".join(errors))


__all__ = [
    "Setting", "Config", "ConfigError", "Concept", "Parameters", "ModelSettings", "MODEL_SETTINGS", "CONCEPT_SETTINGS",
    "PARAMETER_SETTINGS", "GROUPS", "FAMILIES", "FAMILY_RESOLUTION", "MIN_CONCEPTS", "validate_for_training", "replace", "fields",
]
