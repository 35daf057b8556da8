"""Memory-lean training (fused_backward_step, pure_bf16, frozen_precision) and the memory plan.

The plan is checked against arithmetic (weights, gradients, optimizer state: exact) and against a measurement of the
same step run for real on the CPU: the c10 CPU allocator reports every allocation and free to the profiler, so the
measured peak is the bytes held before the step plus the highest running sum of those events during it.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth.config import Config, Parameters
from dreambooth.train.components import prepare_for_training
from dreambooth.train.precision import CPU, DtypePlan, Hardware
from dreambooth.train.memory import (Architecture, _PlanAccelerator, arithmetic_plan, plan_architecture,
                                     StorageTracker)
from dreambooth.train.optim import (FusedBackwardStep, ParamStepper, make_fused_step, make_lr_scheduler,
                                    make_optimizer, stochastic_round_to_bf16)
from dreambooth.train.step import Batch, TrainStep

from train_helpers import tiny_text_encoder, tiny_unet


def tiny_architecture(device: str = "meta") -> Architecture:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=64)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                                          projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1))
        return Architecture(unet, vae, (te,), DDPMScheduler(), False)


def batch(n=1, side=8):
    return Batch(latents=torch.randn(n, 4, side, side), input_ids=(torch.randint(0, 1000, (n, 77)),))


# -- the fused step ------------------------------------------------------------------------------------------------

def train_tiny(params: Parameters, steps: int = 3, optimizer=None, lrs: list | None = None):
    """Train the tiny model `steps` steps; with `lrs`, under the LR schedule of `params` (total 6 steps), recording
    the rates each step applied."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    te.requires_grad_(True)
    opt = optimizer(unet, te) if optimizer else make_optimizer(params, unet, (te,))
    trained = [p for m in (unet, te) for p in m.parameters()]
    fused = make_fused_step(params, opt, trained)
    schedule = make_lr_scheduler(params, opt, total_steps=6) if lrs is not None else None
    step = TrainStep(unet, (te,), DDPMScheduler(), params, sdxl=False, optimizer=opt, trainable_params=trained,
                     fused=fused, lr_scheduler=schedule)
    torch.manual_seed(1)
    for _ in range(steps):
        if lrs is not None:
            lrs.append([g["lr"] for g in opt.param_groups])
        step(batch(2), train_text_encoder=True)
    return [p.detach().clone() for p in trained], opt


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                      "polynomial"])
def test_the_lr_schedule_advances_alike_on_the_fused_and_the_plain_step(schedule):
    """Once per optimizer step, after it: the same rate at every step on both paths, and (AdamW, fp32) the same
    weights within 1e-6 relative."""
    kw = dict(optimizer="adamw", learning_rate=1e-3, text_encoder_learning_rate=5e-4, max_grad_norm=0.0,
              lr_scheduler=schedule, lr_warmup_steps=2, lr_cycles=2, lr_power=2.0)
    plain_lrs, fused_lrs = [], []
    plain, _ = train_tiny(Parameters(fused_backward_step=False, **kw), steps=6, lrs=plain_lrs)
    fused, _ = train_tiny(Parameters(fused_backward_step=True, **kw), steps=6, lrs=fused_lrs)
    assert fused_lrs == plain_lrs
    assert [unet for unet, _te in plain_lrs[:3]] == pytest.approx([0.0, 5e-4, 1e-3])  # the warm-up
    if schedule != "constant_with_warmup":
        assert plain_lrs[-1][0] < 1e-3  # and the decay
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_fused_backward_step_gives_the_plain_steps_weights_adamw_fp32():
    """Tolerance: 1e-6 relative (the same single-tensor AdamW arithmetic on the same gradients, in another order)."""
    kw = dict(optimizer="adamw", learning_rate=1e-3, text_encoder_learning_rate=5e-4, max_grad_norm=0.0)
    plain, _ = train_tiny(Parameters(fused_backward_step=False, **kw))
    fused, opt = train_tiny(Parameters(fused_backward_step=True, **kw))
    moved = train_tiny(Parameters(fused_backward_step=False, **kw), steps=0)[0]
    assert any(not torch.equal(a, b) for a, b in zip(plain, moved))  # the weights did train
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])  # every gradient was freed


