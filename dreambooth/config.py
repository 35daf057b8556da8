"""Every setting, declared once, and the rules that relate them.

Each section is a typed, frozen dataclass whose fields are the settings: `setting(...)` records the label, tooltip,
group, range and widget hint beside the type and default. The UI builds its widgets from these declarations, the CLI
reads and writes the same JSON, the webui's settings page is generated from HOST_SETTINGS, and the trainer reads the
validated values as attributes (a misspelt name is an AttributeError at once, and a type checker sees it).

A model's config JSON has three parts: ``model`` (set by `create`, fixed afterwards), ``concepts`` (a list) and
``parameters``. Unknown keys are an error, never silently dropped. Rules that relate several settings are declared
below the sections (CONCEPT_RULES, PARAMETER_RULES) and checked by the same validation.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .families import FAMILIES, family

CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything near this is not one
MAX_JSON_DEPTH = 8  # config.json nests three levels deep
# Longest accepted text per widget kind: prompts are cut at 77 tokens by CLIP anyway; paths by the OS.
MAX_TEXT = {"prompt": 2000, "path": 4096, "": 200}
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor", "prodigy", "lion", "schedulefree_adamw", "came")
LOSS_TYPES = ("mse", "huber", "smooth_l1")
ADAPTER_TYPES = ("lora", "loha", "lokr", "dora")
HUBER_SCHEDULES = ("constant", "snr")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers", "default")
MIN_CONCEPTS = 4  # the UI always offers at least this many concept slots
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Problem:
    """One bad value: where it is (("concepts", 0, "instance_data_dir")) and what is wrong, in the user's words."""

    where: tuple
    message: str

    @property
    def setting(self) -> str:
        return str(self.where[-1]) if self.where else ""

    def __str__(self) -> str:
        parts = []
        for part in self.where:
            parts.append(f"[{part}]" if isinstance(part, int) else ("." if parts else "") + part)
        return f"{''.join(parts)}: {self.message}" if parts else self.message


class ConfigError(UserError):
    """A config that cannot be used; the message names every bad field, `problems` lists them one by one."""

    SHOWN = 12  # a config with thousands of bad keys gets a message of a dozen, not megabytes

    def __init__(self, problems):
        self.problems = [p if isinstance(p, Problem) else Problem((), str(p)) for p in
                         (problems if isinstance(problems, (list, tuple)) else [problems])]
        shown = "; ".join(map(str, self.problems[:self.SHOWN]))
        more = len(self.problems) - self.SHOWN
        super().__init__(shown + (f"; and {more} more problems" if more > 0 else ""))


def _short(value: Any) -> str:
    """A bad value as shown in a message: never more than a few dozen characters of whatever was sent."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    kind: str = ""  # "path", "prompt", "scientific" (a number shown as 2e-06) or "" - a hint for the UI widget

    def check(self, value: Any) -> tuple[Any, str | None]:
        """Return (coerced value, error or None); the error is in the user's words and names no internals."""
        if self.type is bool:
            if isinstance(value, bool):
                return value, None
            return value, f"expected true or false, got {_short(value)}"
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                wanted = f"enter a {'whole ' if self.type is int else ''}number"
                return value, wanted if value is None or value == "" else f"{wanted}, got {_short(value)}"
            try:
                as_float = float(value)
            except OverflowError:
                return value, "the number is far too large"
            if not math.isfinite(as_float):
                return value, f"enter a finite number, got {_short(value)}"
            if self.type is int:
                if as_float != int(value):
                    return value, f"enter a whole number, got {_short(value)}"
                value = int(value)
            else:
                value = as_float
        elif self.type is str:
            if not isinstance(value, str):
                return value, f"expected text, got {_short(value)}"
            limit = MAX_TEXT.get(self.kind, MAX_TEXT[""])
            if len(value) > limit:
                return value, f"too long ({len(value)} characters; at most {limit})"
            if "\x00" in value:
                return value, "must not contain NUL characters"
            if any("\ud800" <= ch <= "\udfff" for ch in value):  # a lone surrogate: no file can hold it as UTF-8
                return value, "holds a broken character (a lone surrogate); type the text again"
        if self.choices and value not in self.choices:
            return value, f"{_short(value)} is not one of {', '.join(map(str, self.choices))}"
        if self.min is not None and value < self.min:
            return value, f"{_short(value)} is below the minimum {self.min:g}"
        if self.max is not None and value > self.max:
            return value, f"{_short(value)} is above the maximum {self.max:g}"
        return value, None

    def parse(self, text: str) -> Any:
        """A value typed on a command line (`--set name=value`), checked like any other."""
        value: Any = text
        if self.type is bool:
            value = {"true": True, "yes": True, "1": True, "on": True,
                     "false": False, "no": False, "0": False, "off": False}.get(text.strip().lower(), text)
        elif self.type in (int, float):
            try:
                value = int(text) if self.type is int and text.strip().lstrip("+-").isdigit() else float(text)
            except ValueError:
                pass
        value, error = self.check(value)
        if error:
            raise ConfigError(Problem((self.name,), error))
        return value


