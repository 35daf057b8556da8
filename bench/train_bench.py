"""Training-step benchmark: time the trainer's step against a diffusers-style reference step.

    .venv/bin/python bench/train_bench.py [--case NAME] [--device cpu|cuda] [--steps N] [--warmup N] [--json OUT]

Both loops run on full-size random-weight architectures (SD1.5: UNet, VAE and CLIP-L text encoder; SDXL: UNet and
VAE, text embeddings cached) built from bench/architectures.py, so nothing is downloaded.

- "ours" is `dreambooth.train.step.TrainStep`, the unit the trainer runs, built by the trainer's own functions
  (`prepare_for_training`, `build_step`) with the trainer's settings.
- "reference" is a step written the way diffusers' examples/dreambooth/train_dreambooth.py writes it: VAE encode every
  step, text encoder forward every step, noise, timesteps, add_noise, UNet forward, MSE, accelerator.backward, clip,
  optimizer.step, lr_scheduler.step, zero_grad, and a `loss.item()` for the progress bar. LoRA cases: as
  train_dreambooth_lora.py sets it up (frozen models in the weight dtype, peft adapters on the attention projections
  with `add_adapter`, float32 adapters, the optimizer over the adapters only), the same loop body.

Every (case, loop) runs in its own subprocess so peak memory (RSS on CPU, peak allocated VRAM on CUDA) does not mix.
Warm-up steps are excluded from the timing. On CUDA the time is taken with CUDA events around the timed steps and
one synchronize at the end; model FLOP utilisation (MFU) = samples/s x UNet forward+backward FLOP per sample divided by
the throughput of a large bf16 matmul measured on the same device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # the product package and the shared architectures

from architectures import ARCHITECTURES, text_encoder_configs  # noqa: E402
from dreambooth.errors import UserError  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "

# UNet forward + backward FLOP per sample at the family's native resolution (from the issue).
UNET_FLOP_PER_SAMPLE = {("sd15", 512): 2.41e12, ("sdxl", 1024): 20.2e12}
NATIVE_RESOLUTION = {**{arch: c["resolution"] for arch, c in ARCHITECTURES.items()}, "tiny": 64}
ARCH_LABEL = {"sd15": "SD1.5", "sdxl": "SDXL", "tiny": "tiny"}


@dataclass(frozen=True)
class Case:
    name: str
    arch: str                 # "sd15", "sdxl" or "tiny" (tests only)
    resolution: int
    batch: int
    precision: str            # "no", "fp16" or "bf16" (mixed precision, as the trainer's setting)
    optimizer: str            # "adamw" or "adamw_8bit"
    cache_latents: bool       # ours: VAE latents computed once; the reference always encodes every step
    train_text_encoder: bool  # False: text encoder(s) frozen
    gradient_checkpointing: bool = False
    lora_rank: int = 0        # > 0: LoRA of this rank (alpha = rank) on the attention layers, not a full fine-tune
    settings: tuple = ()      # further trainer settings as (name, value) pairs, e.g. the memory settings


def _sd15(name, res, batch, precision, optimizer, cache, gc=False):
    return Case(name, "sd15", res, batch, precision, optimizer, cache, True, gc)


CASES = {c.name: c for c in (
    # CPU: the same settings on both sides (latents encoded every step, text encoder trained), a few steps.
    _sd15("sd15-256-cpu", 256, 1, "no", "adamw_8bit", False),
    _sd15("sd15-256-cpu-cached", 256, 1, "no", "adamw_8bit", True),
    # Host work per step (--count-ops): SD1.5 at 128, AdamW, the text encoder trained.
    _sd15("sd15-128-cpu", 128, 1, "no", "adamw", False),
    # The same before the memory settings (plain optimizer step) and with the leanest ones (pure bf16, checkpointing).
    Case("sd15-256-cpu-plain", "sd15", 256, 1, "no", "adamw_8bit", False, True,
         settings=(("fused_backward_step", False),)),
    Case("sd15-256-cpu-lean", "sd15", 256, 1, "no", "adamw_8bit", False, True, True,
         settings=(("pure_bf16", True),)),
    # GPU: SD1.5 at 512, UNet + text encoder.
    _sd15("sd15-512-b1-bf16-adamw", 512, 1, "bf16", "adamw", False),
    _sd15("sd15-512-b1-bf16-adamw-cached", 512, 1, "bf16", "adamw", True),
    _sd15("sd15-512-b1-fp16-adamw-cached", 512, 1, "fp16", "adamw", True),
    _sd15("sd15-512-b1-bf16-adamw8bit-cached", 512, 1, "bf16", "adamw_8bit", True),
    _sd15("sd15-512-b1-fp16-adamw8bit-gc-cached", 512, 1, "fp16", "adamw_8bit", True, gc=True),
    # The product's default settings (fp16, 8-bit AdamW, cached latents, the fused step) with the text encoder trained.
    _sd15("sd15-512-b1-fp16-adamw8bit-cached", 512, 1, "fp16", "adamw_8bit", True),
    _sd15("sd15-512-b8-bf16-adamw", 512, 8, "bf16", "adamw", False),
    _sd15("sd15-512-b8-bf16-adamw-cached", 512, 8, "bf16", "adamw", True),
    _sd15("sd15-512-b8-fp16-adamw-cached", 512, 8, "fp16", "adamw", True),
    _sd15("sd15-512-b8-bf16-adamw8bit-cached", 512, 8, "bf16", "adamw_8bit", True),
    # The same with the UNet compiled (compile_unet; the compile happens in the warm-up steps).
    Case("sd15-512-b1-bf16-adamw-cached-compiled", "sd15", 512, 1, "bf16", "adamw", True, True,
         settings=(("compile_unet", True),)),
    Case("sd15-512-b8-bf16-adamw-cached-compiled", "sd15", 512, 8, "bf16", "adamw", True, True,
         settings=(("compile_unet", True),)),
    # Ours with the plain optimizer step (all gradients, one optimizer call): what the fused step's buckets cost.
    Case("sd15-512-b1-bf16-adamw-cached-plain", "sd15", 512, 1, "bf16", "adamw", True, True,
         settings=(("fused_backward_step", False),)),
    # The same in channels-last layout (channels_last: tensor-core convolutions without layout conversions).
    Case("sd15-512-b1-bf16-adamw-cached-cl", "sd15", 512, 1, "bf16", "adamw", True, True,
         settings=(("channels_last", True),)),
    Case("sd15-512-b8-bf16-adamw-cached-cl", "sd15", 512, 8, "bf16", "adamw", True, True,
         settings=(("channels_last", True),)),
    # With cuDNN's autotuning (autotune_convolutions), alone and with channels-last.
    Case("sd15-512-b8-bf16-adamw-cached-tuned", "sd15", 512, 8, "bf16", "adamw", True, True,
         settings=(("autotune_convolutions", True),)),
    Case("sd15-512-b8-bf16-adamw-cached-cl-tuned", "sd15", 512, 8, "bf16", "adamw", True, True,
         settings=(("channels_last", True), ("autotune_convolutions", True))),
    # SDXL at 1024, UNet only (text encoders frozen, embeddings cached), 8-bit AdamW, gradient checkpointing.
    Case("sdxl-1024-b1-bf16-adamw8bit-gc-cached", "sdxl", 1024, 1, "bf16", "adamw_8bit", True, False, True),
    Case("sdxl-1024-b1-bf16-adamw8bit-gc", "sdxl", 1024, 1, "bf16", "adamw_8bit", False, False, True),
    # LoRA (rank 16 on the attention layers): SD1.5 at 512 with the text encoder, SDXL at 1024 UNet only, batch 1.
    Case("sd15-512-b1-fp16-lora16-cached", "sd15", 512, 1, "fp16", "adamw", True, True, lora_rank=16),
    Case("sd15-512-b1-bf16-lora16-cached", "sd15", 512, 1, "bf16", "adamw", True, True, lora_rank=16),
    Case("sdxl-1024-b1-bf16-lora16-gc-cached", "sdxl", 1024, 1, "bf16", "adamw", True, False, True, lora_rank=16),
    Case("sd15-256-cpu-lora16", "sd15", 256, 1, "no", "adamw", False, True, lora_rank=16),
    # Tiny architecture for the smoke tests.
    Case("tiny", "tiny", 64, 2, "no", "adamw", False, True),
    Case("tiny-lora", "tiny", 64, 2, "no", "adamw", False, True, lora_rank=4),
)}
DEFAULT_CASES = {"cpu": ["sd15-256-cpu"],
                 "cuda": [n for n, c in CASES.items() if c.arch != "tiny" and "-cpu" not in n]}
LOOPS = ("ours", "reference")


# ---------------------------------------------------------------------------------------------------------------
# Architectures: the full-size ones from bench/architectures.py; a tiny one for the smoke test.

TINY = {
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                 norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=32, sample_size=64),
    "text_encoder": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
}


def _configs(arch: str) -> dict:
    return TINY if arch == "tiny" else ARCHITECTURES[arch]


def _text_encoder_configs(arch: str) -> list[dict]:
    return [TINY["text_encoder"]] if arch == "tiny" else text_encoder_configs(arch)


@dataclass
class Models:
    unet: object
    vae: object
    text_encoders: tuple          # empty when the loop uses precomputed text embeddings
    noise_scheduler: object
    sdxl: bool
    context_dim: int


def build_models(arch: str, device, text_encoders: bool = True) -> Models:
    """Random-weight models in fp32, created directly on `device` (fast init on a GPU)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    encoders = []
    with torch.device(device):
        unet = UNet2DConditionModel(**_configs(arch)["unet"])
        vae = AutoencoderKL(**_configs(arch)["vae"])
        if text_encoders:
            configs = _text_encoder_configs(arch)
            for i, config in enumerate(configs):
                cls = CLIPTextModelWithProjection if arch == "sdxl" and i == 1 else CLIPTextModel
                encoders.append(cls(CLIPTextConfig(**config)))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    context_dim = _configs(arch)["unet"]["cross_attention_dim"]
    return Models(unet, vae, tuple(encoders), scheduler, arch == "sdxl", context_dim)