def test_fused_backward_step_8bit_adamw_matches_the_plain_step():
    """bitsandbytes updates each parameter on its own either way: same weights up to float rounding, far inside
    the 8-bit state's quantisation (1e-4 relative)."""
    pytest.importorskip("bitsandbytes")
    kw = dict(optimizer="adamw_8bit", learning_rate=1e-3, text_encoder_learning_rate=5e-4, max_grad_norm=0.0)
    plain, _ = train_tiny(Parameters(fused_backward_step=False, **kw))
    fused, _ = train_tiny(Parameters(fused_backward_step=True, **kw))
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_8bit_adamw_is_bitsandbytes_step_without_its_waits_for_the_device(monkeypatch):
    """The trainer's 8-bit AdamW takes bitsandbytes' own step (the same weights and state, bit for bit, for tensors
    with 8-bit and with 32-bit state) without the wait for the whole device that bitsandbytes runs after each
    parameter; on the plain step and inside the fused step's buckets alike."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.optim.optimizer as bnb_optimizer
    from dreambooth.train.optim import param_groups

    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(t))
    params = Parameters(optimizer="adamw_8bit", learning_rate=1e-3, text_encoder_learning_rate=5e-4)
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    te.requires_grad_(True)
    theirs_unet, theirs_te = tiny_unet(), tiny_text_encoder()
    theirs_unet.load_state_dict(unet.state_dict())
    theirs_te.load_state_dict(te.state_dict())
    theirs_te.requires_grad_(True)
    ours = make_optimizer(params, unet, (te,))
    theirs = bnb.optim.AdamW8bit(param_groups(params, theirs_unet, (theirs_te,)), betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=1e-2)
    mine = [p for g in ours.param_groups for p in g["params"]]
    other = [p for g in theirs.param_groups for p in g["params"]]
    assert any(p.numel() >= 4096 for p in mine) and any(p.numel() < 4096 for p in mine)  # 8-bit and 32-bit state
    for _ in range(3):
        for a, b in zip(mine, other):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        assert not waits
        theirs.step()
        assert len(waits) == len(other)  # bitsandbytes' own step waits once per parameter
        waits.clear()
    assert all(torch.equal(a, b) for a, b in zip(mine, other))
    for a, b in zip(mine, other):
        assert ours.state[a].keys() == theirs.state[b].keys()
        assert all(torch.equal(torch.as_tensor(ours.state[a][k]), torch.as_tensor(theirs.state[b][k]))
                   for k in ours.state[a])
    train_tiny(replace(params, fused_backward_step=True))
    assert not waits


def test_fused_backward_step_adafactor_trains():
    kw = dict(optimizer="adafactor", learning_rate=1e-3, max_grad_norm=0.0)
    plain, _ = train_tiny(Parameters(fused_backward_step=False, **kw))
    fused, _ = train_tiny(Parameters(fused_backward_step=True, **kw))
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_fused_backward_step_clips_each_tensor_by_its_own_norm():
    """Global-norm clipping needs every gradient first: the fused step clips each gradient to max_grad_norm alone."""
    def sgd(unet, te):
        return torch.optim.SGD([{"params": list(unet.parameters())}, {"params": list(te.parameters())}], lr=1.0)

    before = train_tiny(Parameters(), steps=0, optimizer=sgd)[0]
    after, _ = train_tiny(Parameters(max_grad_norm=1e-3, fused_backward_step=True), steps=1, optimizer=sgd)
    moves = [torch.linalg.vector_norm(a - b).item() for a, b in zip(after, before)]
    assert max(moves) <= 1e-3 * (1 + 1e-4)
    assert sum(m > 0.9e-3 for m in moves) > 10  # many tensors moved the full max norm each: not one global norm
    total = sum(m * m for m in moves) ** 0.5
    assert total > 3e-3


def test_fused_backward_step_falls_back_with_gradient_accumulation():
    unet = tiny_unet()
    opt = make_optimizer(Parameters(optimizer="adamw"), unet, ())
    with pytest.warns(UserWarning, match="fused_backward_step: gradient accumulation"):
        assert make_fused_step(Parameters(gradient_accumulation_steps=2), opt, list(unet.parameters())) is None
    assert make_fused_step(Parameters(fused_backward_step=False), opt, list(unet.parameters())) is None
    fused = make_fused_step(Parameters(), opt, list(unet.parameters()))
    assert isinstance(fused, FusedBackwardStep)
    fused.remove()


def test_fused_backward_step_steps_buckets_of_parameters_with_one_optimizer_call_each():
    """The ready gradients are stepped a bucket at a time: one optimizer call per bucket (not per tensor), the same
    weights as one tensor at a time, and never more than a bucket of gradients held at once (plus the tensor that
    filled it); a bucket is at most a sixteenth of all the gradients."""
    from diffusers import DDPMScheduler

    results = {}
    for bucket_bytes in (1, 4 * 2**10, 2**40):  # one tensor at a time, 4 KiB, the default (capped)
        torch.manual_seed(0)
        unet = tiny_unet()
        params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        calls, held = [], []
        opt.step = (lambda step: lambda *a, **k: calls.append(1) or step(*a, **k))(opt.step)
        for p in params:  # gradients held when each arrives (this hook runs before the fused step's own)
            p.register_post_accumulate_grad_hook(
                lambda q: held.append(sum(x.grad.numel() * 4 for x in params if x.grad is not None)))
        fused = FusedBackwardStep(opt, params, bucket_bytes=bucket_bytes)
        step = TrainStep(unet, (tiny_text_encoder(),), DDPMScheduler(), Parameters(max_grad_norm=1.0), sdxl=False,
                         optimizer=opt, trainable_params=params, fused=fused)
        torch.manual_seed(1)
        step(batch(2), train_text_encoder=False)
        results[bucket_bytes] = ([p.detach().clone() for p in params], len(calls), max(held))
    (one_by_one, n1, _), (bucketed, n2, held2), (capped, n3, held3) = results.values()
    total, largest = sum(p.numel() * 4 for p in one_by_one), max(p.numel() * 4 for p in one_by_one)
    assert total // 16 > 4 * 2**10  # the tiny UNet: 4 KiB buckets are below the cap
    assert n1 == len(one_by_one) and 1 < n3 <= 17 and n3 < n2 < n1
    assert held2 <= 4 * 2**10 + largest and held3 <= total // 16 + largest
    for a, b in zip(one_by_one, bucketed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


class StandInScaler:
    """The part of torch's GradScaler the fused step uses."""

    def __init__(self):
        self.scale, self.updated = 1024.0, None

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale

    def get_backoff_factor(self):
        return 0.5

    def get_growth_factor(self):
        return 2.0

    def get_growth_interval(self):
        return 2000

    def update(self, new_scale):
        self.updated = new_scale


