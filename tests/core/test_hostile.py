"""The hostile set: a model folder edited by users and other tools, odd file kinds, full disks and hostile text. Each
case gives one line naming the file (or is handled), never a traceback, a hang or markup in the page."""
import errno
import json
import os
import threading

import pytest
from PIL import Image, PngImagePlugin

from dreambooth import actions, cli, jobs
from dreambooth.config import Concept, Config, ConfigError
from dreambooth.errors import UserError, WriteError
from dreambooth.events import Controls, EventLog, Follower, Step
from dreambooth.store import DataRoot, ModelBusyError
from dreambooth.ui import views

INJECTION = '<img src=x onerror="alert(1)"> ![pixel](http://tracker.example/p.png) **bold**'


@pytest.fixture
def model(settings_only_model):
    return settings_only_model


def returns_within(seconds, fn, *args):
    """fn(*args) in a thread; fails when it does not return in time (a read that blocks on a FIFO)."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} did not return within {seconds} s"
    return out["value"]


# ---------------------------------------------------------------- the event log and what the page shows


def test_events_of_the_wrong_type_are_ignored_and_text_is_never_markup(model):
    root, m = model
    m.logs.mkdir()
    lines = [{"kind": "start", "total_steps": "<b>10</b>", "epochs": 1, "steps_per_epoch": 1, "step": 0},
             {"kind": "start", "total_steps": 10, "epochs": 1, "steps_per_epoch": 10, "step": 0},
             {"kind": "step", "step": 3, "epoch": 0, "loss": "NaN<script>", "lr": 1e-3, "it_per_s": 1, "eta_s": None,
              "memory_mb": 5},
             {"kind": "step", "step": 4, "epoch": [1], "loss": 0.5, "lr": 1e-3, "it_per_s": 1, "eta_s": None,
              "memory_mb": 5},
             {"kind": "sample", "step": 4, "paths": [{"x": 1}]},
             {"kind": "error", "message": INJECTION, "step": 4}]
    m.events.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    st = jobs.status(root, "dog")
    assert (st.total_steps, st.step, st.state) == (10, 4, "error")
    page = views.status_line(st) + views.progress_bar(st) + views.loss_chart(st.losses)
    assert "<img" not in page and "<script" not in page and "](http" in page  # as text, never as markup
    assert "&lt;img" in page and "<b>10" not in page


def test_status_reads_only_what_the_log_gained(model):
    root, m = model
    log = EventLog(m.events)
    for step in range(1, 4):
        log.emit(Step(step, 0, 0.1, 1e-3, 1.0, None, 1.0))
    follower, offsets = Follower(), []
    real = EventLog.read

    def recording(self, offset=0):
        offsets.append(offset)
        return real(self, offset)

    EventLog.read = recording
    try:
        assert jobs.status(root, "dog", follower).step == 3
        read_before = m.events.stat().st_size
        log.emit(Step(4, 0, 0.1, 1e-3, 1.0, None, 1.0))
        assert jobs.status(root, "dog", follower).step == 4
    finally:
        EventLog.read = real
    assert offsets == [0, read_before]  # the second poll parsed only the line added
    m.events.unlink()  # a new run's log: read from its start again
    log.emit(Step(1, 0, 0.1, 1e-3, 1.0, None, 1.0))
    assert jobs.status(root, "dog", follower).step == 1


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_log_that_is_a_folder_or_a_fifo_is_said_and_never_waited_on(model, kind):
    root, m = model
    m.logs.mkdir()
    for path in (m.events, m.train_log):
        path.mkdir() if kind == "folder" else os.mkfifo(path)
    st = returns_within(10, jobs.status, root, "dog")
    assert st.state == "error" and str(m.events) in st.message
    assert str(m.train_log) in st.log_tail


def test_a_control_path_that_is_a_file_is_one_line(model):
    root, m = model
    m.control.write_text("not a folder")
    with pytest.raises(WriteError, match=r"cannot write .*control"):
        Controls(m.control).request("pause")
    assert Controls(m.control).pending() == set()


@pytest.mark.parametrize("content", ["folder", '{"name": "../x", "pid": 1}', '{"name": "dog", "pid": "1"}',
                                     '["dog"]', "\xff\xfe"])
def test_a_damaged_job_file_never_crashes_the_poll(model, content):
    root, m = model
    path = root.dreambooth / ".job.json"
    path.mkdir() if content == "folder" else path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert jobs.running_job(root) is None and jobs.last_job(root) is None
    if content == "folder":
        with pytest.raises(UserError, match="is a folder where the job file belongs"):
            jobs._claim(root, "dog")


def test_damaged_records_of_a_model(model):
    root, m = model
    m.logs.mkdir()
    m.exports.write_bytes(b"\xff\xfe/not/utf8\n\x00\n")
    assert actions.model_files(root, "dog") == []
    save = m.saves / "step-4"
    save.mkdir(parents=True)
    (save / "trainer.json").write_text(json.dumps({"step": 4, "saved_at": "yesterday"}))
    (m.saves / "step-5").mkdir()
    (m.saves / "step-5" / "trainer.json").write_text(json.dumps({"step": 5, "total_steps": [1]}))
    (m.saves / "step-6").mkdir()
    (m.saves / "step-6" / "trainer.json").write_text(json.dumps({"step": 6, "saved_at": 1.0}))
    assert actions.kept_saves(root, "dog") == [6]


def test_previews_with_odd_chunks_are_captioned_from_their_name(tmp_path):
    big = PngImagePlugin.PngInfo()
    big.add_text("parameters", "x" * 2_000_000, zip=True)  # larger than PIL's text chunk limit once inflated
    Image.new("RGB", (8, 8)).save(tmp_path / "12-0-0.png", pnginfo=big)
    bomb = tmp_path / "13-0-0.png"
    Image.new("1", (20000, 20000)).save(bomb)  # a header of 400 megapixels: PIL refuses to open it
    assert views.preview_caption(tmp_path / "12-0-0.png").startswith("step 12")
    assert views.preview_caption(bomb) == "step 13"
    assert len(views.previews(tmp_path)) == 2


# ---------------------------------------------------------------- images


def test_extreme_images_are_refused_by_name(tmp_path):
    from dreambooth.data.images import ImageWarning, find_images, readable_images

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (1, 20000)).save(folder / "strip.png")
    Image.new("RGB", (64, 64)).save(folder / "ok.png")
    with pytest.warns(ImageWarning, match=r"strip.png: .*1x20000 pixels: one side more than 8 times"):
        assert [p.name for p in readable_images(find_images(folder))] == ["ok.png"]


def test_a_link_loop_in_an_images_folder_finds_each_image_once(tmp_path):
    from dreambooth.data.images import find_images

    folder = tmp_path / "img"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    os.symlink(folder, folder / "sub" / "loop")
    os.symlink(folder / "a.png", folder / "same.png")
    assert sorted(p.name for p in find_images(folder)) == ["a.png", "b.png"]


# ---------------------------------------------------------------- full and read-only disks


def fail_writes(monkeypatch, code=errno.ENOSPC):
    import tempfile

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "disk full while writing"),
                                        (errno.EROFS, "cannot write .* \\(Read-only file system\\)")])
def test_a_full_or_read_only_disk_is_one_line_and_nothing_is_half_written(model, monkeypatch, code, said):
    root, m = model
    before = m.config_path.read_bytes()
    fail_writes(monkeypatch, code)
    with pytest.raises(WriteError, match=said) as e:
        Config(concepts=(Concept(instance_token="zwx"),)).save(m.config_path)
    assert str(m.config_path) in str(e.value) and "the previous file is intact" in str(e.value)
    assert m.config_path.read_bytes() == before and sorted(p.name for p in m.path.iterdir()) == ["config.json"]


def test_the_routes_answer_a_full_disk_with_507_naming_the_file(model, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dreambooth.host import Host
    from dreambooth.ui import routes

    root, m = model
    app = FastAPI()
    routes.add_routes(app, Host(root=root))
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    fail_writes(monkeypatch)
    response = client.post("/dreambooth/config/dog", json={"parameters": {"learning_rate": 1e-5}})
    assert response.status_code == 507 and "disk full while writing" in response.json()["detail"]
    assert "config.json" in response.json()["detail"]


def test_the_cli_on_a_full_disk_and_on_a_root_that_is_a_file(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert cli.main(["--root", str(not_a_folder), "ui", "--port", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: data folder {not_a_folder}: is a file, not a folder"
    from dreambooth.checkpoint.tiny import write_tiny_checkpoint

    source = write_tiny_checkpoint("v1", tmp_path / "tiny.safetensors", seed=0)
    DataRoot(tmp_path / "root").ensure()
    fail_writes(monkeypatch)
    assert cli.main(["--root", str(tmp_path / "root"), "create", "dog", "--source", str(source)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full while writing") and "dog" in err[0], err
    assert DataRoot(tmp_path / "root").model_names() == []


# ---------------------------------------------------------------- bad errors


def test_errors_are_one_line_of_words():
    busy = ModelBusyError("model 'src' is training (pid 3666); wait until it ends", {"pid": 3666})
    assert str(busy) == "model 'src' is training (pid 3666); wait until it ends"
    with pytest.raises(ConfigError, match="lone surrogate"):
        Config.from_dict({"concepts": [{"instance_prompt": "a \ud800 dog"}]})
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"parameters": {f"unknown_{i}_" + "x" * 100: 1 for i in range(10000)}})
    assert len(str(e.value)) < 2000 and "and 9988 more problems" in str(e.value)


def test_untouched_settings_round_trip_through_the_tab_exactly():
    from dreambooth.config import PARAMETER_SETTINGS
    from dreambooth.ui.fields import coerce, shown

    rate = next(s for s in PARAMETER_SETTINGS if s.name == "learning_rate")
    for value in (1.23456789e-06, 2e-06, 1e-4, 3.0000000000000004e-05):
        assert coerce(rate, shown(rate, value)) == value


def test_utf8_user_names_in_basic_auth():
    import base64

    from dreambooth.ui.routes import basic_credentials

    header = "Basic " + base64.b64encode("jörg:pässwörd".encode()).decode()
    assert basic_credentials(header) == ("jörg", "pässwörd")
    assert basic_credentials("Basic !!!") is None and basic_credentials("Bearer x") is None


def test_a_lora_written_to_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """safetensors says "disk full" with its own error type: still the one line, and no file left."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from dreambooth.lora.files import write_lora_file

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "Lora" / "dog_4_extract_r8.safetensors"
    with pytest.raises(WriteError, match=r"^disk full while writing .*dog_4_extract_r8.safetensors; no partial file"):
        write_lora_file(out, {"a": torch.zeros(2)}, {})
    assert [p.name for p in out.parent.iterdir()] == []
