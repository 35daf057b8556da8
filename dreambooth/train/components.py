"""The working model's parts, loaded for training: what trains, what stays frozen, and how attention runs."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
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
            available = torch.cuda.is_available()
            reason = "no CUDA GPU"
        except ImportError:
            available, reason = False, "xformers is not installed"
        if available:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        warnings.warn(f"attention xformers: {reason}; using PyTorch SDPA instead", stacklevel=2)
        backend = "sdpa"
    unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return backend


def load_components(working: Path, family: str, device, params, resume_from: Path | None = None) -> Components:
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
    noise_scheduler = DDPMScheduler.from_pretrained(working, subfolder="scheduler")

    if torch.device(device).type == "cpu":  # (moving to a GPU gives new memory anyway)
        for module in (unet, vae, *encoders):
            own_aligned_memory(module)
    prepare_for_training(unet, vae, encoders, params, device)
    return Components(unet, vae, tuple(encoders), tuple(tokenizers), noise_scheduler, sdxl)


def own_aligned_memory(module: torch.nn.Module) -> None:
    """Give each weight torch's own 64-byte-aligned memory.

    Weights read from safetensors files can sit at any address, and CPU matrix kernels (MKL) round differently by
    alignment: without this, a resumed run drifts by float noise from an uninterrupted one."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def _gpu(device, gpu: tuple | None) -> tuple[bool, bool]:
    """(on a GPU, the GPU has bf16) for `device`, or as given (the memory plan decides for a GPU it does not have)."""
    if gpu is not None:
        return gpu
    on_gpu = torch.device(device).type == "cuda"
    return on_gpu, on_gpu and torch.cuda.is_bf16_supported()


def pure_bf16_active(params, device, gpu_bf16: bool | None = None) -> bool:
    """Pure bf16 is on when asked for and the device has bf16 (CPUs do; GPUs from Ampere on)."""
    if not params.pure_bf16:
        return False
    on_gpu, bf16 = _gpu(device, None if gpu_bf16 is None else (torch.device(device).type == "cuda", gpu_bf16))
    return bf16 or not on_gpu


def frozen_dtype(params, device, gpu: tuple | None = None) -> torch.dtype:
    """The dtype of the VAE and frozen text encoders: the mixed-precision type on a GPU when frozen_precision is half."""
    on_gpu, bf16 = _gpu(device, gpu)
    if params.frozen_precision != "half" or not on_gpu:
        return torch.float32
    if params.mixed_precision == "bf16" or params.pure_bf16:
        return torch.bfloat16 if bf16 else torch.float16
    return torch.float16 if params.mixed_precision == "fp16" else torch.float32


def prepare_for_training(unet, vae, text_encoders, params, device, gpu: tuple | None = None) -> bool:
    """Attention backend, dtypes, train/eval modes, what gets gradients, checkpointing; returns whether text encoders
    train.

    The trainer, the benchmark and the memory plan all call this, so they see the model exactly as training sets it
    up. `gpu` = (on a GPU, with bf16) overrides what `device` says (the plan traces on the CPU for a GPU).
    """
    set_attention(unet, params.attention)
    on_gpu, bf16 = _gpu(device, gpu)
    pure = params.pure_bf16 and (bf16 or not on_gpu)
    if params.pure_bf16 and not pure:
        warnings.warn("pure_bf16: this GPU has no bf16; training with fp32 weights", stacklevel=2)
    trained_dtype = torch.bfloat16 if pure else torch.float32
    unet.train().requires_grad_(True).to(device, trained_dtype)
    trainable = trains_text_encoder(params.train_text_encoder_ratio)
    frozen = frozen_dtype(params, device, (on_gpu, bf16))
    for te in text_encoders:
        te.requires_grad_(trainable).train(trainable).to(device, trained_dtype if trainable else frozen)
    sdxl_fp16 = len(text_encoders) == 2 and frozen == torch.float16  # the SDXL VAE overflows in fp16
    vae.requires_grad_(False).eval().to(device, torch.float32 if sdxl_fp16 else frozen)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trainable:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    return trainable