class HostReads(TorchDispatchMode):
    """Counts the host's reads of a tensor's value (`.item()`, `bool(t)`, `.tolist()`): on a GPU each waits for the
    device. (On a CPU `tolist` reads memory without dispatching an operation: it is counted by a wrapper.)"""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["sgd", "fused adamw"])
def test_fused_backward_step_fp16_skips_an_overflowed_bucket_and_backs_off(optimizer, monkeypatch):
    """A bucket whose gradients overflowed is skipped; the others are unscaled and applied; the scale backs off.
    torch's fused AdamW skips on the device, without reading anything back while the backward pass runs; another
    optimizer reads each bucket's overflow flag."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = (torch.optim.SGD([a, b], lr=1.0) if optimizer == "sgd"
           else torch.optim.AdamW([a, b], lr=1.0, weight_decay=0.0, fused=True))
    scaler = StandInScaler()
    fused = FusedBackwardStep(opt, [a, b], scaler=scaler, bucket_bytes=1)  # one tensor per bucket
    loss = (a * torch.tensor([1024.0, 2048.0, 0.0])).sum() + (b * torch.tensor([float("inf"), 0.0, 0.0])).sum()
    with HostReads(monkeypatch) as reads:
        loss.backward()
    fused.finish_step()
    if optimizer == "sgd":
        assert torch.equal(a.detach(), torch.tensor([0.0, -1.0, 1.0]))  # unscaled gradient (1, 2, 0) applied
        assert reads.count == 2
    else:
        torch.testing.assert_close(a.detach(), torch.tensor([0.0, 0.0, 1.0]))  # AdamW's first step: lr x sign(g)
        assert opt.state[b]["step"] == 0 and reads.count == 0
    assert torch.equal(b.detach(), torch.ones(3))  # overflowed: skipped
    assert scaler.updated == 512.0
    loss = (a * torch.tensor([512.0, 0.0, 0.0])).sum() + (b * torch.tensor([0.0, 512.0, 0.0])).sum()
    loss.backward()
    fused.finish_step()
    assert scaler.updated == 512.0 and not torch.equal(b.detach(), torch.ones(3))  # a clean step: all applied


@pytest.mark.parametrize("optimizer,precision", [("adamw", "no"), ("adamw", "fp16"), ("adamw_8bit", "no")])
def test_the_fused_step_reads_nothing_back_from_the_device_during_the_backward_pass(optimizer, precision,
                                                                                   monkeypatch):
    """With torch's fused AdamW (fp32, and fp16 with its loss scale) and with 8-bit AdamW, the backward pass with
    every bucket's update and the loss scale's update reads no tensor value back on the host but the overflow flags
    at its end, so on a GPU the host never waits for the device inside it."""
    from diffusers import DDPMScheduler

    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    te.requires_grad_(True)
    params = Parameters(optimizer=optimizer, max_grad_norm=1.0)
    opt = make_optimizer(params, unet, (te,))
    trained = [p for m in (unet, te) for p in m.parameters()]
    fused = make_fused_step(params, opt, trained)
    if precision == "fp16":
        fused.scaler = StandInScaler()
    step = TrainStep(unet, (te,), DDPMScheduler(), params, sdxl=False, optimizer=opt, trainable_params=trained,
                     fused=fused)
    step(batch(2), train_text_encoder=True)  # the optimizer state is made
    out = step.compute_loss(batch(2))  # the models' forward (transformers 4.30's CLIP reads a value there)
    with HostReads(monkeypatch) as reads:
        out.loss.backward()
        fused.finish_step()
    assert reads.count == (1 if precision == "fp16" else 0)


# -- pure bf16 -----------------------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased():
    x = torch.full((20000,), 1.0 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 (1 + 2^-7)... 1/8 here
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-4)
    assert torch.equal(stochastic_round_to_bf16(torch.tensor([1.5, -2.0])).float(), torch.tensor([1.5, -2.0]))


def test_pure_bf16_with_stochastic_rounding_trains_to_a_lower_loss_than_plain_bf16_rounding():
    """Weights near 1 in bf16 move in steps of 2^-7; AdamW's 1e-4 updates round away to nothing with round-to-nearest,
    and survive on average with stochastic rounding."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    target = x @ (torch.ones(16) + 0.03)

    def train(stochastic: bool) -> float:
        w = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
        opt = torch.optim.AdamW([w], lr=1e-4, weight_decay=0.0)
        stepper = ParamStepper(opt)
        for _ in range(400):
            loss = ((x.bfloat16() @ w).float() - target).pow(2).mean()
            loss.backward()
            stepper.step([w]) if stochastic else opt.step()
            w.grad = None
        return ((x @ w.detach().float()) - target).pow(2).mean().item()

    torch.manual_seed(1)
    stochastic, nearest = train(True), train(False)
    assert stochastic < 0.5 * nearest


