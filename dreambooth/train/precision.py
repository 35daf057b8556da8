"""What the training device can do, and the dtypes a run uses on it: the one place that asks `torch.cuda`.

`detect(device)` says whether the device is a CUDA GPU and whether it computes in bf16. Every precision decision
(the accelerator's mixed precision, pure bf16, the dtype of the trained and of the frozen parts, the VAE's, the dtype
previews and class images are computed in) is `DtypePlan.decide(params, hardware, sdxl)`, from those two facts alone.
The CPU tests replace `detect` so that a run makes a GPU's decisions while its tensors stay on the CPU.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    gpu: bool   # a CUDA GPU (else a CPU)
    bf16: bool  # computes in bf16: CPUs do, GPUs from Ampere (compute capability 8) on


CPU = Hardware(gpu=False, bf16=True)


def training_device() -> torch.device:
    """This process's device: its GPU under `accelerate launch` (LOCAL_RANK), else the current CUDA device (which
    CUDA_VISIBLE_DEVICES chose), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def detect(device) -> Hardware:
    """The facts of `device` (a GPU's own, never device 0's)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _minor = torch.cuda.get_device_capability(index)
    return Hardware(gpu=True, bf16=major >= 8)


def peak_memory_mb(device) -> float:
    """The run's peak memory so far: allocated on the GPU, else the process's resident set."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DtypePlan:
    mixed_precision: str   # "no", "fp16" or "bf16": what the step (and generation) autocasts to
    weights: torch.dtype   # the UNet's and the trained text encoders': fp32; bf16 under pure bf16; under LoRA (the
                           # model stays frozen, float32 adapters train) the mixed-precision type
    frozen: torch.dtype    # frozen text encoders (and the VAE): the mixed-precision type when frozen_precision is half
    vae: torch.dtype       # the frozen type, except fp32 for SDXL's VAE under fp16 (it overflows in fp16)

    @property
    def autocast(self) -> torch.dtype | None:
        return _LOW.get(self.mixed_precision)

    @classmethod
    def decide(cls, params, hardware: Hardware, sdxl: bool, warn: bool = True) -> "DtypePlan":
        """The dtypes of a run of `params` on `hardware`; a fallback from what was asked is said in one warning."""
        def say(message: str) -> None:
            if warn:
                warnings.warn(message, stacklevel=3)

        pure = params.pure_bf16 and (hardware.bf16 or not hardware.gpu)
        if params.pure_bf16 and not pure:
            say("pure_bf16: this GPU has no bf16; training with fp32 weights")
        mixed = params.mixed_precision
        if pure:
            mixed = "bf16"  # weights held in bf16 compute in bf16
        elif mixed == "fp16" and not hardware.gpu:
            say("mixed_precision fp16 needs a GPU; training in full precision (fp32) on the CPU")
            mixed = "no"
        elif mixed == "bf16" and hardware.gpu and not hardware.bf16:
            say("mixed_precision bf16: this GPU has no bf16 support; using fp16")
            mixed = "fp16"
        half = params.frozen_precision == "half" and hardware.gpu and mixed in _LOW
        frozen = _LOW[mixed] if half else torch.float32
        vae = torch.float32 if sdxl and frozen == torch.float16 else frozen
        if params.use_lora:  # the model is loaded straight into the type it is kept in: never in fp32 on the GPU
            weights = _LOW.get(mixed, torch.float32)
        else:
            weights = torch.bfloat16 if pure else torch.float32
        return cls(mixed, weights, frozen, vae)