def make_inputs(case: Case, device) -> dict:
    """One fixed batch: pixels in [-1, 1], token ids per tokenizer, SDXL size conditioning and, for loops that
    precompute them, SDXL text embeddings (random: only their shapes matter for timing)."""
    import torch

    g = torch.Generator().manual_seed(1)
    b, r = case.batch, case.resolution
    vocab = _text_encoder_configs(case.arch)[0]["vocab_size"]
    ids = torch.randint(0, vocab - 2, (b, 77), generator=g)
    ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1  # start and end tokens in their usual places
    inputs = {"pixels": (torch.rand(b, 3, r, r, generator=g) * 2 - 1).to(device),
              "input_ids": tuple(ids.to(device) for _ in _text_encoder_configs(case.arch))}
    if case.arch == "sdxl":
        context_dim = _configs(case.arch)["unet"]["cross_attention_dim"]
        inputs["prompt_embeds"] = torch.randn(b, 77, context_dim, generator=g).to(device)
        inputs["pooled_embeds"] = torch.randn(b, 1280, generator=g).to(device)
        inputs["add_time_ids"] = torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32).to(device)
    return inputs


def _weight_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The two loops. Each builder returns a function that runs one training step.

def build_ours(case: Case, models: Models, inputs: dict, device):
    """The trainer's TrainStep built by the trainer's own functions (prepare_for_training as load_components calls it,
    then build_step as Trainer.setup calls it) and what its loop does around each step (Trainer.make_batch: per-image
    VAE encode unless cached, frozen text encoders run once per prompt; the loss read back)."""
    import torch
    from accelerate import Accelerator

    from dreambooth.config import Parameters
    from dreambooth.train.components import Components, prepare_for_training
    from dreambooth.train.loop import build_step
    from dreambooth.train.precision import DtypePlan, detect
    from dreambooth.train.step import Batch, frozen_prompt_embedding

    from dreambooth.lora.training import LoraRun

    params = Parameters(optimizer=case.optimizer, mixed_precision=case.precision, train_batch_size=case.batch,
                        resolution=case.resolution, cache_latents=case.cache_latents,
                        gradient_checkpointing=case.gradient_checkpointing, lr_scheduler="constant",
                        train_text_encoder_ratio=1.0 if case.train_text_encoder else 0.0,
                        use_lora=case.lora_rank > 0, lora_unet_rank=max(1, case.lora_rank),
                        lora_unet_alpha=float(max(1, case.lora_rank)), lora_text_encoder_rank=max(1, case.lora_rank),
                        lora_text_encoder_alpha=float(max(1, case.lora_rank)), **dict(case.settings))
    hardware = detect(device)
    dtypes = DtypePlan.decide(params, hardware, models.sdxl)
    acc = Accelerator(mixed_precision=dtypes.mixed_precision, cpu=not hardware.gpu)
    vae = models.vae
    trainable = prepare_for_training(models.unet, vae, list(models.text_encoders), params, device, dtypes)
    # As Trainer.setup: with LoRA, adapters on the frozen model (in the training precision) before the step is built.
    LoraRun.start(models.unet, models.text_encoders, params, "sdxl" if models.sdxl else "v1", trainable,
                  weight_dtype=dtypes.weights)
    parts = Components(models.unet, vae, models.text_encoders, (), models.noise_scheduler, models.sdxl)
    step = build_step(params, parts, acc, total_steps=1000, train_text_encoder=trainable, dtypes=dtypes)

    pixels = inputs["pixels"]
    is_prior = torch.zeros(case.batch, dtype=torch.bool)  # on the CPU, as Trainer.make_batch keeps it
    cache = []

    def encode():
        # As Trainer.make_batch: one image at a time through the VAE in its own dtype.
        with torch.no_grad():
            latents = [vae.encode(px.unsqueeze(0).to(device, vae.dtype)).latent_dist.sample()[0]
                       * vae.config.scaling_factor for px in pixels]
        return torch.stack(latents).float().to(device)

    embeddings = []

    def conditioning() -> dict:
        if trainable:
            return {"input_ids": inputs["input_ids"]}
        # As Trainer.frozen_text_embeddings: frozen text encoders run once per prompt, one prompt at a time (first
        # step only; a warm-up step here), and their outputs are reused.
        if not embeddings:
            for row in range(case.batch):
                ids = [i[row:row + 1] for i in inputs["input_ids"]]
                embeddings.append(frozen_prompt_embedding(step.text_encoders, ids, models.sdxl))
        return {"prompt_embeds": torch.stack([hidden for hidden, _ in embeddings]),
                "pooled_embeds": torch.stack([pooled for _, pooled in embeddings]) if models.sdxl else None}

    def run():
        if case.cache_latents:
            if not cache:
                cache.append(encode())  # first epoch only; a warm-up step here
            latents = cache[0]
        else:
            latents = encode()
        batch = Batch(latents=latents, add_time_ids=inputs.get("add_time_ids"), is_prior=is_prior, **conditioning())
        out = step(batch, train_text_encoder=trainable)
        acc.reduce(out.loss.detach().float(), reduction="mean").item()  # the loop reads the loss every step
        return out.loss

    return run