def test_pure_bf16_holds_trained_weights_in_bf16_and_steps_them():
    from diffusers import DDPMScheduler

    params = Parameters(pure_bf16=True, optimizer="adamw", learning_rate=1e-3, max_grad_norm=1.0,
                        fused_backward_step=False)
    unet, te, vae = tiny_unet(), tiny_text_encoder(), tiny_architecture("cpu").vae
    prepare_for_training(unet, vae, [te], params, "cpu", DtypePlan.decide(params, CPU, sdxl=False))
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    opt = make_optimizer(params, unet, (te,))
    trained = [p for m in (unet, te) for p in m.parameters()]
    before = [p.detach().clone() for p in trained]
    step = TrainStep(unet, (te,), DDPMScheduler(), params, sdxl=False, optimizer=opt, trainable_params=trained,
                     accelerator=_PlanAccelerator("cpu"), pure_bf16=True,
                     autocast_dtype=torch.bfloat16)
    step(batch(1), train_text_encoder=True)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in trained)
    assert sum(not torch.equal(a, b) for a, b in zip(trained, before)) > len(trained) // 2
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.float32  # optimizer state is fp32 (the update runs in fp32)


def test_prepare_for_training_holds_each_part_in_the_plans_dtype():
    arch = tiny_architecture()
    params = Parameters(train_text_encoder_ratio=0.0, mixed_precision="fp16")
    dtypes = DtypePlan.decide(params, Hardware(gpu=True, bf16=True), sdxl=False)
    prepare_for_training(arch.unet, arch.vae, list(arch.text_encoders), params, "meta", dtypes)
    assert arch.vae.dtype == torch.float16 and arch.text_encoders[0].dtype == torch.float16
    assert next(arch.unet.parameters()).dtype == torch.float32


