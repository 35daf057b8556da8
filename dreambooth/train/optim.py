"""Optimizer (separate UNet and text-encoder learning rates) and learning-rate schedule from the parameters.

Beside torch's AdamW, bitsandbytes' 8-bit AdamW and transformers' Adafactor, four optimizers come from their authors'
packages, imported when chosen: Prodigy (prodigyopt; Mishchenko & Defazio 2023), Lion (lion-pytorch; Chen et al.
2023), schedule-free AdamW (schedulefree; Defazio et al. 2024) and CAME (came-pytorch; Luo et al. 2023).
Prodigy and schedule-free adapt their own step size over the run: they get a constant learning-rate schedule, and as
they take one step over all parameters at once they use the plain step, not the fused one. Schedule-free holds two
weight sequences: the trained weights are its averaged ones (`eval_weights`) whenever a save or a preview reads them.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from ..errors import UserError
from . import precision


UNET_BLOCKS = (("down", "down_blocks"), ("mid", "mid_block"), ("up", "up_blocks"))


def param_groups(params, unet, text_encoders) -> list[dict]:
    """What trains (with LoRA: only the adapters) as named parameter groups with their own rates: "unet", split into
    "unet_down" / "unet_mid" / "unet_up" (the rest stays "unet") when a block multiplier is not 1; "text_encoder";
    SDXL's second encoder its own "text_encoder_2" when its multiplier is not 1. With every multiplier 1 the groups
    are the UNet's and the text encoders' (as saved runs hold them)."""
    unet_lr, te_lr = ((params.lora_unet_learning_rate, params.lora_text_encoder_learning_rate) if params.use_lora
                      else (params.learning_rate, params.text_encoder_learning_rate))
    scales = {"down": params.unet_down_lr_scale, "mid": params.unet_mid_lr_scale, "up": params.unet_up_lr_scale}
    named = {"unet": []} if all(s == 1 for s in scales.values()) else {"unet": [], "down": [], "mid": [], "up": []}
    for name, q in unet.named_parameters():
        if q.requires_grad:
            parts = name.split(".")
            block = next((b for b, prefix in UNET_BLOCKS if prefix in parts and b in named), "unet")
            named[block].append(q)
    groups = [{"name": "unet" if block == "unet" else f"unet_{block}", "params": qs,
               "lr": unet_lr * scales.get(block, 1.0)} for block, qs in named.items() if qs or block == "unet"]
    encoders = [[q for q in m.parameters() if q.requires_grad] for m in text_encoders]
    second_apart = len(encoders) > 1 and params.text_encoder_2_lr_scale != 1
    first = [q for qs in (encoders[:1] if second_apart else encoders) for q in qs]
    if first:
        groups.append({"name": "text_encoder", "params": first, "lr": te_lr})
    if second_apart and encoders[1]:
        groups.append({"name": "text_encoder_2", "params": encoders[1], "lr": te_lr * params.text_encoder_2_lr_scale})
    return groups


# setting: (module, class, what to pip install)
PACKAGED = {"prodigy": ("prodigyopt", "Prodigy", "prodigyopt"), "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
            "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
            "came": ("came_pytorch", "CAME", "came-pytorch")}
CONSTANT_LR = ("prodigy", "schedulefree_adamw")  # they set their own step size: a schedule on top fights them
WHOLE_STEP = ("prodigy", "schedulefree_adamw")  # state shared by all parameters: no step on a part of them


def packaged_optimizer(name: str):
    """The optimizer class of a packaged optimizer; a UserError naming the setting and the package if missing."""
    module, cls, pip = PACKAGED[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(f"parameters.optimizer: {name} needs the {pip} package, which is not installed "
                        f"(pip install {pip}, or choose adamw)") from None


def make_optimizer(params, unet, text_encoders):
    groups = param_groups(params, unet, text_encoders)
    betas = (params.adam_beta1, params.adam_beta2)
    if params.optimizer == "prodigy":
        # It finds one step size for all parameter groups (its lr multiplies it and must be the same in every group
        # that trains): 1 where a rate is set, 0 where it is 0.
        for g in groups:
            g["lr"] = 1.0 if g["lr"] > 0 else 0.0
        return packaged_optimizer("prodigy")(groups, lr=1.0, betas=betas, eps=params.adam_epsilon,
                                             weight_decay=params.weight_decay, use_bias_correction=True,
                                             safeguard_warmup=True)
    if params.optimizer == "lion":
        return packaged_optimizer("lion")(groups, betas=betas, weight_decay=params.weight_decay)
    if params.optimizer == "schedulefree_adamw":
        optimizer = packaged_optimizer("schedulefree_adamw")(
            groups, betas=betas, eps=params.adam_epsilon, weight_decay=params.weight_decay,
            warmup_steps=params.lr_warmup_steps)
        optimizer.train()
        return optimizer
    if params.optimizer == "came":
        return packaged_optimizer("came")(groups, lr=groups[0]["lr"], betas=(*betas, 0.9999),
                                          weight_decay=params.weight_decay)
    if params.optimizer == "adamw":
        # The fused kernel where this PyTorch has one for the device: one launch for all parameters, no temporaries.
        devices = {p.device for g in groups for p in g["params"]}
        fused = {"fused": True} if len(devices) == 1 and has_fused_adamw(devices.pop()) else {}
        return torch.optim.AdamW(groups, betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_epsilon,
                                 weight_decay=params.weight_decay, **fused)
    if params.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("parameters.optimizer: adamw_8bit needs bitsandbytes, which is not installed "
                            "(pip install bitsandbytes, or choose adamw)") from None
        return adamw_8bit_class(bnb)(groups, betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_epsilon,
                                     weight_decay=params.weight_decay)
    if params.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (ours, per group) instead of Adafactor's own relative step size.
        return Adafactor(groups, lr=params.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=params.weight_decay)
    raise UserError(f"parameters.optimizer: unknown optimizer {params.optimizer!r}")


def adamw_8bit_class(bnb):
    """bitsandbytes' 8-bit AdamW, its step taken without the wait for the whole device that its own step runs after
    every parameter (`torch.cuda.synchronize()`, bitsandbytes 0.42 to 0.50 at least).

    Those waits are about 900 round trips to the GPU per SD1.5 step, each with nothing else queued behind it: tens of
    milliseconds a step, and inside the fused step each bucket's first wait also drains the queue the backward pass
    had built up. They are not needed here: the update kernels run on the default stream, as the trainer does, so
    the stream's order keeps each update after the gradient it reads and before any later use of that gradient's
    memory. Same state, same arithmetic, same per-parameter loop as bitsandbytes' step (a paged optimizer, whose
    state moves on its own, keeps that step).
    """

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


def check_optimizer_runs_here(params, device=None) -> None:
    """Before any model loads: can the chosen optimizer take a step on this machine? UserError naming the setting and
    the alternative if not.

    A packaged optimizer needs its package. bitsandbytes' 8-bit AdamW runs on CUDA GPUs; on a CPU only from
    bitsandbytes 0.50 on (0.42 asserts that torch has CUDA, 0.45 - 0.49 ask for a GPU). One step on a small tensor
    on the training device tells."""
    if params.optimizer in PACKAGED:
        packaged_optimizer(params.optimizer)
        return
    if params.optimizer != "adamw_8bit":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError("parameters.optimizer: adamw_8bit needs bitsandbytes, which is not installed "
                        "(pip install bitsandbytes, or choose adamw)") from e
    except Exception as e:  # a broken install failing while it loads its library
        raise UserError(f"parameters.optimizer: adamw_8bit needs bitsandbytes, which fails to load "
                        f"({type(e).__name__}); choose adamw") from e
    device = torch.device(device) if device is not None else precision.training_device()
    try:
        trial = torch.nn.Parameter(torch.zeros(4096, device=device))  # 4096: bitsandbytes' smallest 8-bit tensor
        trial.grad = torch.ones_like(trial)
        bnb.optim.AdamW8bit([trial], lr=1e-3).step()
        stepped = bool(torch.isfinite(trial.detach()).all()) and float(trial.detach()[0]) < 0
        problem = None if stepped else "its step did not change the weights"
    except Exception as e:  # AssertionError, RuntimeError, NameError ... from bitsandbytes' device checks
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
    if problem:
        where = "a CPU (bitsandbytes 0.50 or newer runs it there)" if device.type == "cpu" else f"{device}"
        raise UserError(f"parameters.optimizer: adamw_8bit cannot run on {where} with the installed bitsandbytes "
                        f"{getattr(bnb, '__version__', '?')} ({problem}); choose adamw (more memory) or adafactor")


def runnable_optimizer(params, device=None) -> str:
    """The optimizer a run uses: the chosen one when it runs here. 8-bit AdamW (the default) that cannot run here
    (no bitsandbytes, or one that cannot step on this device, as on a CPU with bitsandbytes before 0.50) gives way to
    AdamW, said once in a warning, as fp16 gives way on a CPU; any other that cannot run is a UserError."""
    try:
        check_optimizer_runs_here(params, device)
    except UserError as e:
        if params.optimizer != "adamw_8bit":
            raise
        warnings.warn(f"{e}: this run uses adamw instead (more memory for its state)", stacklevel=2)
        return "adamw"
    return params.optimizer


def make_lr_scheduler(params, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    if params.optimizer in CONSTANT_LR and params.lr_scheduler != "constant":
        warnings.warn(f"lr_scheduler: {params.optimizer} finds its own step size over the run; using a constant "
                      f"learning rate instead of {params.lr_scheduler}", stacklevel=2)
        return get_scheduler("constant", optimizer)
    kwargs = {"num_warmup_steps": params.lr_warmup_steps, "num_training_steps": total_steps}
    if params.lr_scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = params.lr_cycles
    if params.lr_scheduler == "polynomial":
        kwargs["power"] = params.lr_power
    if params.lr_scheduler == "constant":
        kwargs = {}
    return get_scheduler(params.lr_scheduler, optimizer, **kwargs)


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on `device`: CUDA GPUs, and from PyTorch 2.4 the CPU too."""
    if precision.detect(device).gpu:
        return True
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older PyTorch: CUDA only
        return False
    return device.type in _get_fused_kernels_supported_devices()