def build_reference(case: Case, models: Models, inputs: dict, device):
    """A step written the way diffusers' examples/dreambooth/train_dreambooth.py writes its loop body."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=case.precision, cpu=str(device) == "cpu")
    weight_dtype = _weight_dtype(case.precision)
    unet, vae = models.unet, models.vae
    text_encoder = models.text_encoders[0] if models.text_encoders else None
    noise_scheduler = models.noise_scheduler
    vae.requires_grad_(False)
    # The SDXL scripts keep the VAE in fp32 under fp16 (it overflows there); otherwise it runs in the weight dtype.
    vae.to(device, dtype=torch.float32 if models.sdxl and case.precision == "fp16" else weight_dtype)
    train_te = case.train_text_encoder and text_encoder is not None
    if text_encoder is not None and not train_te:
        text_encoder.requires_grad_(False)
        text_encoder.to(device, dtype=weight_dtype)
    if case.lora_rank:  # train_dreambooth_lora.py: frozen models in the weight dtype, adapters in float32
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if train_te:
            text_encoder.requires_grad_(False)
            text_encoder.to(device, dtype=weight_dtype)
            text_encoder.add_adapter(LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank,
                                                init_lora_weights="gaussian",
                                                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        for model in (unet, text_encoder) if train_te else (unet,):
            for q in model.parameters():
                if q.requires_grad:
                    q.data = q.data.float()
    if case.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()

    def trainable(model):
        return [q for q in model.parameters() if q.requires_grad]

    params_to_optimize = trainable(unet) + (trainable(text_encoder) if train_te else [])
    kwargs = dict(lr=1e-4 if case.lora_rank else 2e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if case.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params_to_optimize, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params_to_optimize, **kwargs)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    if train_te:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    if train_te:
        text_encoder.train()

    pixels = inputs["pixels"]
    input_ids = None if models.sdxl else inputs["input_ids"][0]

    def run():
        with accelerator.accumulate(unet):
            model_input = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=model_input.device).long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            extra = {}
            if input_ids is not None:
                encoder_hidden_states = text_encoder(input_ids)[0]
            else:
                encoder_hidden_states = inputs["prompt_embeds"]
                extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled_embeds"],
                                              "time_ids": inputs["add_time_ids"]}
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False, **extra)[0]
            target = noise  # epsilon prediction
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params_to_optimize, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=False)
        loss.detach().item()  # the script logs the loss on its progress bar every step
        return loss

    return run


# ---------------------------------------------------------------------------------------------------------------
# Measurement (inside the child process).

def _device_name(device) -> str:
    import platform

    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def _peak_rss_bytes() -> int:
    import resource

    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def count_ops(run) -> dict:
    """The aten operations one call of `run` dispatches (forward, backward and optimizer alike): a measure of host
    work per step that a CPU can take. {"total": n, "top": [[op, n], ...]}."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        run()
    return {"total": sum(counter.counts.values()), "top": counter.counts.most_common(12)}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def profile_steps(run, cuda: bool, steps: int = 2, top: int = 15) -> dict:
    """torch.profiler over `steps` calls of `run`, per step: the aten ops and their host (CPU) time, the top ops by
    self CPU time and, on a GPU, the kernel launches, the GPU's kernel time and the top kernels by GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages()

    aten = [e for e in table if e.key.startswith("aten::")]
    result = {"steps": steps,
              "aten_ops_per_step": sum(e.count for e in aten) / steps,
              "cpu_ms_per_step": sum(e.self_cpu_time_total for e in table) / 1000 / steps,
              "top_cpu_ops": [[e.key, e.count / steps, e.self_cpu_time_total / 1000 / steps]
                              for e in sorted(aten, key=lambda e: -e.self_cpu_time_total)[:top]]}
    if cuda:
        result.update(kernel_summary(table, steps, top))
    return result


def kernel_summary(table, steps: int, top: int = 15) -> dict:
    """From a profile's averaged events: the kernel launches the host made, and the GPU's own activities (kernels,
    copies, fills) with their time, per step."""
    import torch

    def device_us(e) -> float:  # the name changed in torch 2.4 (cuda -> device)
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    on_gpu = [e for e in table if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return dict(
        kernel_launches_per_step=sum(e.count for e in table if e.key in LAUNCHES) / steps,
        kernel_ms_per_step=sum(device_us(e) for e in on_gpu) / 1000 / steps,
        top_kernels=[[e.key[:120], e.count / steps, device_us(e) / 1000 / steps]
                     for e in sorted(on_gpu, key=lambda e: -device_us(e))[:top]])


def measure(case: Case, loop: str, steps: int, warmup: int, device: str, ops: bool = False,
            profile: bool = False) -> dict:
    """Build the models, run `warmup` untimed steps then `steps` timed ones (with `ops` one more, counting its aten
    operations; with `profile` two more under torch.profiler); return the numbers."""
    import torch

    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    # The reference loop, like diffusers' SDXL scripts, precomputes SDXL's frozen text embeddings.
    models = build_models(case.arch, device, text_encoders=not (loop == "reference" and case.arch == "sdxl"))
    inputs = make_inputs(case, device)
    build = build_ours if loop == "ours" else build_reference
    run = build(case, models, inputs, device)
    setup_s = time.perf_counter() - t0
    if cuda:  # the models were built in fp32 on the device, then set up: the peak counts from the first step on
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        loss = run()
    # Per-step times: CUDA events recorded between steps (no host sync until the end), wall clock on CPU.
    # steps/s comes from the median step, which a shared machine's occasional stalls do not move.
    if cuda:
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            loss = run()
            marks[i + 1].record()
        torch.cuda.synchronize()
        step_seconds = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    else:
        step_seconds = []
        for _ in range(steps):
            t1 = time.perf_counter()
            loss = run()
            step_seconds.append(time.perf_counter() - t1)
    median = statistics.median(step_seconds)
    loss_value = float(loss.detach().float().item())
    op_counts = count_ops(run) if ops else None
    profiled = profile_steps(run, cuda) if profile else None
    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "VRAM"
    else:
        peak, peak_kind = _peak_rss_bytes(), "RSS"
    return dict(case=case.name, loop=loop, steps=steps, warmup=warmup, step_seconds=step_seconds,
                steps_per_s=1 / median, samples_per_s=case.batch / median,
                mean_steps_per_s=steps / sum(step_seconds), peak_bytes=peak,
                peak_kind=peak_kind, loss=loss_value, setup_s=setup_s, device=_device_name(device),
                torch=torch.__version__, ops=op_counts, profile=profiled)


def measure_matmul_peak(device: str, n: int = 8192, iters: int = 50) -> float:
    """Throughput in FLOP/s of a large bf16 matmul: the denominator of MFU."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1000)