def setting(default, label: str, tooltip: str, group: str = "", **facts):
    """Declare one setting as a dataclass field: its default plus what the UI and the checks need to know."""
    return field(default=default, metadata={"setting": dict(label=label, tooltip=tooltip, group=group, **facts)})


def settings_of(section) -> tuple[Setting, ...]:
    """The Setting declarations of a section dataclass, in field order."""
    return tuple(Setting(name=f.name, type=_TYPES[f.type] if isinstance(f.type, str) else f.type, default=f.default,
                         **f.metadata["setting"]) for f in fields(section))


# Settings of the host, not of a model: the webui shows them on its Settings page (generated from this tuple).
HOST_SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", str, "", "Data folder",
            "Folder whose models/dreambooth and models/Stable-diffusion are used; empty: the webui's own models "
            "folder. --dreambooth-dir overrides it. Restart to apply.", kind="path"),
    # These two stand in for a model's own parameter of the same name while that is empty (host.parameter_defaults).
    Setting("fidelity_clip_model", str, "", "Fidelity CLIP model",
            "A local folder (or Hugging Face id) of the CLIP model that scores subject fidelity, for every model whose "
            "own Fidelity CLIP model is empty; empty: openai/clip-vit-base-patch32 from the Hugging Face cache.",
            kind="path"),
    Setting("fidelity_dino_model", str, "", "Fidelity DINO model",
            "A local folder (or Hugging Face id) of the DINO ViT that scores subject fidelity, for every model whose "
            "own Fidelity DINO model is empty; empty: facebook/dino-vits16 from the Hugging Face cache.", kind="path"),
)


@dataclass(frozen=True)
class ModelSettings:
    source: str = setting('', 'Source checkpoint', 'The checkpoint this model was created from (file, diffusers folder or hub id).', kind='path')
    family: str = setting('v1', 'Model family', 'v1 (512), v2 (512, epsilon), v2-v (768, v-prediction) or sdxl (1024).', choices=FAMILIES)


@dataclass(frozen=True)
class Concept:
    # instance
    instance_data_dir: str = setting('', 'Instance images folder', 'Folder with the 3-20 photos of your subject (png, jpg, webp; searched recursively).', group='instance', kind='path')
    validation_data_dir: str = setting('', 'Validation images folder', 'Photos of the subject that are never trained on (captions as for instance images): their loss is measured every Validation interval steps. Empty: see Validation images held out.', group='instance', kind='path')
    instance_prompt: str = setting('[filewords]', 'Instance prompt', "Prompt for the instance images. [filewords] is replaced by each image's caption (.txt beside it, else its file name).", group='instance', kind='prompt')
    instance_token: str = setting('', 'Instance token', 'The rare identifier for your subject, e.g. zwx. Inserted into [filewords] captions before the class token.', group='instance')
    class_token: str = setting('', 'Class token', 'The class noun of your subject, e.g. dog.', group='instance')
    # class
    class_data_dir: str = setting('', 'Class images folder', "Your own class images. Empty: generated into the model's class folder and reused.", group='class', kind='path')
    class_prompt: str = setting('[filewords]', 'Class prompt', "Prompt for class images, e.g. 'a photo of a dog'. [filewords] uses the instance captions without the instance token.", group='class', kind='prompt')
    class_negative_prompt: str = setting('', 'Class negative prompt', 'Negative prompt used when generating class images.', group='class', kind='prompt')
    num_class_images_per_image: int = setting(0, 'Class images per instance image', 'How many class images per instance image. 0 turns prior preservation off for this concept.', group='class', min=0, max=1000)
    class_guidance_scale: float = setting(7.5, 'Class CFG scale', 'Classifier-free guidance scale for generating class images.', group='class', min=0, max=50, step=0.5)
    class_infer_steps: int = setting(40, 'Class generation steps', 'Denoising steps per generated class image.', group='class', min=1, max=200)
    # sample
    sample_prompt: str = setting('', 'Sample prompt', 'Prompt for preview images. Empty: the instance prompt of the first instance image. [filewords] allowed.', group='sample', kind='prompt')
    sample_prompt_file: str = setting('', 'Sample prompt template file', 'A UTF-8 text file with one preview prompt per line (at most 64; blank lines and lines starting with # are skipped; [filewords] allowed). When set, each preview renders every prompt of the file instead of the sample prompt.', group='sample', kind='path')
    sample_negative_prompt: str = setting('', 'Sample negative prompt', 'Negative prompt for preview images.', group='sample', kind='prompt')
    num_samples: int = setting(1, 'Samples per preview', 'How many preview images to make for this concept each time.', group='sample', min=0, max=16)
    sample_seed: int = setting(420, 'Sample seed', 'Seed for preview images; -1 draws a new one each time.', group='sample', min=-1, max=2**31 - 1)
    sample_guidance_scale: float = setting(7.5, 'Sample CFG scale', 'Classifier-free guidance scale for preview images.', group='sample', min=0, max=50, step=0.5)
    sample_infer_steps: int = setting(30, 'Sample steps', 'Denoising steps per preview image.', group='sample', min=1, max=200)


