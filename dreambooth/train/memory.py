"""The memory plan: the peak GPU memory of a training run, predicted without a GPU.

The model's real architecture (built from its working folder's configs) is created on the meta device, turned into
fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no memory) and one training step is traced through
the trainer's own code: `prepare_for_training` (dtypes and placement), the VAE encode of each image when latents are
not cached, `TrainStep` (forward, loss, backward, clipping, optimizer step, the fused step's hooks) and the optimizer
from `make_optimizer`. A dispatch-level tracker sees every tensor the step allocates and when its storage dies, so the
peak and what is alive at the peak come from the step itself, not from a formula:

    weights      trained parameters          gradients   parameter gradients alive at the peak
    optimizer    optimizer state             activations everything else the step holds at the peak (saved
    frozen       VAE, frozen text encoders,                 activations, temporaries, the batch)
                 buffers                     cached      latents (and embeddings) kept on the GPU, by arithmetic

Each storage is counted as the CUDA caching allocator counts it (rounded up to 512 bytes), so the total is what
`torch.cuda.max_memory_allocated` reports; the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation are
not in it (`fits` leaves headroom for them).

How faithful the trace is:
- it runs on fake *CPU* tensors: a CPU-only PyTorch creates fake CUDA tensors but cannot index them or autocast on
  them. CPU autocast casts the same operations (convolutions, linear layers, matmuls, attention) to 16 bits, SDPA
  takes the CPU flash kernel (memory like the GPU's flash / memory-efficient kernels), and fp16 is traced as bf16
  (same size). The plan assumes a GPU with bf16 (Ampere or newer) when it decides dtypes;
- bitsandbytes' 8-bit AdamW cannot run on fake tensors: a stand-in allocates exactly the state bitsandbytes allocates
  (two uint8 tensors per parameter of 4096+ elements plus one fp32 absmax per 256-element block each; two fp32
  tensors for smaller ones) and does no arithmetic;
- kernel-internal workspaces (cuDNN convolution workspaces, flash-attention scratch) are invisible at this level.
Needs torch >= 2.1 (FakeTensorMode, post-accumulate-grad hooks); where the trace cannot run, `plan` falls back to
arithmetic for weights, gradients, optimizer, frozen parts and cache and says that activations were not traced.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import describe
from ..errors import UserError

CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block: every tensor costs a multiple of it
GIB = 2**30
# What a GPU needs besides the tensors: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation.
HEADROOM_BYTES = int(0.8 * GIB)
HEADROOM_FRACTION = 0.05
CATEGORIES = ("weights", "gradients", "optimizer", "ema", "activations", "frozen", "cached")
PLAN_PARTS = {"weights": "trained weights", "gradients": "their gradients", "optimizer": "optimizer state",
              "ema": "EMA copy of the UNet",
              "activations": "activations (what the backward pass keeps)", "frozen": "frozen parts (VAE, text encoders)",
              "cached": "cached latents and prompts"}


@dataclass
class MemoryPlan:
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    ema: int = 0
    activations: int = 0
    frozen: int = 0
    cached: int = 0
    traced: bool = True
    target: str = "cuda"
    notes: list = field(default_factory=list)
    # Bytes of each category created during the traced step (each storage once), e.g. every gradient.
    created: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def needs(self) -> int:
        """VRAM the run needs: the peak plus headroom for what is not a tensor."""
        return int(self.peak * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES

    def fits(self, vram_bytes: float) -> bool:
        return self.needs() <= vram_bytes

    def breakdown(self) -> str:
        parts = ", ".join(f"{c} {gib(getattr(self, c))}" for c in CATEGORIES)
        how = "traced" if self.traced else "activations not traced"
        return f"peak {gib(self.peak)} ({parts}; {how})"


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def block_bytes(nbytes: int, rounding: int) -> int:
    return (nbytes + rounding - 1) // rounding * rounding if rounding > 1 else nbytes


# ---------------------------------------------------------------------------------------------------------------
# The tracker: every storage the traced step creates, when it dies, and what it is.

def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class _Record:
    __slots__ = ("nbytes", "born", "died", "kind")

    def __init__(self, nbytes: int, born: int, kind: str):
        self.nbytes, self.born, self.died, self.kind = nbytes, born, None, kind


class StorageTracker:
    """Live bytes over time, by storage. `track` registers existing tensors; inside `recording()` every tensor an
    operation returns is registered; a storage counts until Python frees it. `peak_breakdown` says what was alive
    at the highest point."""

    def __init__(self, rounding: int = CUDA_BLOCK):
        self.rounding = rounding
        self.live: dict[int, _Record] = {}  # id(storage) -> record, while it lives
        self.records: list[_Record] = []
        self.clock = 0
        self.total = self.peak = self.peak_at = self.since = 0

    def track(self, t: torch.Tensor, kind: str = "activations") -> None:
        st = t.untyped_storage()
        key = id(st)
        record = self.live.get(key)
        if record is not None:
            if kind != "activations":
                record.kind = kind
            return
        self.clock += 1
        record = _Record(block_bytes(st.nbytes(), self.rounding), self.clock, kind)
        self.live[key] = record
        self.records.append(record)
        self.total += record.nbytes
        if self.total > self.peak:
            self.peak, self.peak_at = self.total, self.clock
        weakref.finalize(st, self._free, key, record)

    def _free(self, key: int, record: _Record) -> None:
        if self.live.get(key) is record:
            del self.live[key]
        self.clock += 1
        record.died = self.clock
        self.total -= record.nbytes

    def tag(self, t: torch.Tensor | None, kind: str) -> None:
        if isinstance(t, torch.Tensor):
            self.track(t, kind)

    def reset_peak(self) -> None:
        """From now on: the peak and `created` count what happens after this point."""
        self.peak, self.peak_at, self.since = self.total, self.clock, self.clock

    def created(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.records:
            if r.born > self.since:
                out[r.kind] += r.nbytes
        return out

    def peak_breakdown(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.records:
            if r.born <= self.peak_at and (r.died is None or r.died > self.peak_at):
                out[r.kind] += r.nbytes
        return out

    def recording(self):
        tracker = self
        from torch.utils._pytree import tree_flatten

        class Mode(_dispatch_mode_base()):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        return Mode()


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins for what cannot run on fake tensors.

class _Bnb8bitStandIn(torch.optim.Optimizer):
    """Allocates the state bitsandbytes' AdamW8bit allocates (see the module doc); no arithmetic."""

    MIN_8BIT = 4096
    BLOCK = 256

    def __init__(self, groups, cpu_kernel: bool = False):
        super().__init__(groups, {})
        self.qmap = None
        # On a CPU, bitsandbytes' 8-bit update works through fp32 copies (both moments, the scaled gradient, the
        # denominator and its square root); its CUDA kernel needs none.
        self.cpu_kernel = cpu_kernel

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if state:
                    if self.cpu_kernel and "absmax1" in state:
                        temporaries = [torch.empty_like(p, dtype=torch.float32) for _ in range(5)]
                        del temporaries
                    continue
                if p.numel() < self.MIN_8BIT:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    continue
                if self.qmap is None:  # two 256-entry quantisation maps, shared by every parameter
                    self.qmap = (torch.zeros(256, device=p.device), torch.zeros(256, device=p.device))
                blocks = -(-p.numel() // self.BLOCK)
                state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                state["qmap1"], state["qmap2"] = self.qmap
                state["absmax1"] = torch.zeros(blocks, device=p.device)
                state["absmax2"] = torch.zeros(blocks, device=p.device)


class _PlanAccelerator:
    """What TrainStep asks of accelerate, for a single-process trace."""

    sync_gradients = True
    scaler = None
    num_processes = 1

    def __init__(self, device: str):
        self.device = torch.device(device)

    def prepare(self, *objects):
        return objects[0] if len(objects) == 1 else objects

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


# ---------------------------------------------------------------------------------------------------------------
# The architecture, on the meta device.

@dataclass
class Architecture:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    noise_scheduler: object
    sdxl: bool


def architecture_from_folder(working: Path, family: str) -> Architecture:
    """The working model's modules from its configs only (no weights read), on the meta device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    working = Path(working)
    if not (working / "unet").is_dir():
        raise UserError(f"{working}: the working model is missing its unet folder (re-create the model)")
    sdxl = (working / "text_encoder_2").is_dir() or family == "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(working / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(working / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(working / "text_encoder"))]
        if sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(working / "text_encoder_2")))
    scheduler = DDPMScheduler.from_pretrained(working, subfolder="scheduler")
    return Architecture(unet, vae, tuple(encoders), scheduler, sdxl)


# ---------------------------------------------------------------------------------------------------------------
# The plan.

def _dtypes(params, target: str, sdxl: bool):
    """The run's dtypes on the target: a GPU with bf16 ("cuda"), or this CPU."""
    from .precision import CPU, DtypePlan, Hardware

    return DtypePlan.decide(params, Hardware(gpu=True, bf16=True) if target == "cuda" else CPU, sdxl, warn=False)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs a line when a module is cast with `to()`; the plan casts on purpose."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _cached_bytes(params, n_images: int, rounding: int, sdxl: bool) -> int:
    """Latents kept on the device for every image when cache_latents is on (fp32, 1/8 of the resolution)."""
    if not params.cache_latents or n_images <= 0:
        return 0
    side = params.resolution // 8
    return n_images * block_bytes(4 * side * side * 4, rounding)


def plan_architecture(arch: Architecture, params, n_images: int = 0, target: str = "cuda",
                      batch_size: int | None = None) -> MemoryPlan:
    """Trace one training step of `arch` (meta modules, consumed) with `params`; see the module doc.

    target "cuda": dtypes and allocation as on a GPU with bf16; "cpu": as the trainer runs on a CPU (no rounding, the
    CPU's precision fallbacks), for comparing with a measurement on this machine.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:  # pragma: no cover - torch < 2.0
        return arithmetic_plan(arch, params, n_images, target, note="this PyTorch has no FakeTensorMode")
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return arithmetic_plan(arch, params, n_images, target, note="this PyTorch is older than 2.1")
    try:
        return _trace(arch, params, n_images, target, batch_size, FakeTensorMode)
    except Exception as e:  # an architecture or operation the fake tensors cannot follow
        if os.environ.get("DREAMBOOTH_PLAN_DEBUG"):
            raise
        return arithmetic_plan(arch, params, n_images, target,
                               note=f"the step could not be traced ({type(e).__name__}: {str(e)[:120]})")


def _trace(arch: Architecture, params, n_images, target, batch_size, FakeTensorMode) -> MemoryPlan:
    from .components import Components
    from .loop import build_step, make_ema
    from .optim import ParamStepper, make_optimizer, param_groups

    rounding = CUDA_BLOCK if target == "cuda" else 1
    dtypes = _dtypes(params, target, arch.sdxl)
    precision = dtypes.mixed_precision
    on_gpu = target == "cuda"
    batch_size = batch_size or params.train_batch_size
    tracker = StorageTracker(rounding)
    notes = []
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    unet, vae, encoders = arch.unet, arch.vae, list(arch.text_encoders)
    trainable = _prepare_on_meta(arch, params, dtypes)
    with fake, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (unet, vae, *encoders):
            m.to_empty(device="cpu")
        te_steps = trainable  # the plan follows the text encoders' training phase: it costs the most
        trained = [p for p in unet.parameters() if p.requires_grad]
        if te_steps:
            trained += [p for te in encoders for p in te.parameters() if p.requires_grad]
        trained_ids = {id(p) for p in trained}
        for m in (unet, vae, *encoders):
            for p in m.parameters():
                tracker.track(p, "weights" if id(p) in trained_ids else "frozen")
            for b in m.buffers():
                tracker.track(b, "frozen")
        # Gradients are tagged as they arrive: these hooks come before the fused step's, which free them.
        for p in trained:
            p.register_post_accumulate_grad_hook(lambda q: tracker.tag(q.grad, "gradients"))

        def optimizer_factory(params, unet, encoders):
            if params.optimizer == "adamw_8bit":  # bitsandbytes cannot even be constructed on fake tensors
                notes.append("8-bit AdamW state allocated as bitsandbytes allocates it (not run)")
                return _Bnb8bitStandIn(param_groups(params, unet, encoders), not on_gpu)
            return make_optimizer(params, unet, encoders)

        # The trainer's own step builder, on the trace's stand-ins: fp16 traced as bf16, nothing compiled.
        traced = replace(dtypes, mixed_precision="bf16") if precision == "fp16" else dtypes
        step = build_step(replace(params, compile_unet=False), Components(unet, vae, encoders, (), arch.noise_scheduler,
                                                                          arch.sdxl),
                          _PlanAccelerator("cpu"), 1000, bool(te_steps), traced, optimizer_factory)
        optimizer = step.optimizer
        ema = make_ema(params, unet)  # kept on the device beside the weights, for the whole run
        for t in ema.shadow_params if ema is not None else ():
            tracker.track(t, "ema")
        # A run's steps after the first find the optimizer state in place: create it first (one parameter at a
        # time, as the trainer's own steps would), then trace a step of the steady state.
        stepper = ParamStepper(optimizer)
        for p in trained:
            p.grad = torch.zeros_like(p)
            stepper.step([p])
            p.grad = None
        for state in optimizer.state.values():
            for t in state.values():
                tracker.tag(t, "optimizer")
        tracker.reset_peak()
        with tracker.recording():
            batch = _traced_batch(arch, params, batch_size, bool(te_steps))
            out = step(batch, train_text_encoder=bool(te_steps))
            del out, batch
            for state in optimizer.state.values():  # state the step replaced (Adafactor's RMS) is state too
                for t in state.values():
                    tracker.tag(t, "optimizer")
            peak = tracker.peak_breakdown()
        if step.fused is not None:
            step.fused.remove()
    plan = MemoryPlan(**peak, traced=True, target=target, notes=notes, created=tracker.created())
    plan.cached = _cached_bytes(params, n_images, rounding, arch.sdxl)
    if not te_steps and n_images:  # each prompt's embeddings (at most one prompt per image)
        width = sum(te.config.hidden_size for te in arch.text_encoders)
        size = torch.finfo(encoders[0].dtype).bits // 8
        plan.cached += n_images * block_bytes(77 * width * size, rounding)
    return plan


def _prepare_on_meta(arch: Architecture, params, dtypes) -> bool:
    """Dtypes and modes exactly as the trainer sets them up for the target (on the meta device, before the tensors
    become fake), fp16 traced as bf16; LoRA adapters where the run has them. Whether the text encoders train."""
    from .components import prepare_for_training

    unet, vae, encoders = arch.unet, arch.vae, list(arch.text_encoders)
    with warnings.catch_warnings(), _quiet_diffusers():
        warnings.simplefilter("ignore")
        trainable = prepare_for_training(unet, vae, encoders, params, "meta", dtypes)
        for m in (unet, vae, *encoders):
            if any(t.dtype == torch.float16 for t in m.parameters()):
                m.to(torch.bfloat16)
        if params.use_lora:  # as the trainer: float32 adapters on the model frozen in the training precision
            from ..lora.training import LoraRun

            run = LoraRun.start(unet, encoders, params, "sdxl" if arch.sdxl else "v1", trainable,
                                weight_dtype=torch.bfloat16 if dtypes.mixed_precision != "no" else torch.float32)
            if params.lora_type != "lora":
                # LoHa and LoKr draw a random number to decide on module dropout, which fake tensors cannot decide;
                # in eval mode they skip that draw and compute the same tensors
                for layer in run.layers():
                    layer.train(False)
    return trainable


def _traced_batch(arch: Architecture, params, batch_size: int, train_text_encoder: bool):
    """A batch as the trainer's make_batch builds it: latents (cached, or each image through the VAE in its dtype),
    token ids, and with frozen text encoders each prompt's embeddings instead."""
    from .step import Batch, encode_prompt

    vae, encoders, side = arch.vae, list(arch.text_encoders), params.resolution // 8
    if params.cache_latents:
        latents = torch.randn(batch_size, 4, side, side)
    else:
        with torch.no_grad():
            latents = torch.stack([
                vae.encode(torch.randn(1, 3, params.resolution, params.resolution, dtype=vae.dtype))
                .latent_dist.sample()[0] for _ in range(batch_size)]).float()
    ids = tuple(torch.randint(0, encoders[0].config.vocab_size, (batch_size, 77)) for _ in encoders)
    time_ids = torch.zeros(batch_size, 6) if arch.sdxl else None
    if train_text_encoder:
        return Batch(latents=latents, input_ids=ids, add_time_ids=time_ids)
    with torch.no_grad():  # frozen text encoders: the trainer reuses each prompt's embeddings
        hidden, pooled = encode_prompt(encoders, ids, arch.sdxl)
    return Batch(latents=latents, prompt_embeds=hidden, pooled_embeds=pooled, add_time_ids=time_ids)


# Optimizer state per parameter, in fp32 copies of it: Prodigy (exp_avg, exp_avg_sq, s, p0), Lion (exp_avg),
# schedule-free AdamW (z, exp_avg_sq).
FULL_STATES = {"prodigy": 4, "lion": 1, "schedulefree_adamw": 2}


def arithmetic_plan(arch: Architecture, params, n_images: int = 0, target: str = "cuda", note: str = "") -> MemoryPlan:
    """Weights, gradients, optimizer state, frozen parts and cache from parameter counts; activations unknown (0)."""
    from .schedule import trains_text_encoder

    rounding = CUDA_BLOCK if target == "cuda" else 1
    trains_te = trains_text_encoder(params.train_text_encoder_ratio)
    trained = [p for p in arch.unet.parameters()]
    frozen = [p for m in (arch.vae,) for p in m.parameters()]
    for te in arch.text_encoders:
        (trained if trains_te else frozen).extend(te.parameters())
    wbytes = 2 if params.pure_bf16 else 4
    half = 2 if params.frozen_precision == "half" and params.mixed_precision != "no" and target == "cuda" else 4
    plan = MemoryPlan(traced=False, target=target, notes=[note] if note else [])
    for p in trained:
        plan.weights += block_bytes(p.numel() * wbytes, rounding)
        if not params.fused_backward_step or params.gradient_accumulation_steps > 1:
            plan.gradients += block_bytes(p.numel() * wbytes, rounding)
        if params.optimizer == "adamw":  # exp_avg, exp_avg_sq and the step count (a tensor on the device)
            plan.optimizer += 2 * block_bytes(p.numel() * 4, rounding) + block_bytes(4, rounding)
        elif params.optimizer == "adamw_8bit":
            if p.numel() < _Bnb8bitStandIn.MIN_8BIT:
                plan.optimizer += 2 * block_bytes(p.numel() * 4, rounding)
            else:
                blocks = -(-p.numel() // _Bnb8bitStandIn.BLOCK)
                plan.optimizer += 2 * block_bytes(p.numel(), rounding) + 2 * block_bytes(blocks * 4, rounding)
        elif params.optimizer in FULL_STATES:  # fp32 tensors of the parameter's size each
            plan.optimizer += FULL_STATES[params.optimizer] * block_bytes(p.numel() * 4, rounding)
        else:  # Adafactor (CAME: twice, plus a first moment): second moments factored over the last two dimensions,
            shape = tuple(p.shape)  # full for vectors; an RMS scalar
            if len(shape) >= 2:
                parts = (math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1])
            else:
                parts = (p.numel(),)
            factored = sum(block_bytes(n * 4, rounding) for n in parts)
            if params.optimizer == "came":  # a first moment, the second moment and (factored) its residual, an RMS
                second = 2 * factored if len(shape) >= 2 else factored
                plan.optimizer += block_bytes(p.numel() * 4, rounding) + second + block_bytes(4, rounding)
            else:
                plan.optimizer += factored + block_bytes(4, rounding)
    if params.optimizer == "adamw_8bit" and any(p.numel() >= _Bnb8bitStandIn.MIN_8BIT for p in trained):
        plan.optimizer += 2 * block_bytes(256 * 4, rounding)  # the two quantisation maps, shared
    plan.frozen = sum(block_bytes(p.numel() * half, rounding) for p in frozen)
    if params.use_ema and not params.use_lora:  # a copy of every UNet weight, in its dtype
        plan.ema = sum(block_bytes(p.numel() * wbytes, rounding) for p in arch.unet.parameters())
    plan.cached = _cached_bytes(params, n_images, rounding, arch.sdxl)
    return plan


# ---------------------------------------------------------------------------------------------------------------
# From a model on disk, and what to change when it does not fit.

def count_images(config) -> int:
    """Images whose latents the trainer caches: instance images plus the class images prior preservation uses."""
    from ..data.images import find_images

    total = 0
    for c in config.active_concepts:
        folder = Path(c.instance_data_dir).expanduser()
        n = len(find_images(folder)) if folder.is_dir() else 0
        total += n * (1 + c.num_class_images_per_image)
    return total


def plan_model(root, name: str, params=None, target: str = "cuda") -> MemoryPlan:
    """The plan of model `name` with its own settings (or `params`)."""
    from ..config import Config

    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found in {root.dreambooth} (create it first)")
    config = Config.load(model.config_path)
    arch = architecture_from_folder(model.working, config.model.family)
    return plan_architecture(arch, params or config.parameters, count_images(config), target)


# The memory-related settings, from the fastest run to the leanest; each rung adds its changes to the ones before.
# Ordered by what each costs in speed: half-precision frozen parts and the fused step cost (nearly) nothing, 8-bit
# state little, pure bf16 nothing in speed (it changes the numerics, which stochastic rounding keeps sound),
# gradient checkpointing about 20-30% (a second forward), Adafactor a little more; freezing the text encoder changes
# what is trained and turning EMA off what is saved (a UNet copy less), so they come last.
FASTEST = {"optimizer": "adamw", "fused_backward_step": False, "pure_bf16": False, "gradient_checkpointing": False,
           "frozen_precision": "half"}
LEANER_STEPS = (
    ("optimizer step in the backward pass", {"fused_backward_step": True, "gradient_accumulation_steps": 1}),
    ("8-bit AdamW", {"optimizer": "adamw_8bit"}),
    ("pure bf16 weights", {"pure_bf16": True, "mixed_precision": "bf16"}),
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("Adafactor", {"optimizer": "adafactor"}),
    ("text encoder frozen", {"train_text_encoder_ratio": 0.0}),
    ("EMA off", {"use_ema": False}),
)


def rung_settings() -> list[tuple[str, dict]]:
    """(label, the settings a preset sets) for each rung, fastest first: FASTEST plus the LEANER_STEPS so far."""
    settings = dict(FASTEST)
    rungs = [("fastest", dict(settings))]
    for label, changes in LEANER_STEPS:
        settings.update(changes)
        rungs.append((label, dict(settings)))
    return rungs


def ladder(params) -> list[tuple[str, object]]:
    """(label, parameters) from the fastest memory settings to the leanest, the rest of `params` kept."""
    return [(label, replace(params, **settings)) for label, settings in rung_settings()]


def _changes(params, changes: dict) -> dict:
    return {k: v for k, v in changes.items() if getattr(params, k) != v}


def suggest(arch_factory, params, vram_bytes: float, n_images: int = 0, target: str = "cuda"):
    """The cheapest changes that make the run fit: the rungs of LEANER_STEPS added in order, those the run already
    has skipped, until the plan fits. Returns (changes, plan), or (None, the leanest plan) when nothing fits."""
    current = params
    applied: dict = {}
    plan = plan_architecture(arch_factory(), current, n_images, target)
    if plan.fits(vram_bytes):
        return {}, plan
    for _label, changes in LEANER_STEPS:
        diff = _changes(current, changes)
        if not diff:
            continue
        current = replace(current, **diff)
        applied.update(diff)
        plan = plan_architecture(arch_factory(), current, n_images, target)
        if plan.fits(vram_bytes):
            return applied, plan
    return None, plan


def choose_preset(arch_factory, params, vram_gb: float, n_images: int = 0):
    """The fastest rung of `ladder(params)` whose plan fits `vram_gb`: (settings that differ from `params`, plan);
    (None, leanest plan) when none fits."""
    plan = None
    for _label, settings in rung_settings():
        plan = plan_architecture(arch_factory(), replace(params, **settings), n_images)
        if plan.fits(vram_gb * GIB):
            return {k: v for k, v in settings.items() if getattr(params, k) != v}, plan
    return None, plan


# VRAM presets: for each family and GPU size, the memory settings of the fastest rung of `ladder` whose plan fits,
# computed with `generate_presets` on the family's full-size architecture at its native resolution, batch 1, with the
# other settings at their defaults (text encoder trained for the first 25% of the steps, latents cached).
PRESET_SIZES = (6, 8, 12, 16, 24, 48)
# The rung each size got (`generate_presets`, 2026-11-21). v1 at 512, the peak of each rung: fastest 15.08 GiB,
# fused step 13.82, + 8-bit AdamW 8.36, + pure bf16 4.87 (needs = peak x 1.05 + 0.8 GiB).
PRESET_RUNGS = {
    "v1": {6: "pure bf16 weights", 8: "pure bf16 weights", 12: "8-bit AdamW",
           16: "optimizer step in the backward pass", 24: "fastest", 48: "fastest"},
}


def preset_for(family: str, vram_gb: float, arch_factory=None, params=None) -> tuple[float, dict]:
    """(preset size, settings) of the largest preset that is not larger than the GPU. A family without a stored
    table is planned now (`arch_factory`, `params`: the model's own architecture and settings)."""
    sizes = [g for g in PRESET_SIZES if g <= vram_gb + 1e-9]
    if not sizes:
        raise UserError(f"vram: {vram_gb:g} GiB is below the smallest preset ({PRESET_SIZES[0]} GiB)")
    size = sizes[-1]
    table = PRESETS.get(family)
    if table is not None:
        settings = table[size]
    elif arch_factory is not None:
        settings = next((rung for _label, rung in rung_settings()
                         if plan_architecture(arch_factory(), replace(params, **rung)).fits(size * GIB)), None)
    else:
        raise UserError(f"family {family!r}: no stored VRAM presets")
    if settings is None:
        raise UserError(f"no {size} GiB preset for {family}: even the leanest settings do not fit "
                        f"(lower the resolution or train the UNet only)")
    return size, dict(settings)


def generate_presets(arch_factory, params, sizes=PRESET_SIZES) -> dict:
    """{size: settings or None} for one family: the plan of each rung of `ladder(params)` once, then for each size
    the first (fastest) rung that fits."""
    rungs = [(settings, plan_architecture(arch_factory(), replace(params, **settings)))
             for _label, settings in rung_settings()]
    return {size: next((settings for settings, plan in rungs if plan.fits(size * GIB)), None) for size in sizes}


def _load_config(root, name: str):
    from ..config import Config

    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found in {root.dreambooth} (create it first)")
    return model, Config.load(model.config_path)


def _arch_factory(model, config):
    return lambda: architecture_from_folder(model.working, config.model.family)


def apply_preset(root, name: str, vram_gb: float) -> str:
    """Set model `name`'s memory settings to its family's preset for `vram_gb`; says what changed."""
    model, config = _load_config(root, name)
    size, settings = preset_for(config.model.family, vram_gb, _arch_factory(model, config), config.parameters)
    changes = {k: v for k, v in settings.items() if getattr(config.parameters, k) != v}
    if changes:
        from ..models import save_config

        with model.lock("setting a VRAM preset"):
            save_config(model, config.with_parameters(**changes))
    what = describe(changes) or "nothing to change"
    return f"{name}: {size:g} GiB preset for {config.model.family}: {what}{on_a_cpu(settings, size)}"


def on_a_cpu(settings: dict, size: float) -> str:
    """What a GPU preset's settings do on a machine without a GPU, said with the preset (empty on a GPU)."""
    from .precision import training_device

    if training_device().type != "cpu":
        return ""
    effects = []
    if settings.get("pure_bf16") or settings.get("mixed_precision") == "bf16":
        effects.append("trains in bf16, which most CPUs compute slower than fp32")
    if settings.get("optimizer") == "adamw_8bit":
        effects.append("uses 8-bit AdamW only with bitsandbytes 0.50 or newer (else AdamW, said when it starts)")
    if not effects:
        return ""
    return (f". Note: this machine has no GPU; the preset sizes a run for a {size:g} GiB GPU, and on this CPU it "
            f"{' and '.join(effects)}")


def plan_cli(root, name: str, vram_gb: float | None = None, preset_gb: float | None = None, params=None) -> str:
    """What `python -m dreambooth plan` prints (for the model's saved settings, or `params`)."""
    _model, config = _load_config(root, name)
    params = params or config.parameters
    head = []
    if preset_gb is not None:
        size, settings = preset_for(config.model.family, preset_gb, _arch_factory(_model, config), params)
        params = replace(params, **settings)
        head.append(f"with the {size:g} GiB preset: " + describe(settings))
    return "\n".join(head + [plan_summary(root, name, vram_gb, params=params)])


def plan_summary(root, name: str, vram_gb: float | None = None, params=None) -> str:
    """One or two lines for the tab: the predicted peak and breakdown; with vram_gb, whether it fits and what to
    change when it does not."""
    return plan_report(root, name, vram_gb, params)[0]


def plan_report(root, name: str, vram_gb: float | None = None, params=None) -> tuple[str, bool | None]:
    """plan_summary's text and whether the run fits `vram_gb` (None without a size to fit)."""
    model, config = _load_config(root, name)
    params, n = params or config.parameters, count_images(config)

    def arch():
        return architecture_from_folder(model.working, config.model.family)

    plan = plan_architecture(arch(), params, n)
    how = "traced" if plan.traced else "activations not traced"
    lines = [f"Memory plan: peak {gib(plan.peak)} ({how}), of which"]
    lines += [f"  {PLAN_PARTS[c]}: {gib(getattr(plan, c))}" for c in CATEGORIES]
    lines += [f"  note: {x}" for x in plan.notes]
    fits = None
    if vram_gb is not None:
        vram = vram_gb * GIB
        fits = plan.fits(vram)
        if fits:
            lines.append(f"fits {vram_gb:g} GiB (needs {gib(plan.needs())} with headroom)")
        else:
            changes, lean = suggest(arch, params, vram, n)
            if changes is None:
                lines.append(f"does not fit {vram_gb:g} GiB even with every memory setting "
                             f"(leanest: {gib(lean.needs())}); lower the resolution or batch size")
            else:
                what = describe(changes)
                lines.append(f"does not fit {vram_gb:g} GiB (needs {gib(plan.needs())}); fits with {what} "
                             f"(peak {gib(lean.peak)})")
    return "\n".join(lines), fits


PRESETS = {family: {size: dict(dict(rung_settings())[label]) for size, label in sizes.items()}
           for family, sizes in PRESET_RUNGS.items()}

__all__ = ["MemoryPlan", "StorageTracker", "Architecture", "architecture_from_folder", "plan_architecture",
           "arithmetic_plan", "plan_model", "plan_summary", "plan_report", "suggest", "choose_preset", "ladder", "count_images",
           "LEANER_STEPS", "FASTEST"]
