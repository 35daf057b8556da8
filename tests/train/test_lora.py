"""Training with LoRA: adapters on the UNet and text encoder(s), everything else as in a full fine-tune (prior
preservation, previews at the preview weight, the text-encoder step ratio, controls, resume after a kill), the LoRA
file on the checkpoint schedule and the merged checkpoint on request. The working model stays the base."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.events import Controls
from dreambooth.train import train_model

from train_helpers import child_env, draw_images, kill_after_checkpoint, make_model, read_events, train_cmd

pytestmark = pytest.mark.slow  # whole runs
LORA = dict(use_lora=True, lora_unet_rank=4, lora_unet_alpha=8.0, lora_text_encoder_rank=2,
            lora_text_encoder_alpha=2.0, lora_unet_learning_rate=1e-2, lora_text_encoder_learning_rate=5e-3)


def concept(root: Path, **changes) -> dict:
    base = {"instance_data_dir": str(draw_images(root / "instance", count=2)), "instance_token": "zwx",
            "class_token": "dog", "num_samples": 0}
    return {**base, **changes}


def working_weights(model) -> dict:
    files = list(model.working.glob("*/*.safetensors"))
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(f).items()}


def lora_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lora_run_prior_previews_ratio_exports_and_the_base_untouched(tmp_path, tiny_source):
    concepts = [concept(tmp_path, class_prompt="a dog", num_class_images_per_image=1, class_infer_steps=1,
                        num_samples=1, sample_infer_steps=1)]
    root, model = make_model(tmp_path / "root", tiny_source, concepts=concepts, num_train_epochs=3,
                             save_every_n_epochs=1, sample_every_n_epochs=1, train_text_encoder_ratio=0.34,
                             lora_layers="attention+ff+conv", lora_dropout=0.1, lora_preview_weight=0.8,
                             lora_export_merged=True, **LORA)
    base = working_weights(model)
    result = train_model(root, "m")
    assert result.ok and result.step == 6, result.summary()

    # The base model is what it was; the adapters are the LoRA files, one per save, as the schedule says.
    after = working_weights(model)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert not (model.working / "training.json").exists()
    names = sorted(p.name for p in root.lora.iterdir())
    assert names == ["m_2.safetensors", "m_4.safetensors", "m_6.safetensors"]
    assert sorted(p.name for p in root.checkpoints.iterdir() if p.suffix == ".safetensors") == names  # merged
    assert [Path(p).name for p in result.checkpoints] == [n for n in names for _ in (0, 1)]

    tensors, meta = lora_file(root.lora / "m_6.safetensors")
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)  # resnet convs
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 2.0
    assert {t.dtype for k, t in tensors.items() if not k.endswith("alpha")} == {torch.float32}  # save_half off

    # The text encoder trains for round(0.34 x 6) = 2 steps: its adapters change until step 2, then stay.
    te = lambda step: {k: v for k, v in lora_file(root.lora / f"m_{step}.safetensors")[0].items()  # noqa: E731
                       if k.startswith("lora_te_")}
    unet = lambda step: {k: v for k, v in lora_file(root.lora / f"m_{step}.safetensors")[0].items()  # noqa: E731
                         if k.startswith("lora_unet_") and k.endswith("lora_up.weight")}
    assert all(torch.equal(te(2)[k], te(6)[k]) for k in te(2))
    assert any(v.abs().sum() > 0 for k, v in te(2).items() if k.endswith("lora_up.weight"))
    assert not all(torch.equal(unet(2)[k], unet(6)[k]) for k in unet(2))

    # The optimizer ran at the LoRA learning rate; prior preservation and previews happened.
    steps = [e for e in read_events(model) if e["kind"] == "step"]
    assert steps[0]["lr"] == pytest.approx(1e-2)
    assert len(list(model.class_images.rglob("*.png"))) == 2
    assert sorted(p.name for p in model.samples.glob("*.png")) == ["2-0-0.png", "4-0-0.png", "6-0-0.png"]

    # The merged checkpoint is the base with the LoRA applied at weight 1 (the exporter's own layout).
    merged = load_file(root.checkpoints / "m_6.safetensors")
    source = load_file(tiny_source)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(source[key].shape) * (8.0 / 4)
    torch.testing.assert_close(merged[key], source[key] + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,algo,tensor", [("loha", "loha", ".hada_w1_a"), ("lokr", "lokr", ".lokr_w1"),
                                               ("dora", "lora", ".dora_scale")])
def test_loha_lokr_and_dora_runs_write_files_the_webui_applies_as_the_trained_model(tmp_path, kind, algo, tensor):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "lora"))
    import webui_reader

    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    # the real models' UNet depth (2 res blocks a level), which the webui's names for SD1 assume
    tiny_source = write_tiny_checkpoint("v1", tmp_path / "deep.safetensors", seed=0, unet_layers_per_block=2)
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=2,
                             save_every_n_epochs=2, train_text_encoder_ratio=1.0, lora_layers="attention+ff+conv",
                             lora_export_merged=True, lora_type=kind, **LORA)
    result = train_model(root, "m")
    assert result.ok and result.step == 4, result.summary()
    tensors, meta = lora_file(root.lora / "m_4.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{algo}"' in meta["ss_network_args"]
    assert any(k.endswith(tensor) for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert any("lora_down" in k for k in tensors) == (kind == "dora")
    # the file applied the webui's way to the source checkpoint is the trained model (its merged export)
    source = load_file(tiny_source)
    applied = webui_reader.apply(tensors, source)
    merged = load_file(root.checkpoints / "m_4.safetensors")
    changed = [k for k in merged if not torch.equal(merged[k], source[k])]
    assert changed and all(torch.allclose(applied[k], merged[k].float(), atol=1e-5, rtol=1e-5) for k in merged)


def test_previews_show_the_adapters_at_the_preview_weight(tmp_path, tiny_source):
    """Weight 0 previews the base model exactly; weight 1 differs."""
    concepts = [concept(tmp_path, num_samples=1, sample_infer_steps=2, sample_seed=5)]
    images = {}
    for weight in (0.0, 1.0):
        root, model = make_model(tmp_path / f"w{weight}", tiny_source, concepts=concepts, max_train_steps=2,
                                 sample_every_n_epochs=1, save_on_end=False, lora_preview_weight=weight, **LORA)
        assert train_model(root, "m").ok
        images[weight] = sorted(model.samples.glob("*.png"))[-1]
    root, model = make_model(tmp_path / "plain", tiny_source, concepts=concepts, max_train_steps=2,
                             sample_every_n_epochs=1, save_on_end=False, learning_rate=0.0,
                             text_encoder_learning_rate=0.0)
    assert train_model(root, "m").ok
    plain = sorted(model.samples.glob("*.png"))[-1]
    pixels = lambda p: torch.tensor(list(__import__("PIL.Image").Image.open(p).getdata()))  # noqa: E731
    assert torch.equal(pixels(images[0.0]), pixels(plain))
    assert not torch.equal(pixels(images[1.0]), pixels(plain))


def test_controls_with_lora_sample_save_cancel(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path, num_samples=1,
                             sample_infer_steps=1)], max_train_steps=50, save_on_cancel=True, **LORA)
    controls = Controls(model.control)

    def wait_for(kind, timeout=120):
        deadline = time.time() + timeout
        while not any(e["kind"] == kind for e in read_events(model)):
            assert time.time() < deadline, f"no {kind} event"
            time.sleep(0.05)

    def drive():
        wait_for("step")
        controls.request("sample")
        controls.request("save")
        wait_for("checkpoint")
        controls.request("cancel")

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    result = train_model(root, "m")
    driver.join(5)
    assert result.status == "cancelled" and result.step < 50
    saved = [e["step"] for e in read_events(model) if e["kind"] == "checkpoint"]
    assert saved[-1] == result.step and len(saved) >= 2  # save now, then save on cancel
    assert sorted(p.name for p in root.lora.iterdir()) == sorted(f"m_{s}.safetensors" for s in set(saved))
    assert list(model.samples.glob("*.png")) and not list(root.checkpoints.glob("*.safetensors"))


def test_bad_lora_settings_are_one_clear_error(tmp_path, tiny_source):
    from dreambooth.errors import UserError

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], max_train_steps=1,
                             **{**LORA, "lora_unet_rank": 33})
    with pytest.raises(UserError, match=r"lora_unet_rank: 33 is above the width 32 of the narrowest layer"):
        train_model(root, "m")
    root, model = make_model(tmp_path / "root2", tiny_source, concepts=[concept(tmp_path)], max_train_steps=1,
                             train_text_encoder_ratio=1.0, **{**LORA, "lora_text_encoder_rank": 40})
    with pytest.raises(UserError, match=r"lora_text_encoder_rank: 40 is above the width 32"):
        train_model(root, "m")


def test_sdxl_trains_adapters_on_both_text_encoders(tmp_path):
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    source = write_tiny_checkpoint("sdxl", tmp_path / "sdxl.safetensors", seed=0)
    root, model = make_model(tmp_path / "root", source, family="sdxl", concepts=[concept(tmp_path)],
                             num_train_epochs=1, train_text_encoder_ratio=1.0, **LORA)
    result = train_model(root, "m")
    assert result.ok and result.step == 2
    tensors, meta = lora_file(root.lora / "m_2.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    prefixes = {k.split("_text_model")[0] if k.startswith("lora_te") else "lora_unet" for k in tensors}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in tensors  # single-file UNet names


def test_resume_after_kill_with_lora_ends_like_an_uninterrupted_run(tmp_path, tiny_source):
    settings = dict(num_train_epochs=4, save_every_n_epochs=1, lr_scheduler="linear", seed=3,
                    train_text_encoder_ratio=0.5, **LORA)
    concepts = [concept(tmp_path)]
    root, model = make_model(tmp_path / "a", tiny_source, concepts=concepts, **settings)
    saved = kill_after_checkpoint(root, model, 4)
    assert saved < 8

    resumed = subprocess.run(train_cmd(root.root), env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = next(e for e in read_events(model) if e["kind"] == "start")
    assert start["step"] == saved and start["total_steps"] == 8
    assert read_events(model)[-1]["kind"] == "done" and read_events(model)[-1]["step"] == 8

    other_root, other = make_model(tmp_path / "b", tiny_source, concepts=concepts, **settings)
    whole = subprocess.run(train_cmd(other_root.root), env=child_env(), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    steps = lambda m: {e["step"]: (e["loss"], e["lr"]) for e in read_events(m) if e["kind"] == "step"}  # noqa: E731
    after_kill, uninterrupted = steps(model), steps(other)
    assert sorted(after_kill) == list(range(saved + 1, 9))
    for step, (loss, lr) in after_kill.items():
        assert lr == uninterrupted[step][1]
        assert loss == pytest.approx(uninterrupted[step][0], rel=1e-5)
    # Same adapters at the end (tolerance as for the full fine-tune's resume test: float noise through Adam).
    a, _ = lora_file(root.lora / "m_8.safetensors")
    b, _ = lora_file(other_root.lora / "m_8.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)


def test_the_memory_plan_of_a_lora_run_trains_only_the_adapters():
    """The memory plan traces the step as a LoRA run sets it up: only the adapters have gradients and optimizer
    state, so those and the peak are far below a full fine-tune's."""
    from dataclasses import replace

    from dreambooth.config import Parameters
    from dreambooth.train.memory import plan_architecture
    from test_memory import tiny_architecture

    base = Parameters(resolution=64, fused_backward_step=False, frozen_precision="full", optimizer="adamw")
    full = plan_architecture(tiny_architecture(), base)
    lora = plan_architecture(tiny_architecture(), replace(base, use_lora=True, lora_unet_rank=4,
                                                          lora_text_encoder_rank=4))
    assert full.traced and lora.traced, lora.notes
    assert 0 < lora.weights < full.weights / 20 and 0 < lora.optimizer < full.optimizer / 20
    assert lora.created["gradients"] == lora.weights  # a float32 gradient per adapter weight, nothing else
    assert lora.peak < full.peak / 2
    for kind in ("loha", "lokr", "dora"):  # their own factors (and DoRA's magnitudes) are what the plan counts
        plan = plan_architecture(tiny_architecture(), replace(base, use_lora=True, lora_unet_rank=4,
                                                              lora_text_encoder_rank=4, lora_type=kind))
        assert plan.traced and 0 < plan.weights < full.weights / 5 and plan.weights != lora.weights, (kind, plan.notes)
        assert plan.created["gradients"] == plan.weights
