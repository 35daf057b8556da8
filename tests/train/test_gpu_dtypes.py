"""The CPU tier of the GPU path: whole runs that make every dtype and precision decision as on a CUDA GPU (with bf16
or without), while the tensors stay on the CPU (train_helpers.decide_as_gpu).

On a GPU the frozen text encoders and the VAE are held in fp16 or bf16 while the trained weights stay fp32 (or bf16
under pure bf16), SDXL's VAE stays fp32 under fp16, the step runs under autocast and, for fp16, a GradScaler; class
images and previews are made from those mixed parts. A CPU run decides fp32 everywhere, so only these runs see it.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.train import train_model

from train_helpers import decide_as_gpu, draw_images, make_model, read_events

pytestmark = pytest.mark.slow


def concept(root, **changes) -> dict:
    base = {"instance_data_dir": str(draw_images(root / "instance", count=2)), "instance_token": "zwx",
            "class_token": "dog", "class_prompt": "a dog", "num_class_images_per_image": 1, "class_infer_steps": 2,
            "sample_prompt": "a zwx dog", "num_samples": 1, "sample_infer_steps": 2, "sample_seed": 3}
    return {**base, **changes}


def dtypes_seen(monkeypatch) -> dict:
    """The dtypes each part had when the run built its step, and the UNet's as it came onto the device (filled in as
    the run goes)."""
    from dreambooth.train import components, loop

    seen = {}
    build, prepare = loop.build_step, components.prepare_for_training

    def preparing(unet, *args, **kwargs):
        trains = prepare(unet, *args, **kwargs)
        seen["unet on the device"] = unet.dtype
        return trains

    monkeypatch.setattr(components, "prepare_for_training", preparing)

    def recording(params, parts, *args, **kwargs):
        seen.update(unet=parts.unet.dtype, vae=parts.vae.dtype, text_encoders=[te.dtype for te in parts.text_encoders])
        return build(params, parts, *args, **kwargs)

    monkeypatch.setattr(loop, "build_step", recording)
    return seen


# (the GPU's bf16, mixed precision, further settings): fp16 and bf16 frozen parts, full and LoRA, the plain step
# (GradScaler through accelerate's optimizer) and pure bf16 with EMA.
RUNS = [(False, "fp16", {}), (True, "bf16", {}),
        (False, "fp16", {"use_lora": True}), (True, "bf16", {"use_lora": True}),
        (False, "fp16", {"fused_backward_step": False}), (True, "bf16", {"pure_bf16": True, "use_ema": True})]


@pytest.mark.parametrize("family", ["v1", "sdxl"])
@pytest.mark.parametrize("gpu_bf16,mixed_precision,settings", RUNS)
def test_a_whole_run_decided_as_on_a_gpu(tmp_path, monkeypatch, family, gpu_bf16, mixed_precision, settings):
    """Class images, previews while the text encoder trains and after it froze, saves, the export, then a resume:
    with half-precision frozen parts next to fp32 trained weights (or the LoRA model held in the half type).
    (Every operation these models use has a CPU kernel in fp16 and bf16; none had to be left out.)"""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    decide_as_gpu(monkeypatch, bf16=gpu_bf16)
    seen = dtypes_seen(monkeypatch)
    source = write_tiny_checkpoint(family, tmp_path / f"tiny-{family}.safetensors", seed=0)
    root, model = make_model(tmp_path / "root", source, family=family, concepts=[concept(tmp_path)],
                             num_train_epochs=3, save_every_n_epochs=1, sample_every_n_epochs=1,
                             train_text_encoder_ratio=0.5, mixed_precision=mixed_precision, frozen_precision="half",
                             lora_unet_rank=2, lora_text_encoder_rank=2, lora_unet_learning_rate=1e-3,
                             lora_text_encoder_learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=2, **settings)
    use_lora, pure = settings.get("use_lora", False), settings.get("pure_bf16", False)
    half = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    first = train_model(root, "m", max_steps=4)
    assert first.ok and first.step == 4, first.summary()
    # The plan a GPU makes: trained weights fp32 (LoRA: the model loaded straight into the half type it is held in,
    # never fp32 on the device), frozen VAE in the half type except SDXL's under fp16.
    assert seen["unet"] == seen["unet on the device"] == (half if use_lora or pure else torch.float32)
    assert seen["vae"] == (torch.float32 if family == "sdxl" and half == torch.float16 else half)
    assert len(list(model.class_images.rglob("*.png"))) == 2
    # Previews at steps 2 (text encoder training) and 4 (frozen since step 3).
    assert sorted(p.name for p in model.samples.glob("*.png")) == ["2-0-0.png", "4-0-0.png"]
    steps = [e for e in read_events(model) if e["kind"] == "step"]
    assert all(e["loss"] == e["loss"] for e in steps)  # finite: a NaN would have stopped the run
    assert [e["lr"] for e in steps[:3]] == pytest.approx([0.0, 5e-4, 1e-3])  # the applied rates of the warm-up

    again = train_model(root, "m")  # resumes from the save of step 4 (the class images are reused)
    assert again.ok and again.step == 6, again.summary()
    events = read_events(model)
    assert next(e for e in events if e["kind"] == "start")["step"] == 4
    # The schedule goes on where it was: linear over the new total of 6 steps, at step 5.
    assert next(e for e in events if e["kind"] == "step")["lr"] == pytest.approx(5e-4)
    assert again.checkpoints[-1].is_file()
    outputs = list(again.checkpoints)
    if not use_lora:
        from dreambooth.models import export_model

        outputs.append(export_model(root, "m", half=True, out=root.checkpoints / "exported.safetensors"))
    for path in outputs:
        assert all(torch.isfinite(t.float()).all() for t in load_file(path).values()), path


def render(working, family: str, dtypes, params, seed: int = 5):
    """One 64 px image of the working model with its parts held as `dtypes` says, through the trainer's generation."""
    import numpy as np

    from dreambooth.train import pipeline as gen
    from dreambooth.train.components import load_components

    parts = load_components(working, family, "cpu", params, dtypes)
    made = gen.make_pipeline(parts.unet, parts.vae, parts.text_encoders, parts.tokenizers,
                             parts.noise_scheduler.config, parts.sdxl, dtypes.autocast)
    image = gen.generate(made, "a zwx dog", "ugly", 3, 4.0, seed, 64, 64)
    return np.asarray(image).astype("float64")


