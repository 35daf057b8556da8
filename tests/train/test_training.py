"""Whole training runs on the tiny v1 model: schedule, outputs, settings that only show in a run, controls, failures.

Every run is a real one (real files, real diffusers models, the real exporter); runs are kept to a few steps.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.events import Controls
from dreambooth.train import train_model

from train_helpers import draw_images, kinds, make_model, read_events, wait_for

pytestmark = pytest.mark.slow  # whole training runs, several seconds each

UNET, VAE, TE = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


def load_checkpoint(path: Path) -> dict:
    if path.suffix == ".ckpt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data.get("state_dict", data)
    return load_file(path)


def same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in b if k.startswith(prefix)]
    assert keys and all(k in a for k in keys), prefix
    return all(torch.equal(a[k].float(), b[k].to(a[k].dtype).float()) for k in keys)


def concept(root: Path, **changes) -> dict:
    base = {"instance_data_dir": str(draw_images(root / "instance", count=2)), "instance_token": "zwx",
            "class_token": "dog", "num_samples": 0}
    return {**base, **changes}


def test_full_run_prior_previews_schedule_and_checkpoint(tmp_path, tiny_source):
    concepts = [concept(tmp_path, class_prompt="[filewords]", class_negative_prompt="blurry", num_class_images_per_image=1,
                        class_guidance_scale=3.0, class_infer_steps=2, sample_prompt="[filewords] on the moon",
                        sample_negative_prompt="ugly", num_samples=2, sample_seed=7, sample_guidance_scale=4.0,
                        sample_infer_steps=2)]
    root, model = make_model(tmp_path / "root", tiny_source, concepts=concepts, num_train_epochs=2,
                             save_every_n_epochs=1, sample_every_n_epochs=1, checkpoint_format="ckpt", save_half=True,
                             train_text_encoder_ratio=0.5)
    result = train_model(root, "m")
    assert result.ok and result.step == 4, result.summary()

    # Class images: generated once with their prompt beside them (instance token removed), settings in the PNG info.
    [folder] = model.class_images.iterdir()
    images = sorted(folder.glob("*.png"))
    assert len(images) == 2
    assert {p.with_suffix(".txt").read_text().strip() for p in images} == {"a red dog on grass"}
    info = Image.open(images[0]).info["parameters"]
    assert "Negative prompt: blurry" in info and "Steps: 2" in info and "CFG scale: 3.0" in info

    # Previews every epoch, named <step>-<concept>-<i>, prompt/seed/settings in the PNG info.
    names = sorted(p.name for p in model.samples.iterdir())
    assert names == ["2-0-0.png", "2-0-1.png", "4-0-0.png", "4-0-1.png"]
    infos = [Image.open(model.samples / n).info["parameters"] for n in names[:2]]
    assert infos[0].startswith("a red zwx dog on grass on the moon\nNegative prompt: ugly\n")
    assert "Seed: 7" in infos[0] and "Seed: 8" in infos[1] and "CFG scale: 4.0" in infos[0] and "Steps: 2" in infos[0]
    assert Image.open(model.samples / names[0]).size == (64, 64)

    # Checkpoints every epoch and at the end, as .ckpt in fp16; trained parts differ from the base, frozen ones match.
    assert [p.name for p in result.checkpoints] == ["m_2.ckpt", "m_4.ckpt"]
    assert all(p.exists() for p in result.checkpoints)
    trained, base = load_checkpoint(result.checkpoints[-1]), load_file(tiny_source)
    assert {v.dtype for v in trained.values() if v.is_floating_point()} == {torch.float16}
    assert not same(trained, base, UNET) and not same(trained, base, TE)
    assert same(trained, base, VAE)
    assert json.loads((model.working / "training.json").read_text())["text_encoder_steps"] == 2

    events = kinds(model)
    assert events[0] == "class_images" and "start" in events and events[-1] == "done"
    assert events.count("step") == 4 and events.count("sample") == 2 and events.count("checkpoint") == 2
    step_event = next(e for e in read_events(model) if e["kind"] == "step")
    assert {"step", "epoch", "loss", "lr", "it_per_s", "eta_s", "memory_mb"} <= set(step_event)
    assert list((model.logs / "tensorboard").iterdir())

    # Next time: class images are reused, nothing is generated again; the finished run has nothing left to do.
    mtimes = [p.stat().st_mtime_ns for p in images]
    again = train_model(root, "m")
    assert again.ok and "nothing to do" in again.message
    assert "class_images" not in kinds(model) and [p.stat().st_mtime_ns for p in images] == mtimes


@pytest.mark.parametrize("save_ema_weights,cache_latents,gradient_checkpointing",
                         [(True, True, True), (False, False, False)])
def test_ema_export_cache_and_checkpointing(tmp_path, tiny_source, monkeypatch, save_ema_weights, cache_latents,
                                            gradient_checkpointing):
    import torch.utils.checkpoint
    from diffusers import AutoencoderKL

    calls = {"encode": 0, "checkpoint": 0}
    encode, checkpoint = AutoencoderKL.encode, torch.utils.checkpoint.checkpoint

    def counting_encode(self, *a, **k):
        calls["encode"] += 1
        return encode(self, *a, **k)

    def counting_checkpoint(*a, **k):
        calls["checkpoint"] += 1
        return checkpoint(*a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=2,
                             use_ema=True, ema_decay=0.5, save_ema_weights=save_ema_weights, cache_latents=cache_latents,
                             gradient_checkpointing=gradient_checkpointing, train_text_encoder_ratio=0.0)
    result = train_model(root, "m")
    assert result.ok and result.checkpoints[-1].suffix == ".safetensors"
    assert calls["encode"] == (2 if cache_latents else 4)  # 2 images x 2 epochs
    assert (calls["checkpoint"] > 0) == gradient_checkpointing

    ema = load_file(model.working / "unet_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(model.working / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)
    exported, base = load_checkpoint(result.checkpoints[-1]), load_file(tiny_source)
    assert exported["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float32  # save_half off
    chosen = ema if save_ema_weights else raw
    assert torch.equal(exported["model.diffusion_model.input_blocks.0.0.weight"], chosen["conv_in.weight"])
    assert same(exported, base, TE) and same(exported, base, VAE)  # text encoder ratio 0: never trained



def test_controls_pause_sample_save_cancel(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path, num_samples=1,
                             sample_infer_steps=1)], max_train_steps=50, save_on_cancel=True)
    controls = Controls(model.control)
    controls.request("cancel")  # stale from an earlier run: cleared at start

    def drive():
        wait_for(model, "step")
        controls.request("pause")
        wait_for(model, "paused")
        controls.request("sample")
        controls.request("save")
        time.sleep(0.5)
        controls.withdraw("pause")
        wait_for(model, "checkpoint")
        controls.request("cancel")

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    result = train_model(root, "m")
    driver.join(5)
    assert result.status == "cancelled" and not result.ok and result.step < 50
    events = kinds(model)
    assert events.index("paused") < events.index("resumed") < events.index("cancelled")
    assert "sample" in events and events.count("checkpoint") >= 1
    saved = [e["step"] for e in read_events(model) if e["kind"] == "checkpoint"]
    assert saved[-1] == result.step  # save_on_cancel: the cancelled step is saved
    assert not controls.pending()


def test_cancel_without_save_and_no_save_at_end(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], max_train_steps=50,
                             save_on_cancel=False)
    controls = Controls(model.control)

    def cancel():
        wait_for(model, "step")
        controls.request("cancel")

    threading.Thread(target=cancel, daemon=True).start()
    result = train_model(root, "m")
    assert result.status == "cancelled" and result.checkpoints == [] and not list(root.checkpoints.iterdir())

    # save_on_end off, with a user-supplied class folder used as is (nothing generated).
    class_dir = draw_images(tmp_path / "my-dogs", count=2, seed=9)
    root, model = make_model(tmp_path / "root2", tiny_source, concepts=[concept(tmp_path, class_data_dir=str(class_dir),
                             num_class_images_per_image=1)], max_train_steps=2, save_on_end=False)
    result = train_model(root, "m")
    assert result.ok and result.step == 2 and result.checkpoints == [] and not list(root.checkpoints.iterdir())
    assert not model.class_images.exists() and "class_images" not in kinds(model)


def test_nan_loss_stops_and_keeps_the_last_good_save(tmp_path, tiny_source, monkeypatch):
    from dreambooth.train import step as step_module

    original = step_module.TrainStep.compute_loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(step_module.TrainStep, "compute_loss", poisoned)
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=3,
                             save_every_n_epochs=1)
    result = train_model(root, "m")
    assert result.status == "error" and not result.ok
    assert "loss became nan at step 3" in result.message and "last good save is step 2" in result.message
    assert [p.name for p in root.checkpoints.glob("*.safetensors")] == ["m_2.safetensors"]
    assert json.loads((model.working / "training.json").read_text())["step"] == 2
    assert read_events(model)[-1]["kind"] == "error"


def test_disk_full_at_export_keeps_the_previous_checkpoint_and_resume_writes_it(tmp_path, tiny_source, monkeypatch):
    import errno

    from dreambooth.checkpoint import export

    write = export.write_safetensors
    calls = {"n": 0}

    def disk_full_on_second(path, *a, **k):  # the exporter's own writer, so its WriteError is what the trainer sees
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, *a, **k)

    monkeypatch.setattr(export, "write_safetensors", disk_full_on_second)
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=2,
                             save_every_n_epochs=1)
    result = train_model(root, "m")
    out = root.checkpoints / "m_4.safetensors"
    assert result.status == "error" and result.message == (  # a new file: nothing of it was left (m_2 is intact)
        f"disk full while writing {out}; no partial file was left. Train again to go on from the last save (step 4)")
    files = sorted(p.name for p in root.checkpoints.iterdir())
    assert files == ["m_2.safetensors", "m_2.yaml"] or files == ["m_2.safetensors"]
    assert load_checkpoint(root.checkpoints / "m_2.safetensors")  # still a whole, readable file

    # Train again: the leftovers of the interrupted save go, and the checkpoint the failure cut short is written.
    monkeypatch.undo()
    leftovers = [root.checkpoints / ".m_4.safetensors.x1y2z3w4.tmp", model.working / ".training.json.abcd1234.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    again = train_model(root, "m")
    assert again.ok and "nothing to do" in again.message and again.checkpoints == [out]
    assert not any(p.exists() for p in leftovers)
    assert load_file(out) and json.loads((model.working / "training.json").read_text())["step"] == 4
    assert [e["step"] for e in read_events(model) if e["kind"] == "checkpoint"] == [4]
    again = train_model(root, "m")  # written once: not again
    assert again.ok and again.checkpoints == []


def test_an_instance_image_deleted_during_the_run_is_named(tmp_path, tiny_source, monkeypatch):
    from dreambooth.data.dataset import TrainingData

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=2,
                             save_every_n_epochs=1, cache_latents=False)
    load_item = TrainingData.load_item
    calls = {"n": 0}

    def deleted_in_the_second_epoch(self, item, epoch):
        calls["n"] += 1
        if calls["n"] == 3:
            item.example.path.unlink()
        return load_item(self, item, epoch)

    monkeypatch.setattr(TrainingData, "load_item", deleted_in_the_second_epoch)
    result = train_model(root, "m")
    assert result.status == "error" and "saving failed" not in result.message
    assert re.match(r"instance image .*\.png was deleted during the run; put it back .* go on from the last save "
                    r"\(step 2\)$", result.message)
    assert read_events(model)[-1] == {**read_events(model)[-1], "kind": "error", "message": result.message}


def test_damaged_resume_state_is_an_error_not_a_new_run(tmp_path, tiny_source):
    from dreambooth.config import Config
    from dreambooth.errors import UserError

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], max_train_steps=1)
    assert train_model(root, "m").ok
    Config.load(model.config_path).with_parameters(max_train_steps=3).save(model.config_path)
    rng = model.state / "rng.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"^{re.escape(str(rng))}: the saved training state is damaged"):
        train_model(root, "m")
    assert "step" not in kinds(model) and read_events(model)[-1]["kind"] == "error"
    (model.state / "trainer.json").write_text('{"step": null}')
    with pytest.raises(UserError, match="trainer.json: the saved training state is damaged"):
        train_model(root, "m")


@pytest.mark.parametrize("family", ["v2", "v2-v", "sdxl"])
def test_other_families_train_with_prior_and_previews(tmp_path, family):
    """v2 (epsilon), v2-v (v-prediction) and SDXL (two encoders, pooled + size/crop conditioning) end to end."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    source = write_tiny_checkpoint(family, tmp_path / f"tiny-{family}.safetensors", seed=0)
    concepts = [concept(tmp_path, class_prompt="a dog", num_class_images_per_image=1, class_infer_steps=1,
                        num_samples=1, sample_infer_steps=1)]
    root, model = make_model(tmp_path / "root", source, family=family, concepts=concepts, num_train_epochs=1,
                             train_text_encoder_ratio=1.0, sample_every_n_epochs=1)
    scheduler = json.loads((model.working / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if family == "v2-v" else "epsilon")
    result = train_model(root, "m")
    assert result.ok and result.step == 2, result.summary()
    trained, base = load_checkpoint(result.checkpoints[-1]), load_file(source)
    prefixes = ("model.diffusion_model.", "conditioner.embedders.1.model." if family == "sdxl" else "cond_stage_model.")
    for prefix in prefixes:
        assert not same(trained, base, prefix), prefix
    assert same(trained, base, VAE)
    assert len(list(model.class_images.rglob("*.png"))) == 2 and len(list(model.samples.glob("*.png"))) == 1


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_source, capsys, monkeypatch):
    import sys
    import warnings

    from dreambooth.cli import main

    assert main(["--root", str(tmp_path / "empty-root"), "train", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: model 'nope': not found")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero.png").write_bytes(b"")
    (broken / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[{"instance_data_dir": str(broken)}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--root", str(root.root), "train", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "concepts[0].instance_data_dir" in err and "none of the images" in err
    assert {"zero.png", "cut.jpg"} <= {Path(str(w.message).split(":")[0].split()[-1]).name for w in caught}
    assert read_events(model)[-1]["kind"] == "error"

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # an optimizer whose package is missing
    root, model = make_model(tmp_path / "root8", tiny_source, concepts=[concept(tmp_path)], optimizer="lion")
    assert main(["--root", str(root.root), "train", "m"]) == 2
    assert "parameters.optimizer: lion needs the lion-pytorch package" in capsys.readouterr().err
    assert not list(root.checkpoints.iterdir())


def test_cancel_during_class_images_keeps_them_for_next_time(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(
        tmp_path, class_prompt="a dog", num_class_images_per_image=3, class_infer_steps=1)], max_train_steps=1)
    controls = Controls(model.control)

    def cancel():
        deadline = time.time() + 120
        while not any(e["kind"] == "class_images" and e["done"] >= 1 for e in read_events(model)):
            assert time.time() < deadline
            time.sleep(0.02)
        controls.request("cancel")

    threading.Thread(target=cancel, daemon=True).start()
    result = train_model(root, "m")
    assert result.status == "cancelled" and "class images" in result.message
    kept = len(list(model.class_images.rglob("*.png")))
    assert 1 <= kept < 6 and read_events(model)[-1]["kind"] == "cancelled"

    result = train_model(root, "m")
    assert result.ok
    progress = [e for e in read_events(model) if e["kind"] == "class_images"]
    assert progress[-1] == {**progress[-1], "done": 6 - kept, "total": 6 - kept}  # only the missing ones
    assert len(list(model.class_images.rglob("*.png"))) == 6


@pytest.mark.slow
@pytest.mark.parametrize("how,class_batch_size", [("cancel", 1), ("sigterm", 1), ("cancel", 2)])
def test_cancel_stops_class_generation_between_denoising_steps(tmp_path, tiny_source, monkeypatch, how,
                                                               class_batch_size):
    """Each class image takes about 20 s here (a slowed UNet, 200 steps): a cancel or SIGTERM during the first image
    (or the first batch of two) ends the run within 5 s, and the progress said which image of how many."""
    import signal

    from diffusers import UNet2DConditionModel

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(
        tmp_path, class_prompt="a dog", num_class_images_per_image=1, class_infer_steps=200)], max_train_steps=1,
        class_batch_size=class_batch_size)
    forward = UNet2DConditionModel.forward
    calls = []

    def slow_forward(self, *args, **kwargs):
        calls.append(time.time())
        time.sleep(0.05)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", slow_forward)
    asked = []

    def cancel():
        deadline = time.time() + 120
        while len(calls) < 3:  # the first image is being denoised
            assert time.time() < deadline
            time.sleep(0.02)
        asked.append(time.time())
        if how == "cancel":
            Controls(model.control).request("cancel")
        else:
            signal.raise_signal(signal.SIGTERM)  # handled by the trainer (main thread) as a cancel

    threading.Thread(target=cancel, daemon=True).start()
    result = train_model(root, "m")
    assert result.status == "cancelled" and "class images (0 made)" in result.message
    assert time.time() - asked[0] < 5
    assert len(calls) < 100  # stopped inside the first image's 200 steps
    progress = [e for e in read_events(model) if e["kind"] == "class_images"]
    assert [(e["done"], e["total"]) for e in progress] == [(0, 2)]
    assert not list(model.class_images.rglob("*.png"))


