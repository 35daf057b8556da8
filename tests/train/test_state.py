"""Resume state and the trainer's writes without a training run: damaged state files, disk full, leftovers of a
killed save, images that go away during a run."""
from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from dreambooth.config import Parameters
from dreambooth.data.dataset import Example, Item, TrainingData
from dreambooth.errors import UserError
from dreambooth.train.loop import StopTraining, read_item, writing
from dreambooth.train.saves import go_back, keep_save, kept_saves, mark_checkpoint_written, read_trainer_info
from dreambooth.errors import disk_full
from dreambooth.train.state import load_state, save_state, write_failed

CPU = SimpleNamespace(is_main_process=True, device="cpu")


def training_objects(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = training_objects()
    folder = tmp_path / "state"
    save_state(folder, 7, 10, optimizer, scheduler, None)
    return folder


def test_a_saved_state_loads_back(saved):
    torch.manual_seed(123)
    _, optimizer, scheduler = training_objects(seed=1)
    expected_rng = torch.load(saved / "rng.pt", weights_only=True)["torch"]
    assert load_state(saved, CPU, optimizer, scheduler, None) == 7
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert read_trainer_info(saved)["checkpoint_written"] is False
    mark_checkpoint_written(saved)
    info = read_trainer_info(saved)
    assert info == {"step": 7, "total_steps": 10, "checkpoint_written": True, "saved_at": info["saved_at"]}
    assert read_trainer_info(saved.parent / "nothing-saved") is None


def test_the_last_n_saves_are_kept_and_a_run_can_go_back_to_one(tmp_path):
    state, saves = tmp_path / "state", tmp_path / "saves"
    model, optimizer, scheduler = training_objects()
    weights = {}
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.clone()
        save_state(state, step, 40, optimizer, scheduler, None,
                   lambda tmp: torch.save(model.state_dict(), tmp / "weights.pt"))
        mark_checkpoint_written(state)
        keep_save(state, saves, keep=3)
    assert [save["step"] for save in kept_saves(saves)] == [40, 30, 20]  # newest first; step 10 dropped
    latest = saves / "step-40" / "weights.pt"
    assert os.path.samefile(latest, state / "weights.pt")  # the newest kept save is state/ itself: no extra disk

    assert go_back(state, saves, 20) == "went back to the save at step 20"
    assert read_trainer_info(state)["step"] == 20
    assert read_trainer_info(state)["checkpoint_written"] is False  # the next run writes its checkpoint file again
    assert torch.equal(torch.load(state / "weights.pt", weights_only=True)["weight"], weights[20])
    assert read_trainer_info(saves / "step-20")["checkpoint_written"] is True  # the kept save is untouched
    assert [save["step"] for save in kept_saves(saves)] == [40, 30, 20]

    # The run from step 20 saves at 25: the newest saves are kept, whatever their step.
    save_state(state, 25, 40, optimizer, scheduler, None, lambda tmp: torch.save(model.state_dict(), tmp / "w.pt"))
    mark_checkpoint_written(state)
    keep_save(state, saves, keep=3)
    assert [save["step"] for save in kept_saves(saves)] == [25, 40, 30]

    (saves / ".step-99.new").mkdir()  # left by a keep killed mid-swap
    keep_save(state, saves, keep=3)
    assert not (saves / ".step-99.new").exists()
    with pytest.raises(UserError, match=r"no kept save at step 20 \(kept: 25, 40, 30\)"):
        go_back(state, saves, 20)
    keep_save(state, saves, keep=1)  # the setting lowered to 1: only state/ stays
    assert not saves.exists() and read_trainer_info(state)["step"] == 25


def test_reading_a_save_while_the_trainer_writes_one_leaves_the_write_alone(tmp_path, saved):
    """The tab lists saves every second during a run: a reader must never tidy up the writer's half-made folder."""
    from dreambooth.train.saves import saved_step, swap_folder

    seen = []

    def write(tmp: Path) -> None:
        (tmp / "trainer.json").write_text('{"step": 8}')
        seen.append(saved_step(saved))  # the tab's poll, mid-save
        assert tmp.is_dir() and (tmp / "trainer.json").is_file()

    swap_folder(saved, write)
    assert seen == [7] and saved_step(saved) == 8
    saved.rename(saved.parent / ".state.old")  # killed between the two renames of a swap
    assert saved_step(saved) == 8 and (saved.parent / ".state.old").is_dir()  # read, not moved


def test_a_damaged_kept_save_is_left_out_of_the_list(tmp_path):
    state, saves = tmp_path / "state", tmp_path / "saves"
    _, optimizer, scheduler = training_objects()
    for step in (1, 2):
        save_state(state, step, 2, optimizer, scheduler, None)
        keep_save(state, saves, keep=2)
    (saves / "step-1" / "trainer.json").write_text("garbage")
    (saves / "not-a-save").mkdir()
    assert [save["step"] for save in kept_saves(saves)] == [2]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "rng.pt truncated": ("rng.pt", truncate),
    "optimizer.pt truncated": ("optimizer.pt", truncate),
    "lr_scheduler.pt emptied": ("lr_scheduler.pt", lambda p: p.write_bytes(b"")),
    "rng.pt replaced by other data": ("rng.pt", lambda p: torch.save({"torch": "abc"}, p)),
    "trainer.json with a null step": ("trainer.json", lambda p: p.write_text('{"step": null, "total_steps": 10}')),
    "trainer.json garbage": ("trainer.json", lambda p: p.write_bytes(b"\x00\xff garbage")),
    "trainer.json a list": ("trainer.json", lambda p: p.write_text("[7]")),
    "trainer.json missing": ("trainer.json", lambda p: p.unlink()),
    "optimizer.pt missing": ("optimizer.pt", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_state_file_is_an_error_naming_it_and_the_ways_out(saved, case):
    name, damage = DAMAGE[case]
    damage(saved / name)
    _, optimizer, scheduler = training_objects(seed=1)
    with pytest.raises(UserError) as caught:
        load_state(saved, CPU, optimizer, scheduler, None)  # never None: that would silently restart from step 0
    message = str(caught.value)
    assert message.startswith(f"{saved / name}: the saved training state is damaged")
    assert "put back a good copy" in message and f"start over by deleting {saved}" in message
    assert "\n" not in message
    if any(word in case for word in ("truncated", "emptied", "garbage", "other data")):
        assert caught.value.__cause__ is not None  # what the reader said stays for the log


def test_settings_that_do_not_fit_are_told_apart_from_damage(saved):
    model = torch.nn.Linear(4, 8)  # other shapes: the optimizer state does not fit
    optimizer = torch.optim.AdamW([*model.parameters(), torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(UserError, match="does not fit the current settings"):
        load_state(saved, CPU, optimizer, scheduler, None)


def test_disk_full_is_recognised_in_every_shape():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert disk_full(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                     '"No space left on device" })'))  # safetensors 0.4 (the webui's)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as torch_error:  # torch.save into a file object: its own error, the OSError as context
        assert disk_full(torch_error) and write_failed(torch_error)
    from dreambooth.errors import WriteError

    export_error = WriteError("disk full while writing m_4.safetensors; the previous file is intact")
    export_error.__cause__ = OSError(errno.ENOSPC, "No space left on device")  # as the exporter raises it
    assert disk_full(export_error) and write_failed(export_error)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)"))
    assert write_failed(OSError(errno.EACCES, "Permission denied"))
    assert not write_failed(ValueError("a bug, not a write")) and not write_failed(KeyError("x"))


def test_disk_full_while_saving_keeps_the_previous_state(saved, monkeypatch):
    """The writers raise what they raise on a full disk: OSError (plain files), SafetensorError (weights)."""
    _, optimizer, scheduler = training_objects(seed=1)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def safetensors_full(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(StopTraining) as caught, writing(saved, last_save_step=7):
        save_state(saved, 9, 10, optimizer, scheduler, None, write_weights=safetensors_full)
    assert caught.value.status == "error"
    assert caught.value.message == (f"disk full while writing {saved}; the previous file is intact. Train again to "
                                    "go on from the last save (step 7)")
    assert isinstance(caught.value.__cause__, SafetensorError)

    real_save = torch.save

    def torch_full(obj, f, *a, **k):
        if getattr(f, "name", "").endswith("rng.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(StopTraining, match=r"^disk full while writing .*state; the previous file is intact"), \
            writing(saved, last_save_step=7):
        save_state(saved, 9, 10, optimizer, scheduler, None)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # the state of step 7, whole
    assert sorted(p.name for p in saved.parent.iterdir()) == ["state"]  # no half-written folder beside it

    with pytest.raises(StopTraining, match=r"^cannot write x \(Permission denied\); the previous file is intact"), \
            writing(Path("x")):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(ValueError), writing(Path("x")):  # not a write failure: not disguised as one
        raise ValueError("a bug")


@pytest.mark.slow
def test_a_real_full_disk_while_saving(tmp_path):
    """A 64 KiB tmpfs (needs root to mount): the real writers fill it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        model, optimizer, scheduler = training_objects()
        save_state(disk / "state", 1, 10, optimizer, scheduler, None)
        before = {p.name: p.read_bytes() for p in (disk / "state").iterdir()}
        big = torch.nn.Linear(128, 128)  # 64 KiB of weights: more than the whole disk

        def write_weights(tmp):
            from safetensors.torch import save_file

            save_file({"w": big.weight.detach().contiguous()}, str(tmp / "weights.safetensors"))

        with pytest.raises(StopTraining, match="^disk full while writing"), writing(disk / "state", 1):
            save_state(disk / "state", 2, 10, optimizer, scheduler, None, write_weights=write_weights)
        big_optimizer = torch.optim.AdamW(big.parameters())
        big(torch.randn(1, 128)).sum().backward()
        big_optimizer.step()
        with pytest.raises(StopTraining, match="^disk full while writing"), writing(disk / "state", 1):
            save_state(disk / "state", 2, 10, big_optimizer, scheduler, None)  # torch.save fills it
        assert {p.name: p.read_bytes() for p in (disk / "state").iterdir()} == before
        assert [p.name for p in disk.iterdir()] == ["state"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    """What a killed save or export left goes; what a live writer (another model's export) is writing stays."""
    from dreambooth.store import DataRoot, atomic_path, reclaim_leftovers

    root = DataRoot(tmp_path).ensure()
    model, checkpoints = root.model("m"), root.checkpoints
    for folder in (model.working, model.samples):
        folder.mkdir(parents=True)
    left = [model.working / ".training.json.k2j4h1x9.tmp", model.samples / ".4-0-0.png.a8b7c6d5.tmp",
            checkpoints / ".m_4.safetensors.0a1b2c3d.tmp", checkpoints / ".m_12.yaml.zz9_y8x7.tmp",
            root.lora / ".m2_4.safetensors.0a1b2c3d.tmp"]
    kept = [model.working / "training.json", checkpoints / "m_4.safetensors", checkpoints / ".hidden"]
    for path in left + kept:
        path.write_text("x")
    with atomic_path(checkpoints / "m2_4.safetensors") as running:
        running.write_text("being written")
        assert sorted(reclaim_leftovers(root, model).paths) == sorted(left)
        assert running.exists()
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_an_image_gone_during_the_run_is_named(tmp_path):
    from train_helpers import draw_images

    folder = draw_images(tmp_path / "img", count=2)
    paths = sorted(folder.iterdir())
    data = TrainingData([[Example(p, "a zwx dog", 0, (64, 64)) for p in paths]], {}, Parameters(resolution=64))
    items = [Item(data.instances[0], (64, 64), False), Item(data.instances[1], (64, 64), True)]
    assert read_item(data, items[0], 0)[0].shape == (3, 64, 64)
    paths[0].unlink()
    with pytest.raises(StopTraining) as caught:
        read_item(data, items[0], 0, last_save_step=3)
    assert caught.value.status == "error" and "saving" not in caught.value.message
    assert caught.value.message.startswith(f"instance image {paths[0]} was deleted during the run; put it back")
    assert caught.value.message.endswith("go on from the last save (step 3)")
    paths[1].write_bytes(b"not an image any more")
    with pytest.raises(StopTraining, match=rf"^class image {re.escape(str(paths[1]))} was changed and cannot be read"):
        read_item(data, items[1], 0)