# (family, settings, the GPU's bf16, mean |difference| allowed in 0-255 pixel steps): the precision's own rounding.
PLANS = [
    ("v1", dict(mixed_precision="fp16", train_text_encoder_ratio=0.0), False, 0.5),
    ("v1", dict(mixed_precision="fp16", train_text_encoder_ratio=1.0), False, 0.5),
    ("v1", dict(mixed_precision="bf16", train_text_encoder_ratio=0.0), True, 2.0),
    ("v1", dict(mixed_precision="bf16", pure_bf16=True, train_text_encoder_ratio=1.0), True, 2.0),
    ("sdxl", dict(mixed_precision="fp16", train_text_encoder_ratio=0.0), False, 0.5),
    ("sdxl", dict(mixed_precision="bf16", train_text_encoder_ratio=1.0), True, 2.0),
]


@pytest.mark.parametrize("family,settings,gpu_bf16,allowed", PLANS)
def test_generation_in_a_gpus_dtypes_matches_the_fp32_image(tmp_path, family, settings, gpu_bf16, allowed):
    """The same seed through parts held in a GPU's dtypes gives the fp32 plan's image, up to the half type's rounding
    (the mean pixel difference is bounded, and far below that of another seed)."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint
    from dreambooth.config import Parameters
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot
    from dreambooth.train.precision import CPU, DtypePlan, Hardware

    root = DataRoot(tmp_path / "root").ensure()
    source = write_tiny_checkpoint(family, tmp_path / f"tiny-{family}.safetensors", seed=0)
    working = create_model(root, "m", str(source), family=family).working
    params = Parameters(frozen_precision="half", **settings)
    reference = render(working, family, DtypePlan.decide(Parameters(mixed_precision="no"), CPU, family == "sdxl"),
                       params)
    dtypes = DtypePlan.decide(params, Hardware(gpu=True, bf16=gpu_bf16), family == "sdxl")
    assert dtypes.frozen != torch.float32  # the mixed plan this test is about
    image = render(working, family, dtypes, params)
    other_seed = render(working, family, DtypePlan.decide(Parameters(mixed_precision="no"), CPU, family == "sdxl"),
                        params, seed=6)
    difference, between_seeds = abs(image - reference).mean(), abs(other_seed - reference).mean()
    print(f"{family} {settings}: mean |difference| {difference:.2f}, another seed {between_seeds:.2f}")
    assert difference <= allowed and difference < between_seeds / 4