def unet_flop_per_sample(case: Case) -> float | None:
    """The issue's figures at native resolution; other resolutions scale with the latent area (approximate)."""
    base = UNET_FLOP_PER_SAMPLE.get((case.arch, NATIVE_RESOLUTION.get(case.arch)))
    if base is None:
        return None
    return base * (case.resolution / NATIVE_RESOLUTION[case.arch]) ** 2


def _child_main(args) -> int:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    if args.child == "matmul-peak":
        result = {"matmul_peak_flops": measure_matmul_peak(args.device)}
    else:
        result = measure(CASES[args.case[0]], args.child, args.steps, args.warmup, args.device, args.count_ops,
                         args.profile)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per (case, loop), then one table.

def _run_child(extra: list[str], timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    reason = tail[-1] if tail else f"exit status {proc.returncode}"
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode} (out of memory?)"
    return {"error": reason}


def reference_setup(case: Case) -> Case:
    """What the reference loop's step depends on: not the trainer's settings, nor latent caching (it encodes every
    step, as diffusers' script does), so cases that differ only in those share one reference measurement."""
    return replace(case, name="", cache_latents=False, settings=())


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_table(rows: list[dict]) -> str:
    """A markdown table, two rows per case (ours, reference), the ratio on the ours row."""
    header = ["case", "model", "res", "batch", "precision", "optimizer", "trains", "latents", "text enc", "grad ckpt",
              "loop", "steps/s", "samples/s", "peak mem", "MFU", "ours/ref"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        c = CASES[row["case"]]
        for loop in LOOPS:
            r = row[loop]
            settings = [c.name, ARCH_LABEL[c.arch], str(c.resolution), str(c.batch), c.precision, c.optimizer,
                        f"LoRA r{c.lora_rank}" if c.lora_rank else "full",
                        ("cached" if c.cache_latents else "encoded") if loop == "ours" else "encoded",
                        "trained" if c.train_text_encoder else ("cached" if loop == "ours" or c.arch == "sdxl"
                                                                 else "frozen"),
                        "on" if c.gradient_checkpointing else "off",
                        f"{loop} (as {r['shared_with']})" if r.get("shared_with") else loop]
            if "error" in r:
                numbers = [f"failed: {r['error']}"[:80], "", "", "", ""]
            else:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
                ratio = f"{row['ratio']:.2f}x" if loop == "ours" and row.get("ratio") is not None else ""
                numbers = [f"{r['steps_per_s']:.3g}", f"{r['samples_per_s']:.3g}",
                           f"{_fmt_bytes(r['peak_bytes'])} {r['peak_kind']}", mfu, ratio]
            lines.append("| " + " | ".join(settings + numbers) + " |")
    return "\n".join(lines)


def format_profile(case: str, loop: str, p: dict) -> str:
    """A profile in a few lines: per step totals, then the top kernels (GPU) or the top ops (CPU)."""
    head = f"profile {case} / {loop}: {p['aten_ops_per_step']:.0f} aten ops, {p['cpu_ms_per_step']:.1f} ms host time"
    if "kernel_launches_per_step" in p:
        head += (f", {p['kernel_launches_per_step']:.0f} kernel launches, {p['kernel_ms_per_step']:.1f} ms of kernels"
                 " per step")
        top = p["top_kernels"]
    else:
        head += " per step"
        top = p["top_cpu_ops"]
    return "\n".join([head] + [f"    {ms:8.2f} ms  {count:6.0f}x  {name}" for name, count, ms in top[:8]])


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/train_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", default=None,
                   help="case name (repeatable, or comma-separated); default: the device's list. See --list")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 2 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--loops", default="ours,reference", help="which loops to run (default: ours,reference)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per (case, loop) subprocess")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the aten operations of one step per loop (a CPU proxy of host work per step)")
    p.add_argument("--profile", action="store_true",
                   help="also profile two steps per loop (torch.profiler): host time and ops per step; on a GPU the "
                        "kernel launches, kernel time and top kernels per step")
    p.add_argument("--child", choices=LOOPS + ("matmul-peak",), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, c in CASES.items():
            print(f"{name:42s} {asdict(c)}")
        return 0
    device = _default_device() if args.device == "auto" else args.device
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device: {device!r} is not cpu or cuda (pick a GPU with CUDA_VISIBLE_DEVICES)")
    cuda = device == "cuda"
    names = [n for item in (args.case or DEFAULT_CASES["cuda" if cuda else "cpu"]) for n in item.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise UserError(f"--case: unknown case {', '.join(unknown)} (see --list)")
    loops = [x for x in args.loops.split(",") if x]
    if not loops or any(x not in LOOPS for x in loops):
        raise UserError(f"--loops: {args.loops!r} must name ours and/or reference")
    steps = args.steps if args.steps is not None else (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup})")
    if args.child:
        args.case, args.steps, args.warmup, args.device = names, steps, warmup, device
        return _child_main(args)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device: {device!r} requested but torch sees no CUDA device")

    common = ["--device", device, "--steps", str(steps), "--warmup", str(warmup)]
    common += ["--count-ops"] if args.count_ops else []
    common += ["--profile"] if args.profile else []
    peak_flops = None
    if cuda:
        peak = _run_child(["--child", "matmul-peak", *common], args.timeout)
        peak_flops = peak.get("matmul_peak_flops")
        if peak_flops:
            print(f"bf16 matmul peak on this device: {peak_flops / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    references = {}  # reference setup -> (case, result): measured once for the cases that share it
    for name in names:
        case = CASES[name]
        row = {"case": name}
        for loop in LOOPS:
            if loop not in loops:
                row[loop] = {"error": "not run"}
                continue
            setup = reference_setup(case)
            if loop == "reference" and setup in references:
                first, measured = references[setup]
                r = {**measured, "shared_with": first}
            else:
                print(f"running {name} / {loop} ...", file=sys.stderr, flush=True)
                r = _run_child(["--child", loop, "--case", name, *common], args.timeout)
                if loop == "reference" and "error" not in r:
                    references[setup] = (name, r)
            flop = unet_flop_per_sample(case)
            if "error" not in r and peak_flops and flop:
                r["mfu"] = r["samples_per_s"] * flop / peak_flops
            row[loop] = r
        if "error" not in row["ours"] and "error" not in row["reference"]:
            row["ratio"] = row["ours"]["steps_per_s"] / row["reference"]["steps_per_s"]
        rows.append(row)
        if args.json:  # after every case: a run cut short keeps what it measured
            write_json(Path(args.json), rows, device, peak_flops)
    dev = device_of(rows, device)
    print(f"\n{time.strftime('%Y-%m-%d', time.gmtime())}, {dev}, {steps} timed steps after {warmup} warm-up"
          + (f", bf16 matmul peak {peak_flops / 1e12:.1f} TFLOP/s" if peak_flops else ""))
    print(format_table(rows), flush=True)
    for row in rows:
        counts = {loop: row[loop].get("ops") for loop in LOOPS if row[loop].get("ops")}
        if counts:
            print(f"aten ops per step, {row['case']}: "
                  + ", ".join(f"{loop} {c['total']}" for loop, c in counts.items()))
        for loop in LOOPS:
            if row[loop].get("profile") and not row[loop].get("shared_with"):
                print(format_profile(row["case"], loop, row[loop]["profile"]))
    failed = [r["case"] for r in rows if any("error" in r[loop] and loop in loops for loop in LOOPS)]
    return 1 if failed else 0


def device_of(rows: list[dict], default: str) -> str:
    return next((r[loop]["device"] for r in rows for loop in LOOPS if "device" in r[loop]), default)


def write_json(path: Path, rows: list[dict], device: str, peak_flops: float | None) -> None:
    from dreambooth.store import atomic_write_text

    atomic_write_text(path, json.dumps({"device": device_of(rows, device), "peak_flops": peak_flops, "rows": rows},
                                       indent=2) + "\n")


def run(argv: list[str] | None = None) -> int:
    """main() with bad input as one line `error: ...` and exit status 2, as the product's CLI does."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