@pytest.mark.slow
def test_class_image_progress_has_an_eta(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(
        tmp_path, class_prompt="a dog", num_class_images_per_image=1, class_infer_steps=1)], max_train_steps=1)
    assert train_model(root, "m").ok
    progress = [e for e in read_events(model) if e["kind"] == "class_images"]
    assert [e["done"] for e in progress] == [0, 1, 2] and progress[0]["eta_s"] is None
    assert all(e["eta_s"] >= 0 for e in progress[1:]) and progress[-1]["eta_s"] == 0


@pytest.mark.slow
def test_rest_after_n_epochs_checkpoint_name_and_no_saves_during_training(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=3,
                             save_every_n_epochs=1, save_during_training=False, checkpoint_name="rex v2",
                             pause_every_n_epochs=2, pause_seconds=1)
    result = train_model(root, "m")
    assert result.ok and result.step == 6
    assert [p.name for p in result.checkpoints] == ["rex v2_6.safetensors"]  # no saves during the run
    events = read_events(model)
    rests = [(e["kind"], e["step"]) for e in events if e["kind"] in ("paused", "resumed")]
    assert rests == [("paused", 4), ("resumed", 4)]
    paused, resumed = (e["time"] for e in events if e["kind"] in ("paused", "resumed"))
    assert resumed - paused >= 1.0