# -- the memory plan -----------------------------------------------------------------------------------------------

def test_storage_tracker_counts_views_once_and_frees():
    tracker = StorageTracker(rounding=512)
    with tracker.recording():
        a = torch.empty(1000)  # 4000 bytes -> 4096
        b = a[10:]  # a view: no new storage
        c = torch.empty(10)  # 40 -> 512
        del c
        d = torch.empty(100)  # 400 -> 512
    assert tracker.peak == 4096 + 512 and tracker.total == 4096 + 512
    del a, b
    assert tracker.total == 512 and d.numel() == 100


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "adafactor", "prodigy", "lion", "schedulefree_adamw",
                                       "came"])
def test_plan_weights_gradients_and_optimizer_equal_the_arithmetic(optimizer):
    """Exact: every tensor costs its bytes rounded up to the CUDA allocator's 512-byte blocks; AdamW and Adafactor
    keep one scalar tensor per parameter (step count / RMS) besides their moments."""
    params = Parameters(optimizer=optimizer, fused_backward_step=False, resolution=64)
    plan = plan_architecture(tiny_architecture(), params)
    expected = arithmetic_plan(tiny_architecture(), params)
    if optimizer == "prodigy":  # its step reads a value back (d), which a trace cannot: the arithmetic, said so
        assert not plan.traced and "could not be traced" in plan.notes[0]
        assert (plan.weights, plan.gradients, plan.optimizer) == (expected.weights, expected.gradients,
                                                                   expected.optimizer)
        return
    assert plan.traced, plan.notes
    assert plan.weights == expected.weights > 0
    assert plan.created["gradients"] == expected.gradients == expected.weights  # every gradient, fp32 like the weight
    assert plan.optimizer == expected.optimizer > 0
    arch = tiny_architecture()
    n = sum(p.numel() for m in (arch.unet, *arch.text_encoders) for p in m.parameters())
    per_param = {"adamw": 8, "adamw_8bit": 2, "adafactor": 0, "prodigy": 16, "lion": 4, "schedulefree_adamw": 8,
                 "came": 4}[optimizer]
    assert plan.optimizer >= per_param * n