@dataclass(frozen=True)
class Parameters:
    # learning rate
    learning_rate: float = setting(2e-06, 'UNet learning rate', 'Learning rate of the UNet. 1e-6 to 5e-6 is usual for a full fine-tune.', group='learning rate', min=0, max=1, kind='scientific')
    text_encoder_learning_rate: float = setting(1e-06, 'Text encoder learning rate', 'Learning rate of the text encoder(s), applied as a separate parameter group.', group='learning rate', min=0, max=1, kind='scientific')
    text_encoder_2_lr_scale: float = setting(1.0, 'Second text encoder rate multiplier', "SDXL: the second text encoder (OpenCLIP) learns at this multiple of the text encoder's rate; 0: it does not learn.", group='learning rate', min=0, max=10, step=0.05)
    unet_down_lr_scale: float = setting(1.0, 'UNet down blocks rate multiplier', "The UNet's down blocks learn at this multiple of its rate (block-wise learning rates); 0 freezes them in effect.", group='learning rate', min=0, max=10, step=0.05)
    unet_mid_lr_scale: float = setting(1.0, 'UNet mid block rate multiplier', "The UNet's middle block learns at this multiple of its rate.", group='learning rate', min=0, max=10, step=0.05)
    unet_up_lr_scale: float = setting(1.0, 'UNet up blocks rate multiplier', "The UNet's up blocks learn at this multiple of its rate.", group='learning rate', min=0, max=10, step=0.05)
    lr_scheduler: str = setting('constant_with_warmup', 'Learning rate scheduler', 'How the learning rate changes over training.', group='learning rate', choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, 'Warmup steps', 'Steps over which the learning rate ramps up from 0.', group='learning rate', min=0, max=100000)
    lr_cycles: int = setting(1, 'Restart cycles', 'Number of hard restarts for cosine_with_restarts.', group='learning rate', min=1, max=100)
    lr_power: float = setting(1.0, 'Polynomial power', 'Power of the polynomial scheduler.', group='learning rate', min=0.1, max=10, step=0.1)
    # intervals
    num_train_epochs: int = setting(100, 'Training epochs', 'Epochs = steps per instance image. 100 is a good start for 5 images.', group='intervals', min=1, max=100000)
    max_train_steps: int = setting(0, 'Max training steps', 'Stop after this many optimizer steps. 0: use the epochs.', group='intervals', min=0, max=10000000)
    save_every_n_epochs: int = setting(25, 'Save checkpoint every N epochs', '0: only at the end.', group='intervals', min=0, max=100000)
    sample_every_n_epochs: int = setting(25, 'Preview every N epochs', '0: no previews during training.', group='intervals', min=0, max=100000)
    pause_every_n_epochs: int = setting(0, 'Pause every N epochs', 'Rest (e.g. to let the GPU cool down) after every N epochs; 0: never.', group='intervals', min=0, max=100000)
    validation_every_n_steps: int = setting(0, 'Validation interval (steps)', 'Measure the loss on held-out images every N steps, at fixed timesteps and noise so the curve compares across steps (charted beside the training loss); 0: off.', group='intervals', min=0, max=100000)
    validation_holdout: int = setting(0, 'Validation images held out', "With validation on, keep this many of each concept's instance images out of training to measure on (when the concept has no validation folder). 0: the fixed-noise loss on the training images themselves.", group='intervals', min=0, max=100)
    pause_seconds: int = setting(60, 'Pause length (seconds)', 'How long each of those rests lasts; Cancel ends it at once.', group='intervals', min=0, max=86400)
    # batch
    train_batch_size: int = setting(1, 'Batch size', 'Instance images per step (class images are added alongside).', group='batch', min=1, max=256)
    gradient_accumulation_steps: int = setting(1, 'Gradient accumulation steps', 'Micro-batches per optimizer step.', group='batch', min=1, max=1024)
    class_batch_size: int = setting(1, 'Class generation batch size', 'Class images generated at once before training; more is faster on a big GPU and needs more memory.', group='batch', min=1, max=64)
    # performance
    optimizer: str = setting('adamw_8bit', 'Optimizer', 'AdamW, 8-bit AdamW (bitsandbytes; least memory), Adafactor, Prodigy (finds its own step size: the learning rates only say which parts train), Lion (a third to a tenth of the AdamW rate), schedule-free AdamW or CAME. Prodigy and schedule-free use a constant learning rate.', group='performance', choices=OPTIMIZERS)
    mixed_precision: str = setting('fp16', 'Mixed precision', 'fp16 for most cards, bf16 for RTX 30xx and newer; no for full fp32.', group='performance', choices=PRECISIONS)
    attention: str = setting('sdpa', 'Attention backend', 'PyTorch SDPA (default), xformers (when installed, GPU only) or the plain implementation.', group='performance', choices=ATTENTION)
    compile_unet: bool = setting(False, 'Compile the UNet', 'torch.compile the UNet for faster steps on a GPU. The first step of each image size (each aspect bucket) compiles first, a minute or more; needs PyTorch 2.2+ and a working compiler, else it trains as usual with a warning.', group='performance')
    channels_last: bool = setting(False, 'Channels-last layout', "Hold the UNet's and VAE's convolution weights in channels-last memory layout, the one NVIDIA tensor cores run fp16/bf16 convolutions in (PyTorch otherwise converts around each one). The weights and files are the same either way.", group='performance')
    autotune_convolutions: bool = setting(False, 'Autotune convolutions', "Let cuDNN time its convolution algorithms at the first step of each image size and keep the fastest (NVIDIA GPUs). That first step takes a few seconds longer, and the fastest algorithm may use more memory than the plan shows.", group='performance')
    gradient_checkpointing: bool = setting(False, 'Gradient checkpointing', 'Trade about 20% speed for much less memory.', group='performance')
    cache_latents: bool = setting(True, 'Cache latents', 'Encode images once with the VAE and keep the latents; faster, disables random crop and flip variety.', group='performance')
    adam_beta1: float = setting(0.9, 'Adam beta1', 'First-moment decay of AdamW.', group='performance', min=0, max=1, step=0.01)
    adam_beta2: float = setting(0.999, 'Adam beta2', 'Second-moment decay of AdamW.', group='performance', min=0, max=1, step=0.001)
    adam_epsilon: float = setting(1e-08, 'Adam epsilon', 'Numerical stabiliser of AdamW.', group='performance', min=0, max=1, kind='scientific')
    weight_decay: float = setting(0.01, 'Weight decay', 'Decoupled weight decay.', group='performance', min=0, max=1, step=0.001)
    max_grad_norm: float = setting(1.0, 'Max gradient norm', 'Gradient clipping; 0 turns it off.', group='performance', min=0, max=1000)
    train_text_encoder_ratio: float = setting(0.25, 'Text encoder step ratio', 'The text encoder trains for this fraction of the steps (rounded, at least one step), then freezes. 0: never.', group='performance', min=0, max=1, step=0.05)
    offset_noise: float = setting(0.0, 'Offset noise', 'Adds a per-channel constant to the noise so the model learns very dark and bright images. 0.05-0.1 typical; 0 off.', group='performance', min=0, max=1, step=0.01)
    use_ema: bool = setting(False, 'Use EMA', 'Keep an exponential moving average of the UNet weights.', group='performance')
    ema_decay: float = setting(0.999, 'EMA decay', 'Decay of the moving average.', group='performance', min=0, max=1, step=0.0001)
    # memory (`python -m dreambooth plan NAME` predicts the peak GPU memory of these choices)
    fused_backward_step: bool = setting(True, 'Optimizer step in the backward pass', 'Update each weight and free its gradient as soon as the gradient is ready: gradients never all exist at once (saves 4 bytes per trained parameter). Gradient clipping is then per tensor (each gradient clipped to the max norm on its own), and with fp16 a tensor whose gradient overflowed skips that step. With gradient accumulation > 1 or several GPUs the plain step is used (with a warning).', group='memory')
    pure_bf16: bool = setting(False, 'Pure bf16 weights', 'Hold the trained weights and their gradients in bf16 (4 bytes per parameter instead of 8), updated in fp32 with stochastic rounding so small updates are not lost. Implies bf16 compute; needs a GPU with bf16 (RTX 30xx and newer), else it is turned off with a warning.', group='memory')
    frozen_precision: str = setting('half', 'Frozen parts precision', 'half: the VAE and frozen text encoders run in the mixed-precision type on the GPU (bf16 or fp16; the SDXL VAE stays fp32 under fp16, where it overflows); full: fp32.', group='memory', choices=('half', 'full'))
    # loss
    prior_loss_weight: float = setting(1.0, 'Prior loss weight', 'Weight of the class (prior preservation) loss: loss = MSE(instance) + weight x MSE(class).', group='loss', min=0, max=100, step=0.05)
    prior_loss_weight_min: float = setting(0.1, 'Minimum prior loss weight', 'With prior loss scaling on, the prior loss weight falls to this value and then stays there.', group='loss', min=0, max=100, step=0.05)
    prior_loss_scale_epochs: int = setting(0, 'Prior loss scaling epochs', 'Lower the prior loss weight linearly from the prior loss weight to the minimum over this many epochs, then keep the minimum. 0: off (the weight stays as set).', group='loss', min=0, max=100000)
    min_snr_gamma: float = setting(0.0, 'Min-SNR gamma', "Min-SNR loss weighting (5 is typical); 0 uses the paper's plain MSE.", group='loss', min=0, max=100, step=0.5)
    masked_loss: bool = setting(False, 'Masked loss', "Learn only where an instance image's mask is white: NAME.mask.png beside the image (never trained as an image itself), else its alpha channel; images without one are learnt whole.", group='loss')
    loss_type: str = setting('mse', 'Loss', 'mse: the paper\'s squared error; huber / smooth_l1: pseudo-Huber losses, less swayed by outliers (odd images, bad captions).', group='loss', choices=LOSS_TYPES)
    huber_delta: float = setting(0.1, 'Huber delta', 'Where the Huber and smooth-L1 losses turn from squared to linear (the pseudo-Huber c).', group='loss', min=0.0001, max=10, step=0.0001)
    huber_schedule: str = setting('snr', 'Huber delta schedule', 'constant: the delta at every timestep; snr: the delta grows toward 1 at low-noise timesteps (Khrapov et al. 2024).', group='loss', choices=HUBER_SCHEDULES)
    debiased_estimation: bool = setting(False, 'Debiased estimation', 'Weight each timestep by 1/sqrt(SNR) (Yu et al. 2024): less weight on nearly clean images.', group='loss')
    zero_terminal_snr: bool = setting(False, 'Zero terminal SNR', 'Rescale the noise schedule so the last timestep is pure noise (Lin et al. 2023): true blacks and whites. v-prediction models only.', group='loss')
    input_perturbation: float = setting(0.0, 'Input perturbation', 'Perturb the noise the image is noised with, not the target (Ning et al. 2023); 0.1 typical, 0 off.', group='loss', min=0, max=1, step=0.01)
    multires_noise_iterations: int = setting(0, 'Multi-resolution noise levels', 'Add noise drawn at 1/2, 1/4, ... of the latent size (pyramid noise, Whitaker 2023); 6 typical, 0 off.', group='loss', min=0, max=10)
    multires_noise_discount: float = setting(0.3, 'Multi-resolution noise discount', 'Weight of each coarser level relative to the one above it.', group='loss', min=0, max=1, step=0.01)
    # image processing
    resolution: int = setting(512, 'Resolution', "Training resolution (the family's native one by default).", group='image processing', min=64, max=4096, step=64)
    aspect_ratio_bucketing: bool = setting(True, 'Aspect-ratio bucketing', 'Group images by aspect ratio instead of cropping them all square.', group='image processing')
    crop: str = setting('center', 'Crop', 'How an image is cropped to its bucket.', group='image processing', choices=('center', 'random'))
    hflip: bool = setting(False, 'Horizontal flip', 'Randomly mirror images (not for asymmetric subjects such as text or faces with a parting).', group='image processing')
    seed: int = setting(1234, 'Seed', 'Seed for noise, timesteps, shuffling and augmentation.', group='image processing', min=0, max=2**31 - 1)
    # captions (instance prompts only; class prompts stay as the class images were made)
    caption_dropout: float = setting(0.0, 'Caption dropout', 'Probability of training an instance image on the empty prompt, so the subject also comes without its words; 0.05 typical, 0 off.', group='captions', min=0, max=1, step=0.01)
    shuffle_tags: bool = setting(False, 'Shuffle caption tags', 'Shuffle the comma-separated parts of each instance prompt, anew every epoch (for tag-style captions).', group='captions')
    keep_tokens: int = setting(1, 'Tags kept in place', 'The first N comma-separated parts stay first and are never dropped (keep the identifier there).', group='captions', min=0, max=100)
    tag_dropout: float = setting(0.0, 'Tag dropout', 'Probability of leaving out each comma-separated part after the kept ones; 0 off.', group='captions', min=0, max=1, step=0.01)
    # saving
    checkpoint_format: str = setting('safetensors', 'Checkpoint format', 'safetensors (safe, fast) or ckpt.', group='saving', choices=('safetensors', 'ckpt'))
    save_half: bool = setting(True, 'Save fp16 checkpoint', 'Write the checkpoint in half precision (half the size).', group='saving')
    save_ema_weights: bool = setting(True, 'Export EMA weights', 'When EMA is on, export the averaged UNet instead of the raw one.', group='saving')
    save_during_training: bool = setting(True, 'Save checkpoints during training', 'Off: a checkpoint only at the end (and on cancel), whatever the save interval.', group='saving')
    checkpoint_name: str = setting('', 'Checkpoint file name', "The checkpoint files are NAME_<step>; empty: the model's name.", group='saving')
    save_on_end: bool = setting(True, 'Save at the end', 'Export a checkpoint when training finishes.', group='saving')
    save_on_cancel: bool = setting(True, 'Save on cancel', 'Export a checkpoint when training is cancelled.', group='saving')
    keep_saves: int = setting(1, 'Saves to go back to', 'How many of the latest saves keep their full training state, so a run can go back to one of them and go on from there. Each kept save takes its size on disk (the trained weights and the optimizer state); 1: only the latest.', group='saving', min=1, max=100)
    # fidelity
    fidelity_scores: bool = setting(False, 'Score subject fidelity at every save', "At each save, render a fixed set of images (the sample prompts and the subject in new scenes) and score them against the instance photos: DINO and CLIP-I (is it the subject?), CLIP-T (does it follow the prompt?) and a copy score (is it reproducing the photos?). The best save is named in the tab and the CLI. Needs the two scoring models below; costs a few seconds per save on a GPU.", group='fidelity')
    fidelity_clip_model: str = setting('', 'Fidelity CLIP model', "A local folder or a Hugging Face id (from the cache, or downloaded when online) of a transformers CLIPModel with safetensors weights. Empty: the webui's Settings › DreamBooth, else openai/clip-vit-base-patch32.", group='fidelity', kind='path')
    fidelity_dino_model: str = setting('', 'Fidelity DINO model', "A local folder or a Hugging Face id of a self-supervised DINO ViT (transformers, safetensors weights). Empty: the webui's Settings › DreamBooth, else facebook/dino-vits16.", group='fidelity', kind='path')
    fidelity_images_per_prompt: int = setting(2, 'Fidelity images per prompt', 'Images rendered for each evaluation prompt, with fixed seeds (the same at every save).', group='fidelity', min=1, max=8)
    fidelity_infer_steps: int = setting(25, 'Fidelity sampling steps', 'Denoising steps of each evaluation image.', group='fidelity', min=1, max=150)
    fidelity_prompt_margin: float = setting(0.02, 'Prompt fidelity margin', "The best save keeps its CLIP-T within this of the first save's: a subject learnt at the cost of ignoring the prompt does not count.", group='fidelity', min=0, max=1, step=0.005)
    fidelity_copy_limit: float = setting(0.95, 'Copy limit', 'Saves whose copy score (the closest match of each image to one training photo) is above this are not picked as the best: the model reproduces its photos.', group='fidelity', min=0, max=1, step=0.01)
    fidelity_patience: int = setting(0, 'Stop after saves without a better one', 'Stop training when this many scored saves in a row did not give a better best save; 0: never stop early.', group='fidelity', min=0, max=1000)
    # lora
    use_lora: bool = setting(False, 'Use LoRA', "Train small low-rank adapters instead of the whole model: far less memory, a few-MB file (models/Lora) for the webui's <lora:NAME:1>.", group='lora')
    lora_type: str = setting('lora', 'Adapter type', "lora: the usual low-rank adapter, read by every LoRA loader; loha: a Hadamard product of two low-rank pairs, more expressive at the same rank; lokr: a Kronecker product, the smallest files; dora: a LoRA with a trained magnitude per input column (closer to a full fine-tune, a little slower). LoHa, LoKr and DoRA are written as LyCORIS files, which the webui's built-in Lora extension, Forge and ComfyUI load like a LoRA.", group='lora', choices=ADAPTER_TYPES)
    lora_unet_rank: int = setting(16, 'UNet LoRA rank', 'Rank (dim) of the UNet adapters: 4-32 is usual; higher learns more detail and makes a bigger file.', group='lora', min=1, max=1024)
    lora_unet_alpha: float = setting(16.0, 'UNet LoRA alpha', 'The adapters are scaled by alpha / rank; alpha = rank applies them as trained.', group='lora', min=0.01, max=1024, step=0.5)
    lora_text_encoder_rank: int = setting(8, 'Text encoder LoRA rank', 'Rank of the text-encoder adapters (both encoders for SDXL); they train for the text-encoder step ratio.', group='lora', min=1, max=1024)
    lora_text_encoder_alpha: float = setting(8.0, 'Text encoder LoRA alpha', 'The text-encoder adapters are scaled by alpha / rank.', group='lora', min=0.01, max=1024, step=0.5)
    lora_unet_learning_rate: float = setting(1e-4, 'UNet LoRA learning rate', 'Learning rate of the UNet adapters (replaces the UNet learning rate when LoRA is on).', group='lora', min=0, max=1, kind='scientific')
    lora_text_encoder_learning_rate: float = setting(5e-5, 'Text encoder LoRA learning rate', 'Learning rate of the text-encoder adapters.', group='lora', min=0, max=1, kind='scientific')
    lora_dropout: float = setting(0.0, 'LoRA dropout', "Dropout on the adapters' input during training (LoHa, LoKr: on rows of their change); 0.05-0.1 can curb overfitting.", group='lora', min=0, max=0.9, step=0.01)
    lora_layers: str = setting('attention', 'LoRA layers', 'attention: the attention projections only (the usual LoRA); attention+ff+conv: also feed-forward, transformer in/out projections and resnet convolutions (more capacity, bigger file).', group='lora', choices=('attention', 'attention+ff+conv'))
    lora_preview_weight: float = setting(1.0, 'LoRA preview weight', 'Weight of the adapters in preview images, like <lora:NAME:weight> in the webui.', group='lora', min=0, max=2, step=0.05)
    lora_export_merged: bool = setting(False, 'Also export the merged checkpoint', 'Besides the LoRA file, write the model with the adapters merged in as a full checkpoint (models/Stable-diffusion), on the same schedule.', group='lora')