def test_resume_with_settings_that_no_longer_fit_is_a_clear_error(tmp_path, tiny_source):
    from dreambooth.config import Config
    from dreambooth.errors import UserError

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], max_train_steps=1,
                             train_text_encoder_ratio=0.0)
    assert train_model(root, "m").ok
    config = Config.load(model.config_path)
    config.with_parameters(max_train_steps=3, train_text_encoder_ratio=1.0).save(model.config_path)
    with pytest.raises(UserError, match="saved training state does not fit the current settings"):
        train_model(root, "m")


def test_a_run_goes_back_to_an_earlier_kept_save(tmp_path, tiny_source, capsys):
    from dreambooth.cli import main

    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(tmp_path)], num_train_epochs=3,
                             save_every_n_epochs=1, keep_saves=2)
    assert train_model(root, "m").ok
    first_run = load_file(root.checkpoints / "m_6.safetensors")
    assert sorted(p.name for p in model.saves.iterdir()) == ["step-4", "step-6"]  # saves at 2, 4, 6; two kept

    assert main(["--root", str(root.root), "train", "m", "--from-step", "2"]) == 2
    assert "no kept save at step 2 (kept: 6, 4)" in capsys.readouterr().err

    (root.checkpoints / "m_4.safetensors").unlink()
    assert main(["--root", str(root.root), "train", "m", "--from-step", "4"]) == 0
    assert "went back to the save at step 4" in capsys.readouterr().out
    start = next(e for e in read_events(model) if e["kind"] == "start")
    assert start["step"] == 4
    assert (root.checkpoints / "m_4.safetensors").is_file()  # the save gone back to is published again
    again = load_file(root.checkpoints / "m_6.safetensors")
    assert same(first_run, again, UNET)  # the same steps from the same save: the same weights
    assert sorted(p.name for p in model.saves.iterdir()) == ["step-4", "step-6"]

    assert main(["--root", str(root.root), "train", "m", "--start-over", "--from-step", "4"]) == 2
    assert "--start-over and --from-step: choose one" in capsys.readouterr().err
    assert main(["--root", str(root.root), "train", "m", "--start-over"]) == 0
    assert "m: back to the weights of" in capsys.readouterr().out
    assert next(e for e in read_events(model) if e["kind"] == "start")["step"] == 0
    assert same(first_run, load_file(root.checkpoints / "m_6.safetensors"), UNET)  # the first run, once more


