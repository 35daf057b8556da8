import os
import signal
import subprocess
import sys

import pytest

from dreambooth.errors import UserError
from dreambooth.store import DataRoot, ModelNameError, atomic_path, atomic_write_text, check_model_name


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "x..y", "con", "NUL.txt", "", " x", "x.", "a" * 101, "*"])
def test_unsafe_names_are_refused_with_the_name(name):
    with pytest.raises(ModelNameError) as e:
        check_model_name(name)
    assert "model name" in str(e.value)


@pytest.mark.parametrize("name", ["dog", "My Dog_v2.1", "sdxl-zwx"])
def test_ordinary_names_pass(name):
    assert check_model_name(name) == name


def test_layout_matches_the_webui(tmp_path):
    root = DataRoot(tmp_path).ensure()
    assert root.checkpoints == tmp_path / "models" / "Stable-diffusion"
    assert root.lora.is_dir() and root.dreambooth.is_dir()
    model = root.model("dog")
    assert model.path == tmp_path / "models" / "dreambooth" / "dog"
    assert root.model_names() == []
    atomic_write_text(model.config_path, "{}")
    assert root.model_names() == ["dog"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_killed_writer_never_leaves_a_partial_file_under_the_final_name(tmp_path):
    target = tmp_path / "big.bin"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dreambooth.store import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()


def test_one_writer_per_model_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from dreambooth.store import DataRoot, ModelBusyError

    model = DataRoot(tmp_path).model("dog")
    with pytest.raises(UserError, match="model 'dog': not found"):
        model.lock("training").__enter__()
    model.path.mkdir(parents=True)
    with model.lock("training"):
        assert model.lock("x").holder() == {"pid": os.getpid(), "purpose": "training"}
        with pytest.raises(ModelBusyError, match=r"model 'dog' is training \(pid \d+\)"):
            with model.lock("exporting"):
                pass
    assert model.lock("x").holder() is None
    # a holder that dies without letting go: the system drops its lock, the next writer simply takes it
    code = ("import os, sys; from pathlib import Path; from dreambooth.store import ModelDir; "
            "ModelDir(Path(sys.argv[1])).lock('training').__enter__(); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(model.path)], check=False)
    assert model.lock_path.read_text()  # the dead holder's record is still there
    with model.lock("training"):
        pass


def test_written_files_have_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


HOLD = ("import sys, time\n"
        "from pathlib import Path\n"
        "from dreambooth.store import atomic_path, temporary_folder\n"
        "with atomic_path(Path(sys.argv[1]) / 'big.safetensors') as tmp, temporary_folder(Path(sys.argv[1]), 'm') as f:\n"
        "    tmp.write_bytes(b'x' * 5000)\n"
        "    (f / 'weights.bin').write_bytes(b'y' * 7000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n")


def test_reclaim_removes_what_dead_writers_left_and_nothing_a_live_one_holds(tmp_path):
    from dreambooth.store import reclaim

    folder = tmp_path / "models"
    folder.mkdir()
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    dead = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing" and dead.stdout.readline().strip() == "writing"
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        (folder / "m.safetensors").write_text("a user's file")
        (folder / ".hidden.txt").write_text("a user's hidden file")
        before = sorted(p.name for p in folder.iterdir())
        assert len(before) == 6  # two temporary files, two temporary folders, the user's two
        reclaimed = reclaim([folder])
        assert len(reclaimed.paths) == 2 and reclaimed.size == 5000 + 7000
        assert "Reclaimed 12.0 KB" in reclaimed.sentence()
        left = sorted(p.name for p in folder.iterdir())
        assert len(left) == 4 and "m.safetensors" in left and ".hidden.txt" in left
        assert not reclaim([folder])  # the live writer's are kept
    finally:
        live.kill()
        live.wait()
    assert reclaim([folder]).size == 5000 + 7000


def test_reclaim_in_this_process_keeps_what_it_writes(tmp_path):
    from dreambooth.store import reclaim, temporary_folder

    with atomic_path(tmp_path / "x.bin") as tmp, temporary_folder(tmp_path, "m") as folder:
        tmp.write_bytes(b"x")
        assert not reclaim([tmp_path]) and tmp.exists() and folder.exists()


def test_a_temporary_folder_of_an_older_version_goes_once_untouched_for_an_hour(tmp_path):
    from dreambooth.store import reclaim

    old = tmp_path / ".m.abcd1234.creating"
    (old / "working").mkdir(parents=True)
    (old / "working" / "w.bin").write_bytes(b"z" * 10)
    assert not reclaim([tmp_path])
    hour_ago = os.stat(old).st_mtime - 3700
    for path in (old, old / "working", old / "working" / "w.bin"):
        os.utime(path, (hour_ago, hour_ago))
    assert reclaim([tmp_path]).paths == (old,)


def test_reclaim_never_touches_another_programs_hidden_files(tmp_path):
    from dreambooth.store import reclaim

    others = [tmp_path / ".download.tmp", tmp_path / ".x.ABCDEFGH.tmp", tmp_path / ".cache.old.tmp",
              tmp_path / "visible.abcd1234.tmp"]
    for path in others:
        path.write_text("someone else's")
    old = tmp_path / ".settings.old"  # a model being replaced looks so only in the models folder
    old.mkdir()
    (old / ".keep").write_text("")
    day_ago = os.stat(old).st_mtime - 86400
    for path in (old, old / ".keep"):
        os.utime(path, (day_ago, day_ago))
    (tmp_path / ".other").mkdir()
    assert not reclaim([tmp_path])
    assert all(p.exists() for p in others) and (tmp_path / ".settings.old").is_dir()