# -- memory-lean optimizer steps ---------------------------------------------------------------------------------

def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability proportional to the distance (unbiased on average).

    bf16 is the top half of an fp32 bit pattern: adding uniform random bits to the lower half and cutting them off
    rounds the magnitude up exactly with probability (lower half / 2^16). Small updates that round-to-nearest would
    lose every time (weight + lr x update == weight in bf16) survive on average.
    """
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the lower 16 bits (0xFFFF0000 as a signed int32)
    return rounded.view(torch.float32).to(torch.bfloat16)


class ParamStepper:
    """Applies the optimizer to some of its parameters, with the optimizer's own update rule and state.

    The one optimizer keeps its parameter groups (learning rates, the LR scheduler, saving and resuming are
    unchanged); for a step its groups are narrowed to the parameters given, which then take one multi-tensor step
    (foreach or fused kernels where the optimizer has them). Parameters held in bf16 (pure bf16) are updated in fp32
    (so the optimizer state is fp32 or 8-bit, as with fp32 weights) and written back with stochastic rounding.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}

    @property
    def skips_on_device(self) -> bool:
        """Whether the optimizer's step takes a `found_inf` flag and skips the update on the device when it is set
        (torch's fused Adam and AdamW): an overflowed fp16 step then needs no host sync."""
        return getattr(self.optimizer, "_step_supports_amp_scaling", False)

    def step(self, params: list, found_inf: torch.Tensor | None = None) -> None:
        """One step of `params`; with `found_inf` (only where `skips_on_device`), none where it holds 1."""
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        narrowed = [[] for _ in groups]
        for p in params:
            narrowed[self.group_of[id(p)]].append(p)
        low = [(p, p.data, p.grad) for p in params if p.dtype == torch.bfloat16]
        try:
            for g, mine in zip(groups, narrowed):
                g["params"] = mine
            for p, data, grad in low:
                p.data, p.grad = data.float(), grad.float()
            if found_inf is not None:
                self.optimizer.found_inf = found_inf  # read by the step as GradScaler hands it over
            self.optimizer.step()
            for p, data, _grad in low:
                data.copy_(stochastic_round_to_bf16(p.data))
        finally:
            if found_inf is not None:
                del self.optimizer.found_inf
            for p, data, grad in low:
                p.data, p.grad = data, grad
            for g, mine in zip(groups, saved):
                g["params"] = mine