def test_class_images_in_batches_and_the_prior_loss_weight_follows_its_schedule(tmp_path, tiny_source, monkeypatch):
    """class_batch_size 4: six class images in two pipeline calls (4, then 2), named and numbered as one at a time.
    prior_loss_scale_epochs 1: the loss of each step is instance + w x class with w going 1.0 -> 0.25 over epoch 1."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.train import step as step_module

    batches = []
    call = StableDiffusionPipeline.__call__

    def counting_call(self, *args, **kwargs):
        batches.append(len(kwargs["prompt"]))
        return call(self, *args, **kwargs)

    losses = []
    compute_loss = step_module.TrainStep.compute_loss

    def recording(self, *args, **kwargs):
        out = compute_loss(self, *args, **kwargs)
        losses.append((out.loss.item(), out.instance_loss.item(), out.prior_loss.item()))
        return out

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting_call)
    monkeypatch.setattr(step_module.TrainStep, "compute_loss", recording)
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(
        tmp_path, class_prompt="a dog", num_class_images_per_image=3, class_infer_steps=1)], num_train_epochs=2,
        class_batch_size=4, prior_loss_weight=1.0, prior_loss_weight_min=0.25, prior_loss_scale_epochs=1)
    result = train_model(root, "m")
    assert result.ok and result.step == 4, result.summary()
    assert batches == [4, 2]
    [folder] = model.class_images.iterdir()
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(6)]
    assert {p.read_text().strip() for p in folder.glob("*.txt")} == {"a dog"}
    seeds = sorted(int(re.search(r"Seed: (\d+)", Image.open(p).info["parameters"]).group(1))
                   for p in folder.glob("*.png"))
    assert seeds == list(range(6))
    progress = [e["done"] for e in read_events(model) if e["kind"] == "class_images"]
    assert progress == list(range(7))  # one event per image, batches or not

    # Two steps per epoch: the weight is 1.0 at step 0, 0.625 half-way through epoch 1, 0.25 from its end on.
    assert len(losses) == 4 and all(prior > 0 for _, _, prior in losses)
    for (loss, instance, prior), weight in zip(losses, (1.0, 0.625, 0.25, 0.25)):
        assert loss == pytest.approx(instance + weight * prior, rel=1e-5)


def test_previews_render_every_prompt_of_the_sample_prompt_file(tmp_path, tiny_source, monkeypatch):
    from dreambooth import prompt_files

    prompts = tmp_path / "previews.txt"
    prompts.write_text("# one line per preview prompt\n[filewords] on the moon\n\na zwx dog in the snow\n",
                       encoding="utf-8")
    reads = []
    read = prompt_files.read_prompt_file
    monkeypatch.setattr(prompt_files, "read_prompt_file", lambda path: reads.append(path) or read(path))
    root, model = make_model(tmp_path / "root", tiny_source, concepts=[concept(
        tmp_path, sample_prompt="not used when a file is set", sample_prompt_file=str(prompts), num_samples=2,
        sample_seed=3, sample_infer_steps=1)], num_train_epochs=2, sample_every_n_epochs=1)
    result = train_model(root, "m")
    assert result.ok, result.summary()
    assert len(reads) == 2  # once by the check before training, once at setup; not once per preview
    names = sorted(p.name for p in model.samples.iterdir())
    assert names == [f"{step}-0-{k}.png" for step in (2, 4) for k in range(4)]
    infos = [Image.open(model.samples / f"4-0-{k}.png").info["parameters"] for k in range(4)]
    assert [info.split("\n")[0] for info in infos] == ["a red zwx dog on grass on the moon"] * 2 + [
        "a zwx dog in the snow"] * 2
    assert ["Seed: 3" in infos[0], "Seed: 4" in infos[1], "Seed: 3" in infos[2], "Seed: 4" in infos[3]] == [True] * 4

    # The file gone before the next run: one line naming the setting, before any model loads.
    from dreambooth.errors import UserError
    from dreambooth.train import loop

    prompts.unlink()
    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=r"^concepts\[0\]\.sample_prompt_file: '.*previews\.txt': no such file$"):
        train_model(root, "m")


def test_a_run_with_the_newer_losses_and_noise_on_a_v_prediction_model(tmp_path):
    """Zero terminal SNR (the v2-v model), the scheduled pseudo-Huber loss, debiased weighting, input perturbation
    and pyramid noise together: a whole run with class images and previews trains, and its loss is finite."""
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    source = write_tiny_checkpoint("v2-v", tmp_path / "v.safetensors", seed=0)
    concepts = [concept(tmp_path, num_class_images_per_image=1, class_infer_steps=2, num_samples=1,
                        sample_infer_steps=2)]
    root, model = make_model(tmp_path / "root", source, concepts=concepts, family="v2-v", num_train_epochs=1,
                             sample_every_n_epochs=1, zero_terminal_snr=True, loss_type="huber",
                             huber_schedule="snr", debiased_estimation=True, input_perturbation=0.1,
                             multires_noise_iterations=4)
    result = train_model(root, "m")
    assert result.ok and result.step == 2, result.summary()
    losses = [e["loss"] for e in read_events(model) if e["kind"] == "step"]
    assert len(losses) == 2 and all(0 < loss < 1e3 for loss in losses), losses
    assert sorted(p.name for p in model.samples.iterdir()) == ["2-0-0.png"]


def test_masked_loss_trains_with_masks_and_cached_latents(tmp_path, tiny_source):
    """masked_loss: a mask file for one image, an alpha channel for another, none for the third; with cached latents
    and prior preservation the run trains, and a bad mask is named before any model loads."""
    folder = draw_images(tmp_path / "instance", count=3)
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    Image.new("L", Image.open(images[0]).size, 255).save(images[0].with_name(images[0].stem + ".mask.png"))
    with_alpha = Image.open(images[1]).convert("RGBA")
    with_alpha.putalpha(Image.new("L", with_alpha.size, 200))
    with_alpha.save(images[1])
    concepts = [concept(tmp_path, instance_data_dir=str(folder), num_class_images_per_image=1, class_infer_steps=1)]
    root, model = make_model(tmp_path / "root", tiny_source, concepts=concepts, num_train_epochs=2,
                             masked_loss=True, cache_latents=True, hflip=True)
    result = train_model(root, "m")
    assert result.ok and result.step == 6, result.summary()

    Image.new("L", (5, 5), 255).save(images[2].with_name(images[2].stem + ".mask.png"))
    from dreambooth.errors import UserError

    with pytest.raises(UserError, match=r"mask .*\.mask\.png: 5x5 pixels, but its image"):
        train_model(root, "m", max_steps=8)


def test_block_multipliers_reach_the_trained_weights(tmp_path, tiny_source):
    """unet_down_lr_scale 0: the down blocks stay as they were while the rest of the UNet learns; the rates are
    logged per named group."""
    root, model = make_model(tmp_path / "root", tiny_source, num_train_epochs=1, unet_down_lr_scale=0.0,
                             unet_up_lr_scale=2.0, optimizer="adamw", weight_decay=0.0)
    before = load_file(model.working / "unet" / "diffusion_pytorch_model.safetensors")
    assert train_model(root, "m").ok
    after = load_file(model.working / "unet" / "diffusion_pytorch_model.safetensors")
    down = [k for k in before if k.startswith("down_blocks.")]
    up = [k for k in before if k.startswith("up_blocks.")]
    assert down and all(torch.equal(before[k], after[k]) for k in down)
    assert any(not torch.equal(before[k], after[k]) for k in up)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(model.logs / "tensorboard")).Reload().Tags()["scalars"]
    assert {"lr/unet", "lr/unet_down", "lr/unet_mid", "lr/unet_up", "lr/text_encoder"} <= set(scalars)


def test_validation_loss_at_fixed_noise_on_held_out_images(tmp_path, tiny_source):
    """validation_every_n_steps 2 with one image held out: a Validation event every 2 steps and at the end, on the
    chart. Measured with learning rate 0 it never moves (fixed timesteps and noise, the models in eval mode);
    measured while training it does."""
    folder = draw_images(tmp_path / "instance", count=3)

    def run(name, **settings):
        concepts = [concept(tmp_path, instance_data_dir=str(folder))]
        root, model = make_model(tmp_path / name, tiny_source, concepts=concepts, num_train_epochs=3,
                                 validation_every_n_steps=2, validation_holdout=1, **settings)
        result = train_model(root, "m")
        assert result.ok and result.step == 6, result.summary()  # 2 of the 3 images train: 2 steps an epoch
        return model, [(e["step"], e["loss"]) for e in read_events(model) if e["kind"] == "validation"]

    _, frozen = run("frozen", learning_rate=0.0, text_encoder_learning_rate=0.0, optimizer="adamw")
    assert [s for s, _ in frozen] == [2, 4, 6] and len({v for _, v in frozen}) == 1
    model, learning = run("learning", learning_rate=1e-3, optimizer="adamw")
    assert [s for s, _ in learning] == [2, 4, 6] and len({v for _, v in learning}) == 3
    from dreambooth import jobs
    from dreambooth.store import DataRoot
    from dreambooth.ui import views

    st = jobs.status(DataRoot(tmp_path / "learning"), "m")
    assert st.validation == learning
    assert "db-loss-val" in views.loss_chart(st.losses, st.validation)
