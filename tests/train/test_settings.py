"""Each training setting changes what it should, checked where it takes effect (no full run needed here).

Settings that only show in a whole run (EMA export, format, schedule, cache, text-encoder ratio, class and sample
settings, save on end/cancel) are checked in test_training.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dreambooth.config import Config, Parameters
from dreambooth.data.dataset import Example, Item, TrainingData
from dreambooth.errors import UserError
from dreambooth.train.components import set_attention
from dreambooth.train.loop import make_ema
from dreambooth.train.schedule import plan_total_steps
from dreambooth.train.optim import make_lr_scheduler, make_optimizer
from dreambooth.train.step import Batch, TrainStep

from train_helpers import reset_accelerate, tiny_text_encoder, tiny_unet


@pytest.fixture(scope="module")
def modules():
    return tiny_unet(), tiny_text_encoder()


def test_separate_learning_rates_are_param_groups(modules):
    unet, te = modules
    opt = make_optimizer(Parameters(optimizer="adamw", learning_rate=3e-4, text_encoder_learning_rate=7e-5), unet, (te,))
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 7e-5]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in te.parameters()}
    assert len(make_optimizer(Parameters(optimizer="adamw"), unet, ()).param_groups) == 1  # frozen encoder: no group


def test_per_part_learning_rates_block_multipliers_and_the_second_text_encoder():
    """SDXL's second text encoder and the UNet's down / mid / up blocks get their own named groups when their
    multipliers are not 1 (LoRA adapters too); with every multiplier 1 the groups are the plain two."""
    from dreambooth.train.optim import param_groups

    unet, te1, te2 = tiny_unet(), tiny_text_encoder(seed=1), tiny_text_encoder(seed=2)
    plain = param_groups(Parameters(learning_rate=2e-6, text_encoder_learning_rate=1e-6), unet, [te1, te2])
    assert [(g["name"], g["lr"]) for g in plain] == [("unet", 2e-6), ("text_encoder", 1e-6)]
    p = Parameters(learning_rate=2e-6, text_encoder_learning_rate=1e-6, text_encoder_2_lr_scale=0.5,
                   unet_down_lr_scale=0.0, unet_mid_lr_scale=2.0, unet_up_lr_scale=1.5)
    groups = param_groups(p, unet, [te1, te2])
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 2e-6), ("unet_down", 0.0), ("unet_mid", 4e-6),
                                                     ("unet_up", 3e-6), ("text_encoder", 1e-6),
                                                     ("text_encoder_2", 5e-7)]
    where = {id(q): g["name"] for g in groups for q in g["params"]}
    for name, q in unet.named_parameters():
        expected = ("unet_down" if name.startswith("down_blocks.") else "unet_mid" if name.startswith("mid_block.")
                    else "unet_up" if name.startswith("up_blocks.") else "unet")
        assert where[id(q)] == expected, name
    assert {where[id(q)] for q in te2.parameters()} == {"text_encoder_2"}
    assert sum(len(g["params"]) for g in groups) == len(list(unet.parameters())) + 2 * len(list(te1.parameters()))


def test_adam_settings_reach_the_optimizer(modules):
    unet, _ = modules
    opt = make_optimizer(Parameters(optimizer="adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                                    weight_decay=0.2), unet, ())
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.2


@pytest.mark.parametrize("name,cls", [("adamw", "AdamW"), ("adamw_8bit", "AdamW8bit"), ("adafactor", "Adafactor")])
def test_optimizer_choice(modules, name, cls):
    unet, te = modules
    opt = make_optimizer(Parameters(optimizer=name, learning_rate=1e-4, text_encoder_learning_rate=1e-5), unet, (te,))
    assert type(opt).__name__ == cls
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-5]


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(modules, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="parameters.optimizer: adamw_8bit needs bitsandbytes"):
        make_optimizer(Parameters(optimizer="adamw_8bit"), modules[0], ())


def lr_curve(**kw):
    p = Parameters(optimizer="adamw", learning_rate=1.0, **kw)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(p, opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(round(sched.get_last_lr()[0], 6))
        opt.step()
        sched.step()
    return lrs


def test_lr_schedulers_warmup_cycles_and_power():
    assert lr_curve(lr_scheduler="constant", lr_warmup_steps=3) == [1.0] * 10  # constant ignores warmup
    warm = lr_curve(lr_scheduler="constant_with_warmup", lr_warmup_steps=4)
    assert warm[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and warm[-1] == 1.0
    linear = lr_curve(lr_scheduler="linear")
    assert linear[0] == 1.0 and linear[5] == 0.5
    cosine = lr_curve(lr_scheduler="cosine")
    assert cosine[5] == pytest.approx(0.5) and cosine[2] > linear[2]
    assert lr_curve(lr_scheduler="cosine_with_restarts", lr_cycles=2)[5] == 1.0  # restarted
    assert lr_curve(lr_scheduler="cosine_with_restarts", lr_cycles=1) == cosine
    assert lr_curve(lr_scheduler="polynomial", lr_power=2.0)[5] < lr_curve(lr_scheduler="polynomial", lr_power=1.0)[5]


def test_epochs_and_max_steps():
    assert plan_total_steps(Parameters(num_train_epochs=3), steps_per_epoch=4) == 12
    assert plan_total_steps(Parameters(num_train_epochs=3, max_train_steps=5), steps_per_epoch=4) == 5
    assert plan_total_steps(Parameters(num_train_epochs=3, max_train_steps=5), steps_per_epoch=4, override=2) == 2


def examples(tmp_path, count=4, size=(64, 64)):
    from train_helpers import draw_images

    folder = draw_images(tmp_path / "img", count=count, size=size)
    return [Example(p, "a zwx dog", 0, size) for p in sorted(folder.iterdir())]


def test_batch_size_and_accumulation_set_steps_per_epoch(tmp_path):
    ex = examples(tmp_path, count=4)
    assert TrainingData([ex], {}, Parameters(resolution=64, train_batch_size=1)).steps_per_epoch == 4
    data = TrainingData([ex], {}, Parameters(resolution=64, train_batch_size=2))
    assert data.steps_per_epoch == 2 and all(len(b) == 2 for b in data.epoch_batches(0))
    assert TrainingData([ex], {}, Parameters(resolution=64, train_batch_size=1,
                                             gradient_accumulation_steps=2)).steps_per_epoch == 2


def test_accumulation_steps_the_optimizer_every_k_micro_batches():
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    unet, te = tiny_unet(), tiny_text_encoder()
    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = acc.prepare(torch.optim.SGD(unet.parameters(), lr=0.1))
    step = TrainStep(unet, (te,), DDPMScheduler(), Parameters(), sdxl=False, optimizer=opt, accelerator=acc)
    batch = Batch(latents=torch.randn(1, 4, 8, 8), input_ids=(torch.randint(0, 1000, (1, 77)),))
    before = unet.conv_in.weight.detach().clone()
    step(batch, train_text_encoder=False)
    assert torch.equal(unet.conv_in.weight, before)  # accumulating
    step(batch, train_text_encoder=False)
    assert not torch.equal(unet.conv_in.weight, before)


def test_max_grad_norm_clips_the_update():
    from diffusers import DDPMScheduler

    moved = {}
    for norm in (0.0, 1e-3):
        unet, te = tiny_unet(), tiny_text_encoder()
        before = [p.detach().clone() for p in unet.parameters()]
        opt = torch.optim.SGD(unet.parameters(), lr=1.0)
        step = TrainStep(unet, (te,), DDPMScheduler(), Parameters(max_grad_norm=norm), sdxl=False, optimizer=opt)
        torch.manual_seed(0)
        step(Batch(latents=torch.randn(2, 4, 8, 8), input_ids=(torch.randint(0, 1000, (2, 77)),)), train_text_encoder=False)
        moved[norm] = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(unet.parameters(), before))).item()
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3) and moved[0.0] > 10 * moved[1e-3]


def test_frozen_text_encoder_does_not_change_but_still_conditions():
    from diffusers import DDPMScheduler

    unet, te = tiny_unet(), tiny_text_encoder()
    opt = make_optimizer(Parameters(optimizer="adamw", learning_rate=1e-2, text_encoder_learning_rate=1e-2), unet, (te,))
    step = TrainStep(unet, (te,), DDPMScheduler(), Parameters(), sdxl=False, optimizer=opt)
    batch = Batch(latents=torch.randn(2, 4, 8, 8), input_ids=(torch.randint(0, 1000, (2, 77)),))
    te_before = [p.detach().clone() for p in te.parameters()]
    step(batch, train_text_encoder=True)
    assert any(not torch.equal(a, b) for a, b in zip(te.parameters(), te_before))
    te_now = [p.detach().clone() for p in te.parameters()]
    step(batch, train_text_encoder=False)
    assert all(torch.equal(a, b) for a, b in zip(te.parameters(), te_now))


def test_the_dtype_plan_of_each_device_and_its_fallbacks():
    from dreambooth.train.precision import CPU, DtypePlan, Hardware

    gpu, old_gpu = Hardware(gpu=True, bf16=True), Hardware(gpu=True, bf16=False)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

    def plan(hardware, sdxl=False, **settings):
        d = DtypePlan.decide(Parameters(**settings), hardware, sdxl)
        return d.mixed_precision, d.weights, d.frozen, d.vae

    with pytest.warns(UserWarning, match="fp16 needs a GPU"):
        assert plan(CPU, mixed_precision="fp16") == ("no", f32, f32, f32)
    assert plan(CPU, mixed_precision="bf16") == ("bf16", f32, f32, f32)  # CPUs compute in bf16; frozen stay fp32
    assert plan(gpu, mixed_precision="fp16") == ("fp16", f32, f16, f16)
    assert plan(gpu, sdxl=True, mixed_precision="fp16") == ("fp16", f32, f16, f32)  # SDXL's VAE overflows in fp16
    assert plan(gpu, sdxl=True, mixed_precision="bf16") == ("bf16", f32, bf16, bf16)
    assert plan(gpu, mixed_precision="fp16", frozen_precision="full") == ("fp16", f32, f32, f32)
    assert plan(gpu, mixed_precision="no") == ("no", f32, f32, f32)
    with pytest.warns(UserWarning, match="no bf16 support; using fp16"):
        assert plan(old_gpu, mixed_precision="bf16") == ("fp16", f32, f16, f16)
    assert plan(gpu, mixed_precision="no", pure_bf16=True) == ("bf16", bf16, bf16, bf16)
    assert plan(CPU, mixed_precision="no", pure_bf16=True) == ("bf16", bf16, f32, f32)
    # LoRA: the frozen model is held in the mixed-precision type from the moment it loads.
    assert plan(gpu, mixed_precision="fp16", use_lora=True) == ("fp16", f16, f16, f16)
    assert plan(CPU, mixed_precision="bf16", use_lora=True) == ("bf16", bf16, f32, f32)
    assert plan(CPU, mixed_precision="no", use_lora=True) == ("no", f32, f32, f32)
    with pytest.warns(UserWarning, match="pure_bf16: this GPU has no bf16"):  # nothing in a type it cannot run
        assert plan(old_gpu, mixed_precision="no", pure_bf16=True) == ("no", f32, f32, f32)


def test_the_step_autocasts_to_the_plan_whatever_accelerate_does():
    """accelerate autocasts fp16 only on a GPU (and 0.21 only through torch.cuda.amp): the step's own autocast
    follows the plan on any device."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    seen = {}
    for name, dtype in (("no", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        reset_accelerate()
        unet, te = tiny_unet(), tiny_text_encoder()
        acc = Accelerator(mixed_precision=name, cpu=True)
        unet.conv_in.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
        TrainStep(unet, (te,), DDPMScheduler(), Parameters(), sdxl=False, accelerator=acc, autocast_dtype=dtype)(
            Batch(latents=torch.randn(1, 4, 8, 8), input_ids=(torch.randint(0, 1000, (1, 77)),)))
    assert seen == {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_attention_backends():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = tiny_unet()
    set_attention(unet, "default")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    set_attention(unet, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    set_attention(unet, "default")
    with pytest.warns(UserWarning, match="attention xformers: .*using PyTorch SDPA instead"):
        assert set_attention(unet, "xformers") == "sdpa"  # no xformers / no CUDA here
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_ema_decay():
    unet = tiny_unet()
    assert make_ema(Parameters(use_ema=False), unet) is None
    for decay in (0.0, 0.9):
        ema = make_ema(Parameters(use_ema=True, ema_decay=decay), unet)
        for _ in range(3):  # (the very first update copies the weights: diffusers' EMA warm-up)
            with torch.no_grad():
                for p in unet.parameters():
                    p.add_(1.0)
            ema.step(unet.parameters())
        shadow, param = ema.shadow_params[0], next(unet.parameters())
        if decay == 0.0:
            assert torch.equal(shadow, param)
        else:
            assert (param - shadow).abs().min() > 0.05  # lags behind the weights
        with torch.no_grad():
            for p in unet.parameters():
                p.sub_(3.0)


def test_the_ema_update_is_diffusers_update_in_one_multi_tensor_kernel():
    """The trainer's EMA follows diffusers' EMAModel (decay schedule, frozen tensors copied) to float rounding, and its
    update is one multi-tensor operation, without diffusers' subtraction and multiplication per tensor."""
    from diffusers.training_utils import EMAModel
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    unet = tiny_unet()
    frozen = next(unet.parameters())
    frozen.requires_grad_(False)
    ours, theirs = make_ema(Parameters(use_ema=True, ema_decay=0.9), unet), EMAModel(unet.parameters(), decay=0.9)
    for _ in range(4):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p))
        with profile(activities=[ProfilerActivity.CPU]) as ours_ops:
            ours.step(unet.parameters())
        with profile(activities=[ProfilerActivity.CPU]) as theirs_ops:
            theirs.step(unet.parameters())
    ops = {e.key: e.count for e in ours_ops.key_averages()}
    assert ops["aten::_foreach_lerp_"] == 1 and ops["aten::copy_"] == 1  # and the frozen tensor's copy
    assert not {"aten::sub", "aten::sub_", "aten::mul"} & ops.keys()
    assert {e.key: e.count for e in theirs_ops.key_averages()}["aten::sub_"] == len(ours.shadow_params) - 1
    assert ours.cur_decay_value == theirs.cur_decay_value == pytest.approx(4 / 13)  # (1 + 3) / (10 + 3): warm-up
    assert torch.equal(ours.shadow_params[0], frozen)
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def item_pixels(data, item, epoch=0):
    return data.load_item(item, epoch)[0]


def test_resolution_bucketing_crop_flip_seed(tmp_path):
    wide = examples(tmp_path, count=1, size=(160, 64))
    ex = wide[0]
    square = TrainingData([wide], {}, Parameters(resolution=64, aspect_ratio_bucketing=False))
    bucketed = TrainingData([wide], {}, Parameters(resolution=64, aspect_ratio_bucketing=True))
    assert square.bucket_of[ex.path] == (64, 64)
    w, h = bucketed.bucket_of[ex.path]
    assert w > h
    big = TrainingData([wide], {}, Parameters(resolution=128, aspect_ratio_bucketing=False))
    assert item_pixels(big, Item(ex, big.bucket_of[ex.path], False)).shape == (3, 128, 128)

    def pixels(**kw):
        # The draws are seeded by the image's path (a fresh tmp path each run): enough epochs that "some epoch
        # flips and some does not" holds for any path (a chance of 2**-23 to fail).
        data = TrainingData([wide], {}, Parameters(resolution=64, aspect_ratio_bucketing=False, cache_latents=False, **kw))
        return [item_pixels(data, Item(ex, (64, 64), False), epoch) for epoch in range(24)]

    center = pixels(crop="center")
    assert all(torch.equal(center[0], c) for c in center)
    random_crop = pixels(crop="random")
    assert any(not torch.equal(random_crop[0], c) for c in random_crop)
    flipped = pixels(crop="center", hflip=True)
    assert any(torch.equal(f, torch.flip(center[0], dims=[2])) for f in flipped)
    assert any(torch.equal(f, center[0]) for f in flipped)
    assert [torch.equal(a, b) for a, b in zip(pixels(crop="random", seed=1), pixels(crop="random", seed=2))] != [True] * 24
    # With cached latents the random crop is drawn once per image: the cache stays valid.
    data = TrainingData([wide], {}, Parameters(resolution=64, aspect_ratio_bucketing=False, crop="random", cache_latents=True))
    cached = [item_pixels(data, Item(ex, (64, 64), False), epoch) for epoch in range(3)]
    assert all(torch.equal(cached[0], c) for c in cached)


def test_seed_sets_the_epoch_order(tmp_path):
    ex = examples(tmp_path, count=4)
    order = lambda seed: [b[0].example.path for b in TrainingData([ex], {}, Parameters(resolution=64, seed=seed)).epoch_batches(0)]  # noqa: E731
    assert order(1) == order(1)
    assert any(order(1) != order(s) for s in (2, 3, 4))


def test_every_parameter_setting_is_covered_by_a_test():
    """A guard against dead settings: every declared parameter is named in a trainer test."""
    from dreambooth.config import CONCEPT_SETTINGS, PARAMETER_SETTINGS

    text = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    missing = [s.name for s in PARAMETER_SETTINGS + CONCEPT_SETTINGS if s.name not in text.replace(
        "test_every_parameter_setting_is_covered_by_a_test", "")]
    assert not missing, f"settings no trainer test names: {missing}"


def test_pause_and_save_during_training_in_the_schedule():
    from dreambooth.train.schedule import Schedule

    plan = Schedule.plan(Parameters(num_train_epochs=3, save_every_n_epochs=1, pause_every_n_epochs=2,
                                    pause_seconds=30), steps_per_epoch=2)
    assert [s for s in range(1, 7) if plan.after(s).pause] == [4]  # after epoch 2; the run's end is no rest
    assert [s for s in range(1, 7) if plan.after(s).save] == [2, 4, 6]
    quiet = Schedule.plan(Parameters(num_train_epochs=3, save_every_n_epochs=1, save_during_training=False,
                                     pause_every_n_epochs=2, pause_seconds=0), steps_per_epoch=2)
    assert [s for s in range(1, 7) if quiet.after(s).save] == [6]  # only at the end
    assert not any(quiet.after(s).pause for s in range(1, 7))  # a rest of 0 s is none


def test_checkpoint_name():
    from dreambooth.config import ConfigError
    from dreambooth.train.loop import checkpoint_stem

    assert checkpoint_stem(Parameters(), "dog") == "dog"
    assert checkpoint_stem(Parameters(checkpoint_name=" rex v2 "), "dog") == "rex v2"
    with pytest.raises(ConfigError, match="checkpoint_name"):
        Config.from_dict({"parameters": {"checkpoint_name": "../outside"}})


def compiled_losses(monkeypatch, compiled: bool, backend: str | None = None, steps: int = 3) -> tuple[list, object]:
    """Losses of `steps` fused AdamW steps of the tiny UNet, with compile_unet on or off."""
    from dreambooth.train import components

    if backend is not None:
        monkeypatch.setattr(components, "COMPILE_BACKEND", backend)
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    params = Parameters(optimizer="adamw", learning_rate=1e-3, compile_unet=compiled)
    if params.compile_unet:
        assert components.compile_unet(unet)
    return fused_adamw_losses(unet, te, params, steps), unet


def fused_adamw_losses(unet, te, params, steps: int = 3) -> list[float]:
    """Losses of `steps` fused optimizer steps of the UNet (text encoder frozen) on fixed random batches."""
    from diffusers import DDPMScheduler

    from dreambooth.train.optim import make_fused_step

    opt = make_optimizer(params, unet, ())
    trained = list(unet.parameters())
    step = TrainStep(unet, (te,), DDPMScheduler(), params, sdxl=False, optimizer=opt, trainable_params=trained,
                     fused=make_fused_step(params, opt, trained))
    torch.manual_seed(1)
    batches = [Batch(latents=torch.randn(2, 4, 8, 8), input_ids=(torch.randint(0, 1000, (2, 77)),))
               for _ in range(steps)]
    return [step(b, train_text_encoder=False).loss.item() for b in batches]


@pytest.mark.slow
def test_compile_unet_gives_the_eager_steps_loss(monkeypatch):
    """Inductor on the CPU (a compile of about two minutes here): the first step, on the same weights and noise,
    within 1e-5 relative of the eager loss; the next ones within 1% (AdamW's first updates are normalised gradients,
    which carry the compiled kernels' float rounding)."""
    eager, _ = compiled_losses(monkeypatch, False)
    compiled, unet = compiled_losses(monkeypatch, True)
    from dreambooth.train.components import is_compiled

    assert is_compiled(unet)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-2)


def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    from dreambooth.train.components import is_compiled

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    with pytest.warns(UserWarning, match="compile_unet: compiling the UNet failed .*no C\\+\\+ compiler here.*"
                                         "training without compiling"):
        losses, unet = compiled_losses(monkeypatch, True, backend=broken)
    assert not is_compiled(unet) and len(losses) == 3 and all(loss == loss for loss in losses)


def test_autotune_convolutions_switches_cudnn_for_a_gpu_run_only(monkeypatch):
    """The trainer's step on a CUDA device (decided as there, the tensors on the CPU) switches cuDNN's autotuning as
    the setting says; a step set up for the CPU (the memory plan, in the webui's process) leaves the switch alone."""
    from diffusers import DDPMScheduler

    from dreambooth.train.components import Components
    from dreambooth.train.loop import build_step
    from dreambooth.train.memory import _PlanAccelerator
    from dreambooth.train.precision import DtypePlan, detect

    def build(on: bool, device: str) -> None:
        params = Parameters(optimizer="adamw", autotune_convolutions=on, train_text_encoder_ratio=0)
        parts = Components(tiny_unet(), None, (tiny_text_encoder(),), (), DDPMScheduler(), False)
        build_step(params, parts, _PlanAccelerator(device), 10, False, DtypePlan.decide(params, detect("cpu"), False))

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    build(True, "cpu")
    assert torch.backends.cudnn.benchmark is False
    build(True, "cuda")
    assert torch.backends.cudnn.benchmark is True
    build(False, "cuda")
    assert torch.backends.cudnn.benchmark is False


def test_channels_last_trains_the_same_weights_and_writes_files_in_the_default_layout(tmp_path):
    """channels_last changes the memory layout of the UNet's and VAE's convolution weights, nothing else: the same
    losses and weights as the default layout (float rounding apart), the layout kept through the optimizer steps, and
    the files written in the default layout (the webui's safetensors refuses a channels-last tensor)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from dreambooth.train.components import default_layout, is_channels_last, prepare_for_training
    from dreambooth.train.precision import DtypePlan, detect

    losses, weights = {}, {}
    for layout in (False, True):
        unet, te = tiny_unet(), tiny_text_encoder()
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
        params = Parameters(optimizer="adamw", learning_rate=1e-3, channels_last=layout, train_text_encoder_ratio=0)
        prepare_for_training(unet, vae, [te], params, "cpu", DtypePlan.decide(params, detect("cpu"), False))
        assert is_channels_last(unet) == layout and is_channels_last(vae) == layout
        trained = list(unet.parameters())
        losses[layout] = fused_adamw_losses(unet, te, params)
        assert is_channels_last(unet) == layout  # the optimizer's updates keep the layout
        with default_layout(unet):
            assert not is_channels_last(unet)
            unet.save_pretrained(tmp_path / str(layout), safe_serialization=True)
        assert is_channels_last(unet) == layout and all(p is q for p, q in zip(trained, unet.parameters()))
        weights[layout] = load_file(tmp_path / str(layout) / "diffusion_pytorch_model.safetensors")
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():
        # within a tenth of one step (1e-3): AdamW normalises near-zero gradients, whose float noise it magnifies
        torch.testing.assert_close(weights[True][key], value, rtol=0, atol=1e-4)