MODEL_SETTINGS = settings_of(ModelSettings)
CONCEPT_SETTINGS = settings_of(Concept)
PARAMETER_SETTINGS = settings_of(Parameters)
# The Parameters panel's order: what users change most often first.
GROUPS = ("intervals", "learning rate", "lora", "batch", "image processing", "captions", "loss", "saving", "fidelity",
          "performance", "memory")


# ---------------------------------------------------------------- rules relating several settings


@dataclass(frozen=True)
class Rule:
    """A check across settings of one section. `settings` names the fields it marks in the UI; `training`: checked
    only when a training starts (a config being edited may be incomplete)."""

    settings: tuple[str, ...]
    check: Callable[[Any], str | None]
    training: bool = False


def _folder_missing(path: str) -> bool:
    return not Path(path).expanduser().is_dir()


def _label(settings_section, name: str) -> str:
    return next(s.label for s in settings_of(settings_section) if s.name == name)


def _prompt_file_problem(concept) -> str | None:
    from .prompt_files import prompt_file_problem

    return prompt_file_problem(concept.sample_prompt_file) if concept.sample_prompt_file.strip() else None


def _prior_minimum_problem(p) -> str | None:
    if p.prior_loss_scale_epochs > 0 and p.prior_loss_weight_min > p.prior_loss_weight:
        return (f"{p.prior_loss_weight_min:g} is above the {_label(Parameters, 'prior_loss_weight')} "
                f"({p.prior_loss_weight:g}); with {_label(Parameters, 'prior_loss_scale_epochs')} on, the weight "
                f"can only fall to the minimum")
    return None