def test_the_plan_counts_the_ema_copy_of_the_unet():
    """EMA keeps a copy of every UNet weight on the device for the whole run: the plan shows it as its own part, the
    same in the trace and the arithmetic, and nothing else moves."""
    from dreambooth.train.memory import CUDA_BLOCK, block_bytes

    params = Parameters(optimizer="adamw", resolution=64)
    copy = sum(block_bytes(p.numel() * 4, CUDA_BLOCK) for p in tiny_architecture().unet.parameters())
    without, with_ema = (plan_architecture(tiny_architecture(), replace(params, use_ema=on)) for on in (False, True))
    assert with_ema.traced and without.ema == 0 and with_ema.ema == copy
    assert with_ema.peak - without.peak == copy
    assert arithmetic_plan(tiny_architecture(), replace(params, use_ema=True)).ema == copy
    lora = plan_architecture(tiny_architecture(), replace(params, use_lora=True))
    assert lora.ema == 0


@pytest.mark.slow
def test_plan_peak_is_the_measured_cpu_peak():
    """The plan for the CPU (target "cpu": no allocator rounding, fp32) against the same step run for real here, peak
    bytes from the CPU allocator's own events (see the module doc). Within 10% (here it agrees to about 0.1%)."""
    from torch.profiler import ProfilerActivity, profile

    for kw in (dict(), dict(fused_backward_step=False, optimizer="adamw"), dict(cache_latents=False)):
        params = Parameters(resolution=64, mixed_precision="no", **kw)
        plan = plan_architecture(tiny_architecture(), params, target="cpu")
        assert plan.traced, plan.notes

        arch = tiny_architecture("cpu")
        prepare_for_training(arch.unet, arch.vae, list(arch.text_encoders), params, "cpu",
                             DtypePlan.decide(params, CPU, sdxl=False))
        opt = make_optimizer(params, arch.unet, arch.text_encoders)
        trained = [p for m in (arch.unet, *arch.text_encoders) for p in m.parameters()]
        step = TrainStep(arch.unet, arch.text_encoders, arch.noise_scheduler, params, sdxl=False, vae=arch.vae,
                         optimizer=opt, trainable_params=trained, fused=make_fused_step(params, opt, trained))

        def run():
            if params.cache_latents:
                latents = torch.randn(1, 4, 8, 8)
            else:
                with torch.no_grad():
                    latents = arch.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.sample()
            step(Batch(latents=latents, input_ids=(torch.randint(0, 1000, (1, 77)),)), True)

        run()  # the optimizer state exists from the first step on, as in the plan
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*(x for m in (arch.unet, arch.vae, *arch.text_encoders)
                            for x in [*m.parameters(), *m.buffers()]),
                          *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        running = highest = 0
        for e in events:
            running += e.nbytes()
            highest = max(highest, running)
        measured = sum(held.values()) + highest
        assert plan.peak == pytest.approx(measured, rel=0.10), (kw, plan.breakdown(), measured)


@pytest.mark.slow
def test_memory_settings_lower_the_planned_peak():
    base = Parameters(resolution=64, fused_backward_step=False, frozen_precision="full")
    plans = {}
    for name, changes in {"plain": {}, "fused": dict(fused_backward_step=True),
                          "pure_bf16": dict(fused_backward_step=True, pure_bf16=True),
                          "checkpointing": dict(gradient_checkpointing=True)}.items():
        plans[name] = plan_architecture(tiny_architecture(), replace(base, **changes))
    assert plans["fused"].gradients < plans["plain"].created["gradients"]
    assert plans["pure_bf16"].weights * 2 == pytest.approx(plans["fused"].weights, rel=0.05)  # 512-byte blocks
    assert plans["checkpointing"].activations < plans["plain"].activations or \
        plans["checkpointing"].peak <= plans["plain"].peak


# -- presets and the CLI -------------------------------------------------------------------------------------------

