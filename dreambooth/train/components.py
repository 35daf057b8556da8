"""The working model's parts, loaded for training: what trains, what stays frozen, and how attention runs."""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .precision import DtypePlan
from .schedule import trains_text_encoder
from .saves import damaged, recover_folder

log = logging.getLogger("dreambooth")


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    tokenizers: tuple
    noise_scheduler: object
    sdxl: bool


def set_attention(unet, backend: str) -> str:
    """Apply the attention backend; xformers falls back to SDPA (one warning) where it cannot run."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "xformers":
        try:
            import xformers  # noqa: F401
            available = next(unet.parameters()).device.type == "cuda"
            reason = "the model is not on a CUDA GPU"
        except ImportError:
            available, reason = False, "xformers is not installed"
        if available:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        warnings.warn(f"attention xformers: {reason}; using PyTorch SDPA instead", stacklevel=2)
        backend = "sdpa"
    unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return backend


COMPILE_BACKEND = "inductor"


def compile_unet(unet) -> bool:
    """torch.compile the UNet's forward in place (its weights, names and saving stay as they are); False, with one
    warning, where this PyTorch cannot (before 2.2). A compiler failure shows at the first step: see `uncompile`."""
    if not hasattr(unet, "compile"):
        warnings.warn("compile_unet: needs PyTorch 2.2 or newer; training without compiling", stacklevel=2)
        return False
    unet.compile(backend=COMPILE_BACKEND)
    return True


def autotune_convolutions(on: bool, device) -> None:
    """cuDNN times the candidate algorithms of each convolution at its first run with a new shape (each aspect
    bucket) and keeps the fastest, instead of choosing by its heuristics. A switch for the whole process, so it is
    set only for a CUDA device, which only the training process trains on (the memory plan, traced in the webui's
    process, leaves it alone)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = on


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompile(module) -> None:
    """Back to the eager forward (after a compiler failure)."""
    module._compiled_call_impl = None


@contextlib.contextmanager
def eager(module):
    """The module's eager forward inside the block (previews: their shapes would each compile anew)."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def is_channels_last(module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in module.parameters())


@contextlib.contextmanager
def default_layout(module):
    """The module's weights in PyTorch's default (contiguous) layout inside the block, channels-last again after it:
    safetensors before 0.4.3 (the webui's) refuses to write a channels-last tensor. Same values, same parameters."""
    if not is_channels_last(module):
        yield
        return
    module.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        module.to(memory_format=torch.channels_last)


def training_scheduler(scheduler, params):
    """The noise schedule training draws from: the model's own, or with zero_terminal_snr its betas rescaled so the
    last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1; diffusers' rescale_betas_zero_snr). Previews sample with the same schedule."""
    if not params.zero_terminal_snr:
        return scheduler
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def load_components(working: Path, family: str, device, params, dtypes: DtypePlan,
                    resume_from: Path | None = None) -> Components:
    """The model's parts from working/; trained parts from `resume_from` (a saved state folder) where it has them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    working = Path(working)
    for part in ("unet", "text_encoder", "text_encoder_2", "unet_ema"):
        recover_folder(working / part)
    if not (working / "unet").is_dir():
        raise UserError(f"{working}: the working model is missing its unet folder (re-create the model)")
    sdxl = (working / "text_encoder_2").is_dir() or family == "sdxl"
    f32 = torch.float32

    def trained(cls, part: str):
        """A trained part: from the saved state when it has it (a damaged one is an error naming it)."""
        if resume_from is None or not (Path(resume_from) / part).is_dir():
            return cls.from_pretrained(working, subfolder=part, torch_dtype=f32, use_safetensors=True)
        try:
            return cls.from_pretrained(resume_from, subfolder=part, torch_dtype=f32, use_safetensors=True)
        except Exception as e:  # truncated or overwritten weights: each library says so its own way
            raise damaged(Path(resume_from) / part, f"its weights cannot be loaded: {type(e).__name__}") from e

    unet = trained(UNet2DConditionModel, "unet")
    vae = AutoencoderKL.from_pretrained(working, subfolder="vae", torch_dtype=f32, use_safetensors=True)
    encoders = [trained(CLIPTextModel, "text_encoder")]
    tokenizers = [CLIPTokenizer.from_pretrained(working, subfolder="tokenizer")]
    if sdxl:
        encoders.append(trained(CLIPTextModelWithProjection, "text_encoder_2"))
        tokenizers.append(CLIPTokenizer.from_pretrained(working, subfolder="tokenizer_2"))
    noise_scheduler = training_scheduler(DDPMScheduler.from_pretrained(working, subfolder="scheduler"), params)

    if torch.device(device).type == "cpu":  # (moving to a GPU gives new memory anyway)
        for module in (unet, vae, *encoders):
            own_aligned_memory(module)
    prepare_for_training(unet, vae, encoders, params, device, dtypes)
    return Components(unet, vae, tuple(encoders), tuple(tokenizers), noise_scheduler, sdxl)


def own_aligned_memory(module: torch.nn.Module) -> None:
    """Give each weight torch's own 64-byte-aligned memory.

    Weights read from safetensors files can sit at any address, and CPU matrix kernels (MKL) round differently by
    alignment: without this, a resumed run drifts by float noise from an uninterrupted one."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def prepare_for_training(unet, vae, text_encoders, params, device, dtypes: DtypePlan) -> bool:
    """Attention backend, dtypes, train/eval modes, what gets gradients, checkpointing; returns whether text encoders
    train.

    The trainer, the benchmark and the memory plan all call this, so they see the model exactly as training sets it
    up; `dtypes` (precision.DtypePlan) says which dtype each part is held in.
    """
    unet.train().requires_grad_(True).to(device, dtypes.weights)
    set_attention(unet, params.attention)  # on its device: xformers runs on a GPU only
    trainable = trains_text_encoder(params.train_text_encoder_ratio)
    for te in text_encoders:
        te.requires_grad_(trainable).train(trainable).to(device, dtypes.weights if trainable else dtypes.frozen)
    vae.requires_grad_(False).eval().to(device, dtypes.vae)
    if params.channels_last:  # the parameters keep their identity: hooks and optimizer see the same tensors
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trainable:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    return trainable