CONCEPT_RULES: tuple[Rule, ...] = (
    Rule(("instance_data_dir",), lambda c: f"{c.instance_data_dir!r} is not a folder"
         if _folder_missing(c.instance_data_dir) else None, training=True),
    # A class folder of your own is read only when prior preservation is on for the concept.
    Rule(("class_data_dir",), lambda c: f"{c.class_data_dir!r} is not a folder"
         if c.num_class_images_per_image > 0 and c.class_data_dir.strip() and _folder_missing(c.class_data_dir)
         else None, training=True),
    # Read when training starts (the file may be written after the config); the trainer reads it again at setup.
    Rule(("sample_prompt_file",), _prompt_file_problem, training=True),
)
PARAMETER_RULES: tuple[Rule, ...] = (
    Rule(("checkpoint_name",), lambda p: "use letters, digits, spaces and _ - . (no folders)"
         if p.checkpoint_name.strip() and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}", p.checkpoint_name.strip())
         else None),
    # LoRA keeps the model's weights as they are: an average of them would only copy the base.
    Rule(("use_ema",), lambda p: "cannot be used with LoRA (use_lora); turn one of them off"
         if p.use_ema and p.use_lora else None),
    Rule(("prior_loss_weight_min", "prior_loss_weight"), _prior_minimum_problem),
)