BUCKET_BYTES = 32 * 2**20  # gradients held at once by the fused step: one optimizer call per 32 MiB of them, or per
BUCKETS = 16               # sixteenth of all the gradients when that is less (a small model still saves 15/16)


class FusedBackwardStep:
    """The optimizer step fused into the backward pass: parameters are updated, and their gradients freed, as soon as
    their gradients are ready (`register_post_accumulate_grad_hook`), a bucket at a time: once the ready gradients
    reach `bucket_bytes` (or a sixteenth of all the gradients, when less), their parameters take one multi-tensor
    optimizer step. So gradients never all exist at once
    (at most a bucket of them), and the optimizer runs a few dozen times per step, not once per tensor.

    What cannot be done exactly without all gradients at hand:
    - clipping by the global norm: each gradient is clipped to `max_grad_norm` by its own norm instead;
    - fp16 loss scaling: each bucket's gradients are unscaled together and a bucket with an overflowed gradient is
      not updated this step (the plain step skips all of them); the loss scale then backs off as usual. With torch's
      fused AdamW the skip happens on the device; other optimizers read each bucket's overflow flag (a host sync);
    - gradient accumulation > 1: not served (make_fused_step falls back to the plain step).
    """

    def __init__(self, optimizer, params, max_grad_norm: float = 0.0, scaler=None, bucket_bytes: int = BUCKET_BYTES):
        self.stepper = ParamStepper(optimizer)
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        trained = [p for p in params if p.requires_grad]
        self.bucket_bytes = min(bucket_bytes, max(1, sum(p.numel() * p.element_size() for p in trained) // BUCKETS))
        self.bucket, self.bucket_size = [], 0
        self.scale, self.inv_scale = None, None  # the loss scale; its inverse, a 0-d tensor on the gradients' device
        self.overflows = []  # the step's overflow flags, one per bucket (device tensors)
        self._growth = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in trained]

    def _ready(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self.bucket.append(p)
        self.bucket_size += p.grad.numel() * p.grad.element_size()
        if self.bucket_size >= self.bucket_bytes:
            self._step_bucket()

    def _step_bucket(self) -> None:
        params, self.bucket, self.bucket_size = self.bucket, [], 0
        if not params:
            return
        grads = [p.grad for p in params]
        found_inf = None
        if self.scaler is not None and self.scaler.is_enabled():
            found_inf = self._unscale(grads)
            if not self.stepper.skips_on_device:
                if found_inf.item():  # one host sync per bucket
                    for p in params:
                        p.grad = None
                    return
                found_inf = None
        if self.max_grad_norm > 0:  # per tensor: scale down to max_grad_norm when its own norm is above
            if all(g.dtype == torch.float32 for g in grads):
                norms = list(torch._foreach_norm(grads))
            else:  # bf16 gradients (pure bf16): their norms in fp32
                norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            factors = torch._foreach_add(norms, 1e-6)
            torch._foreach_reciprocal_(factors)
            torch._foreach_mul_(factors, self.max_grad_norm)
            torch._foreach_clamp_max_(factors, 1.0)
            torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors, grads)])
        self.stepper.step(params, found_inf)
        for p in params:
            p.grad = None

    def _unscale(self, grads: list) -> torch.Tensor:
        """Divide the gradients by the loss scale in place (one multi-tensor kernel, as GradScaler does); returns a
        0-d flag on their device, 1 when any of them overflowed. The scale is read from the scaler once per run
        (the first bucket; then `finish_step` keeps it), not at every step: reading it waits for the device."""
        device = grads[0].device
        if self.inv_scale is None:
            self.scale = self.scaler.get_scale()
            self.inv_scale = torch.full((), 1.0 / self.scale, dtype=torch.float32, device=device)
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.inv_scale)
        self.overflows.append(found_inf)
        return found_inf

    def finish_step(self) -> None:
        """After backward: the last bucket; the loss scale backs off after an overflow, grows after
        `growth_interval` clean steps (one host sync per step, for the overflow flags)."""
        self._step_bucket()
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled() and self.inv_scale is not None:
            scale = self.scale
            if self.overflows and bool(torch.stack(self.overflows).any()):
                scale, self._growth = scale * scaler.get_backoff_factor(), 0
            else:
                self._growth += 1
                if self._growth >= scaler.get_growth_interval():
                    scale, self._growth = scale * scaler.get_growth_factor(), 0
            scaler.update(scale)
            if scale != self.scale:
                self.scale = scale
                self.inv_scale.fill_(1.0 / scale)
        self.overflows = []

    def discard(self) -> None:
        """Forget the gradients waiting in the bucket (a step that failed half-way is run again)."""
        self.bucket, self.bucket_size = [], 0
        self.scale, self.inv_scale, self.overflows = None, None, []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def make_fused_step(params, optimizer, trainable, accelerator=None):
    """The fused step when the settings ask for it and can have it, else None (the plain step)."""
    if not params.fused_backward_step:
        return None
    if params.optimizer in WHOLE_STEP:
        warnings.warn(f"fused_backward_step: {params.optimizer} takes one step over all parameters at once; using "
                      "the plain optimizer step (gradients cost memory again)", stacklevel=2)
        return None
    if params.gradient_accumulation_steps > 1:
        warnings.warn("fused_backward_step: gradient accumulation needs every gradient kept until the last "
                      "micro-batch; using the plain optimizer step (gradients cost memory again)", stacklevel=2)
        return None
    if accelerator is not None and accelerator.num_processes > 1:
        warnings.warn("fused_backward_step: with several processes a gradient is averaged across them after it is "
                      "ready; using the plain optimizer step", stacklevel=2)
        return None
    raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real optimizer
    scaler = getattr(accelerator, "scaler", None) if accelerator is not None else None
    return FusedBackwardStep(raw, trainable, params.max_grad_norm, scaler)


@contextlib.contextmanager
def eval_weights(optimizer):
    """The weights a save or a preview reads: schedule-free AdamW's averaged sequence while the block runs (then
    back to the one it trains); any other optimizer's weights as they are."""
    raw = getattr(optimizer, "optimizer", optimizer)
    switches = _schedule_free(raw)
    if switches:
        raw.eval()
    try:
        yield
    finally:
        if switches:
            raw.train()


def train_weights(optimizer) -> None:
    """Schedule-free AdamW after its state was loaded (saved with the averaged weights): back to training ones."""
    raw = getattr(optimizer, "optimizer", optimizer)
    if _schedule_free(raw):
        raw.train()


def _schedule_free(optimizer) -> bool:
    return type(optimizer).__module__.split(".")[0] == "schedulefree"


def plain_step_pure_bf16(optimizer, params) -> None:
    """The plain (unfused) step when weights are held in bf16: one parameter at a time, stochastically rounded."""
    ParamStepper(getattr(optimizer, "optimizer", optimizer)).step([p for p in params if p.grad is not None])
