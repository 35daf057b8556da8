"""The trainer as real processes: resume after a kill, two data-parallel processes (gloo on CPU), the demo."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import child_env, draw_images, kill_after_checkpoint, make_model, read_events, train_cmd

pytestmark = pytest.mark.slow  # real processes: kill, SIGTERM, two ranks, the demo



def unet_weights(model) -> dict:
    return load_file(model.working / "unet" / "diffusion_pytorch_model.safetensors")


CAPTION_OPTIONS = dict(caption_dropout=0.3, shuffle_tags=True, keep_tokens=1, tag_dropout=0.3,
                       train_text_encoder_ratio=0.5)  # prompts that change every step, the text encoder frozen half way


@pytest.mark.parametrize("options", [{}, CAPTION_OPTIONS, {"channels_last": True}],
                         ids=["plain", "caption-options", "channels-last"])
def test_resume_after_kill_continues_like_an_uninterrupted_run(tmp_path, tiny_source, options):
    settings = dict(num_train_epochs=4, save_every_n_epochs=1, use_ema=True, lr_scheduler="linear", seed=3, **options)
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=2)), "instance_token": "zwx",
                 "class_token": "dog", "num_samples": 0,
                 "instance_prompt": "zwx dog, [filewords], a photo, outdoors" if "shuffle_tags" in options
                 else "[filewords]"}]
    root, model = make_model(tmp_path / "a", tiny_source, concepts=concepts, **settings)

    saved = kill_after_checkpoint(root, model, 4)

    resumed = subprocess.run(train_cmd(root.root), env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = next(e for e in read_events(model) if e["kind"] == "start")
    assert start["step"] == saved and start["total_steps"] == 8
    assert read_events(model)[-1] == {**read_events(model)[-1], "kind": "done", "step": 8}

    # The same run without the kill takes the same steps: the same losses and learning rates from the saved step on
    # (so weights, noise RNG, data order and schedule were restored) and bit for bit the same weights at the end.
    other_root, other = make_model(tmp_path / "b", tiny_source, concepts=concepts, **settings)
    whole = subprocess.run(train_cmd(other_root.root), env=child_env(), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    steps = lambda m: {e["step"]: (e["loss"], e["lr"]) for e in read_events(m) if e["kind"] == "step"}  # noqa: E731
    after_kill, uninterrupted = steps(model), steps(other)
    assert sorted(after_kill) == list(range(saved + 1, 9))
    for step, loss_and_lr in after_kill.items():
        assert loss_and_lr == uninterrupted[step]
    for folder in ("unet", "unet_ema", "text_encoder"):
        name = "model.safetensors" if folder == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(model.working / folder / name), load_file(other.working / folder / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), folder


def test_two_processes_train_data_parallel_and_only_rank0_writes(tmp_path, tiny_source):
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=4)), "instance_token": "zwx",
                 "class_token": "dog", "num_samples": 1, "sample_infer_steps": 1}]
    root, model = make_model(tmp_path / "root", tiny_source, concepts=concepts, num_train_epochs=2,
                             save_every_n_epochs=1, sample_every_n_epochs=2, train_text_encoder_ratio=0.5)
    # No CUDA here: --multi_gpu picks accelerate's torchrun launcher, and the trainer falls back to gloo on CPUs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dreambooth", "--root", str(root.root), "train", "m"]
    run = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    events = read_events(model)
    start = next(e for e in events if e["kind"] == "start")
    assert start["steps_per_epoch"] == 2 and start["total_steps"] == 4  # 4 images shared by 2 processes
    kinds = [e["kind"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("step") == 4 and kinds.count("done") == 1
    assert sorted(p.name for p in root.checkpoints.glob("*.safetensors")) == ["m_2.safetensors", "m_4.safetensors"]
    assert sorted(p.name for p in model.samples.iterdir()) == ["4-0-0.png"]


def test_demo_runs_the_whole_flow_in_the_default_data_root(tmp_path):
    from dreambooth.store import ROOT_ENV

    # no --root: ./data, the folder the tab and the CLI use by default, so the demo's model shows there
    env = {k: v for k, v in child_env().items() if k != ROOT_ENV}
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "dreambooth", "demo"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    checkpoints = [Path(line.split("checkpoint ", 1)[1]) for line in lines if line.startswith("demo: checkpoint ")]
    assert checkpoints and all(p.is_file() and p.parent == tmp_path / "data" / "models" / "Stable-diffusion"
                               for p in checkpoints)
    model = tmp_path / "data" / "models" / "dreambooth" / "demo"
    assert len(list((model / "samples").glob("*.png"))) >= 2
    assert len(list((model / "class_images").rglob("*.png"))) == 4
    print(f"demo took {time.time() - started:.0f} s")

    # a model named "demo" of the user's own is never replaced by the demo
    other = tmp_path / "other"
    create = subprocess.run([sys.executable, "-m", "dreambooth", "--root", str(other), "create", "demo", "--source",
                             str(checkpoints[0])], env=env, capture_output=True, text=True, timeout=300)
    assert create.returncode == 0, create.stderr[-3000:]
    before = (other / "models" / "dreambooth" / "demo" / "config.json").read_bytes()
    refused = subprocess.run([sys.executable, "-m", "dreambooth", "demo", "--root", str(other)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "a model named 'demo' already exists" in refused.stderr
    assert (other / "models" / "dreambooth" / "demo" / "config.json").read_bytes() == before


def test_sigterm_cancels_and_saves_for_resume(tmp_path, tiny_source):
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=2)), "num_samples": 0}]
    root, model = make_model(tmp_path / "root", tiny_source, concepts=concepts, max_train_steps=10000)
    proc = subprocess.Popen(train_cmd(root.root), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 300
        while not any(e["kind"] == "step" for e in read_events(model)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and out.startswith("cancelled:")
    last = read_events(model)[-1]
    assert last["kind"] == "cancelled" and 0 < last["step"] < 10000
    saved = [e for e in read_events(model) if e["kind"] == "checkpoint"]
    assert saved and saved[-1]["step"] == last["step"] and Path(saved[-1]["path"]).is_file()  # save_on_cancel
    assert '"step": %d' % last["step"] in (model.state / "trainer.json").read_text()  # resumable from there


def test_the_trainers_output_holds_its_own_lines_not_its_libraries(tmp_path, tiny_source):
    """What the tab's log and a terminal show: our warning as one line, the progress, the outcome; no diffusers
    "kept in float32: []", no loading bars, no notices about optional packages."""
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=2)), "instance_token": "zwx",
                 "class_token": "dog", "num_samples": 0, "num_class_images_per_image": 1, "class_infer_steps": 2}]
    root, _ = make_model(tmp_path / "root", tiny_source, concepts=concepts, mixed_precision="fp16",
                         optimizer="adamw_8bit")
    run = subprocess.run(train_cmd(root.root), env=child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout + run.stderr
    assert "warning: mixed_precision fp16 needs a GPU; training in full precision (fp32) on the CPU\n" in printed
    for chatter in ("should be kept in float32", "Loading weights", "kernels-community", "torchvision",
                    "UserWarning", "self.dtypes ="):
        assert chatter not in printed, (chatter, printed[-3000:])
    assert "class images: 100%" in printed and "2/2" in printed  # the class images' progress, as the tab shows it
    assert "done: trained 2 steps" in printed