def test_every_vram_preset_validates_and_larger_cards_get_faster_settings():
    from dreambooth.families import FAMILIES
    from dreambooth.train.memory import PRESET_SIZES, PRESETS, preset_for, rung_settings

    assert "v1" in PRESETS and set(PRESETS) <= set(FAMILIES)  # others are planned when asked for
    rungs = [settings for _label, settings in rung_settings()]
    for family, table in PRESETS.items():
        assert tuple(table) == PRESET_SIZES
        order = []
        for size, settings in table.items():
            if settings is None:  # nothing fits this card
                continue
            config = Config().with_parameters(**settings)  # every value passes its declared checks
            assert config.problems(training=False) == [], (family, size)
            assert settings in rungs, (family, size)  # a rung of the ladder, chosen by the plan
            order.append(rungs.index(settings))
            assert preset_for(family, size + 0.5) == (size, settings)
        assert order == sorted(order, reverse=True), family  # more memory: the same or a faster rung
    with pytest.raises(Exception, match="below the smallest preset"):
        preset_for("v1", 4)


@pytest.mark.slow
def test_cli_plan_and_preset(tiny_source, tmp_path, capsys, monkeypatch):
    import torch

    from dreambooth.cli import main
    from dreambooth.train import precision
    from dreambooth.train.memory import on_a_cpu
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot
    from dreambooth.train.memory import preset_for

    root = DataRoot(tmp_path)
    create_model(root, "tiny", str(tiny_source))
    assert main(["--root", str(tmp_path), "plan", "tiny", "--vram", "24"]) == 0
    out = capsys.readouterr().out
    assert "Memory plan: peak" in out and "weights" in out and "fits 24 GiB" in out
    assert main(["--root", str(tmp_path), "preset", "tiny", "8"]) == 0
    said = capsys.readouterr().out
    assert "8 GiB preset for v1" in said and "8-bit AdamW" in said
    assert "Note: this machine has no GPU; the preset sizes a run for a 8 GiB GPU, and on this CPU it trains in bf16" in said
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cuda"))
    assert on_a_cpu(preset_for("v1", 8)[1], 8) == ""  # on a GPU the preset is what it says
    saved = Config.load(root.model("tiny").config_path).parameters
    assert all(getattr(saved, k) == v for k, v in preset_for("v1", 8)[1].items())
    assert main(["--root", str(tmp_path), "plan", "nope"]) == 2
    assert "model 'nope': not found" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tabs_plan_and_preset_run_in_a_child_process(tiny_source, tmp_path, monkeypatch):
    """actions.plan traces the parameters the page shows (not the saved ones) in a child process: the webui's own
    process never traces a model."""
    from dreambooth import actions
    from dreambooth.errors import UserError
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot
    from dreambooth.train import memory

    root = DataRoot(tmp_path)
    create_model(root, "tiny", str(tiny_source))
    monkeypatch.setattr(memory, "plan_report", lambda *a, **k: pytest.fail("planned in the calling process"))
    saved = Config.load(root.model("tiny").config_path).parameters
    one, two = (actions.plan(root, "tiny", 1000, replace(saved, train_batch_size=n)) for n in (1, 2))
    assert one.fits is True and "fits 1000 GiB" in one.text and one.text != two.text
    assert Config.load(root.model("tiny").config_path).parameters == saved  # planning saves nothing
    tight = actions.plan(root, "tiny", 0.001)
    assert tight.fits is False and "does not fit 0.001 GiB" in tight.text
    config, said = actions.apply_preset(root, "tiny", 8)
    assert "8 GiB preset for v1" in said and config == Config.load(root.model("tiny").config_path)
    # this machine has no GPU: the preset says what its bf16 and 8-bit AdamW mean here
    assert config.parameters.pure_bf16 and "Note: this machine has no GPU" in said and "trains in bf16" in said
    with pytest.raises(UserError, match="model 'nope': not found"):
        actions.plan(root, "nope", None)

    import threading
    import time

    stopped = {}

    def plan_until_stopped():
        with pytest.raises(UserError, match="`plan` was stopped") as e:
            actions.plan(root, "tiny", 1000)
        stopped["said"] = str(e.value)

    planning = threading.Thread(target=plan_until_stopped)
    planning.start()
    time.sleep(1.0)  # the child is still importing torch
    asked = time.monotonic()
    actions.stop_plan(root)
    planning.join(30)
    assert stopped and time.monotonic() - asked < 5
    assert actions.plan(root, "tiny", 1000).fits  # a stop was for the plan that ran then: the next one runs