def _apply_rules(rules, section, where: tuple, training: bool, problems: list) -> None:
    for rule in rules:
        if rule.training and not training:
            continue
        message = rule.check(section)
        if message:
            problems.append(Problem(where + (rule.settings[0],), message))


# ---------------------------------------------------------------- the config


def _parse_section(where: tuple, data: Any, settings: tuple[Setting, ...], cls, problems: list):
    if not isinstance(data, dict):
        problems.append(Problem(where, f"expected an object, got {type(data).__name__}"))
        return cls()
    known = {s.name: s for s in settings}
    values = {}
    for key, value in data.items():
        if key not in known:
            problems.append(Problem(where + (_short(key).strip("'"),), "unknown setting"))
            continue
        value, error = known[key].check(value)
        if error:
            problems.append(Problem(where + (key,), error))
        else:
            values[key] = value
    return cls(**values)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, without recursing past `limit`."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON from a file or a request, bounded: size, nesting depth, UTF-8, no NaN/Infinity. Errors name `what` and
    never echo the content."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: too large ({len(data)} bytes; at most {MAX_CONFIG_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 text") from e

    def no_constants(name: str):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        value = json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, ValueError) as e:
        detail = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ConfigError(f"{what}: not valid JSON ({detail})") from e
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ConfigError(f"{what}: nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return value


@dataclass(frozen=True)
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    concepts: tuple = ()
    parameters: Parameters = field(default_factory=Parameters)

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

    def with_model(self, model: ModelSettings) -> "Config":
        """The same settings for another model section (the model's own, which `create` fixed)."""
        return replace(self, model=model)

    def problems(self, training: bool = False) -> list[Problem]:
        """The declared cross-setting rules that this config breaks."""
        problems: list[Problem] = []
        for i, concept in enumerate(self.concepts):
            if concept.instance_data_dir.strip():
                _apply_rules(CONCEPT_RULES, concept, ("concepts", i), training, problems)
        _apply_rules(PARAMETER_RULES, self.parameters, ("parameters",), training, problems)
        return problems

    @staticmethod
    def from_dict(data: Any) -> "Config":
        problems: list[Problem] = []
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected an object, got {type(data).__name__}")
        for key in data:
            if key not in ("version", "model", "concepts", "parameters"):
                problems.append(Problem((_short(key).strip("'"),), "unknown section"))
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            problems.append(Problem(("version",), f"{_short(version)} is not supported (expected {CONFIG_VERSION})"))
        model = _parse_section(("model",), data.get("model", {}), MODEL_SETTINGS, ModelSettings, problems)
        raw_concepts = data.get("concepts", [])
        concepts = []
        if not isinstance(raw_concepts, list):
            problems.append(Problem(("concepts",), "expected a list"))
        elif len(raw_concepts) > 100:
            problems.append(Problem(("concepts",), f"{len(raw_concepts)} concepts; at most 100"))
        else:
            for i, c in enumerate(raw_concepts):
                concepts.append(_parse_section(("concepts", i), c, CONCEPT_SETTINGS, Concept, problems))
        parameters = _parse_section(("parameters",), data.get("parameters", {}), PARAMETER_SETTINGS, Parameters,
                                    problems)
        if problems:
            raise ConfigError(problems)
        config = Config(model=model, concepts=tuple(concepts), parameters=parameters)
        if config.problems():
            raise ConfigError(config.problems())
        return config

    @staticmethod
    def load(path: Path) -> "Config":
        from .store import read_bytes

        path = Path(path)
        try:
            data = read_bytes(path, limit=MAX_CONFIG_BYTES + 1)  # never waits on a FIFO, never reads a folder
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except UserError as e:
            raise ConfigError(str(e)) from e
        return Config.from_dict(parse_json(data, str(path)))

    def save(self, path: Path) -> None:
        from .store import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def validate_for_training(config: Config) -> None:
    """Checks that only matter when training starts (a config being edited may be incomplete)."""
    problems = [] if config.active_concepts else [Problem(("concepts",), "no concept has an instance images folder")]
    problems += config.problems(training=True)
    if config.parameters.zero_terminal_snr and family(config.model.family).prediction_type != "v_prediction":
        problems.append(Problem(("parameters", "zero_terminal_snr"), (
            f"needs a v-prediction model; this {config.model.family} model predicts noise (epsilon), whose last "
            "timestep would then carry no signal to predict")))
    if problems:
        raise ConfigError(problems)


def describe(changes: dict) -> str:
    """Parameter changes in the words of the tab and the CLI: "Optimizer: adamw_8bit (optimizer), Pure bf16 weights:
    on (pure_bf16)"."""
    labels = {s.name: s.label for s in PARAMETER_SETTINGS}

    def shown(value):
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    return ", ".join(f"{labels.get(k, k)}: {shown(v)} ({k})" for k, v in changes.items())


def parse_overrides(assignments: list[str], settings: tuple = PARAMETER_SETTINGS,
                    section: str = "parameters") -> dict[str, Any]:
    """`name=value` pairs for parameters (the CLI's `--set`) or another section's settings, each checked against its
    declaration."""
    known = {s.name: s for s in settings}
    overrides = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"{item!r}: expected NAME=VALUE")
        if name not in known:
            raise ConfigError(Problem((section, _short(name).strip("'")), "unknown setting"))
        overrides[name] = known[name].parse(text)
    return overrides


__all__ = [
    "Setting", "Config", "ConfigError", "Concept", "Parameters", "ModelSettings", "MODEL_SETTINGS", "CONCEPT_SETTINGS",
    "PARAMETER_SETTINGS", "HOST_SETTINGS", "GROUPS", "FAMILIES", "MIN_CONCEPTS", "Problem", "Rule", "CONCEPT_RULES",
    "PARAMETER_RULES", "validate_for_training", "parse_overrides", "describe", "parse_json", "replace", "fields",
    "setting",
]
