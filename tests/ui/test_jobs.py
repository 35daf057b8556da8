"""The job supervisor: one job per data root, status from the event log, controls, crash detection. The trainer here is a
small script speaking the events contract (the real trainer runs in test_browser.py)."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from dreambooth import actions, jobs
from dreambooth.config import Config, Concept, Parameters
from dreambooth.errors import UserError
from dreambooth.host import Host
from dreambooth.store import DataRoot

FAKE = Path(__file__).with_name("fake_trainer.py")


def make_model(root: DataRoot, name: str, tmp_path: Path) -> None:
    images = tmp_path / f"{name}_images"
    images.mkdir()
    model = root.ensure().model(name)
    model.path.mkdir(parents=True)
    Config(concepts=(Concept(instance_data_dir=str(images)),)).save(model.config_path)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    mode = {"value": "finish"}
    monkeypatch.setattr(jobs, "trainer_command",
                        lambda root, name, settings: [sys.executable, str(FAKE), str(root.model(name).path), mode["value"]])
    yield mode
    job = jobs.running_job(DataRoot(tmp_path / "root"))
    if job:  # a failed test must not leave its trainer running
        os.kill(job["pid"], signal.SIGKILL)



def recording_host(root):
    calls = []
    return Host(root=root, before_training=lambda: calls.append("unload"), after_training=lambda: calls.append("reload"),
                checkpoints_changed=lambda: calls.append("refresh")), calls


@pytest.mark.slow
def test_finishes_and_reports(tmp_path, fake, wait_for):
    root = DataRoot(tmp_path / "root")
    make_model(root, "m", tmp_path)
    host, calls = recording_host(root)
    jobs.start(root, "m", host)
    assert calls[0] == "unload"
    st = wait_for(lambda: (s := jobs.status(root, "m")).state == "done" and s)
    assert st.step == 10 and st.total_steps == 10 and st.message == "finished"
    assert [s for s, _ in st.losses] == list(range(1, 11))
    wait_for(lambda: calls[-1] == "reload")
    assert jobs.running_job(root) is None


def first_of_two_training(tmp_path, fake) -> DataRoot:
    """Models first and second; first trains (a stand-in that runs until it is cancelled)."""
    root = DataRoot(tmp_path / "root")
    make_model(root, "first", tmp_path)
    make_model(root, "second", tmp_path)
    fake["value"] = "wait"
    jobs.start(root, "first")
    return root


@pytest.mark.slow
def test_second_start_refused_naming_the_running_model(tmp_path, fake, wait_for):
    root = first_of_two_training(tmp_path, fake)
    with pytest.raises(UserError, match="already running: 'first'"):
        jobs.start(root, "second")
    wait_for(lambda: jobs.status(root, "first").step >= 2)
    assert jobs.request(root, "first", "pause") == "pause requested"
    wait_for(lambda: jobs.status(root, "first").state == "paused")
    assert jobs.request(root, "first", "pause") == "resume requested"
    wait_for(lambda: jobs.status(root, "first").state == "running")
    jobs.request(root, "first", "save")
    wait_for(lambda: jobs.status(root, "first").checkpoints)
    jobs.request(root, "first", "cancel")
    assert wait_for(lambda: jobs.status(root, "first").state == "cancelled")
    wait_for(lambda: jobs.running_job(root) is None)
    fake["value"] = "finish"
    jobs.start(root, "second")  # the lock is free again
    wait_for(lambda: jobs.status(root, "second").state == "done")


@pytest.mark.slow
def test_crash_shows_error_with_log_tail(tmp_path, fake, wait_for):
    root = DataRoot(tmp_path / "root")
    make_model(root, "m", tmp_path)
    fake["value"] = "crash"
    jobs.start(root, "m")
    st = wait_for(lambda: (s := jobs.status(root, "m")).state == "error" and s)
    assert "out of memory" in st.log_tail
    assert "stopped without finishing" in st.message
    wait_for(lambda: "exit code -9" in jobs.status(root, "m").message)


@pytest.mark.slow
def test_stale_lock_is_ignored_and_bad_config_refused(tmp_path, fake, wait_for):
    root = DataRoot(tmp_path / "root")
    make_model(root, "m", tmp_path)
    (root.dreambooth / jobs.JOB_FILE).write_text(json.dumps({"name": "gone", "pid": 2**22 + 12345, "started": 0}))
    assert jobs.running_job(root) is None
    cfg = Config.load(root.model("m").config_path)
    Config(concepts=(Concept(instance_data_dir=str(tmp_path / "missing")),)).save(root.model("m").config_path)
    with pytest.raises(UserError, match="missing.*is not a folder"):
        jobs.start(root, "m")
    assert jobs.running_job(root) is None
    cfg.save(root.model("m").config_path)
    jobs.start(root, "m")
    wait_for(lambda: jobs.status(root, "m").state == "done")


def test_controls_need_a_running_job(tmp_path):
    root = DataRoot(tmp_path / "root")
    make_model(root, "m", tmp_path)
    with pytest.raises(UserError, match="no training is running"):
        jobs.request(root, "m", "cancel")
    actions.delete(root, "m", True)
    assert not root.model("m").path.exists()


@pytest.mark.slow
def test_a_damaged_job_file_does_not_let_a_second_training_in(tmp_path, fake, wait_for):
    root = first_of_two_training(tmp_path, fake)
    wait_for(lambda: jobs.status(root, "first").step >= 1)
    (root.dreambooth / jobs.JOB_FILE).write_text('{"name": "fir')  # damaged
    with pytest.raises(UserError, match="already running: 'first'"):
        jobs.start(root, "second")
    assert jobs.running_job(root)["name"] == "first"
    # the model that trains cannot be replaced, deleted or exported meanwhile, whoever asks
    for action in (lambda: actions.delete(root, "first", True),
                   lambda: actions.create(root, "first", str(tmp_path / "x.safetensors"), overwrite=True),
                   lambda: actions.export(root, "first", Parameters())):
        with pytest.raises(UserError, match=r"model 'first' is training \(pid \d+\)"):
            action()
    assert root.model("first").exists()
    jobs.request(root, "first", "cancel")
    wait_for(lambda: jobs.status(root, "first").state == "cancelled")
    wait_for(lambda: root.model("first").lock("").holder() is None)
    actions.delete(root, "first", True)
    assert not root.model("first").path.exists()


@pytest.mark.slow
def test_child_verbs_report_through_events_not_printed_text(tmp_path):
    root = DataRoot(tmp_path / "root")
    with pytest.raises(UserError) as e:
        actions.create(root, "m", str(tmp_path / "missing.safetensors"))
    assert str(e.value) == f"source {str(tmp_path / 'missing.safetensors')!r}: no such file or folder"
    out = jobs.run_cli(root, "tiny-checkpoint", "--family", "v1", "--out", str(tmp_path / "t.safetensors"))
    assert out == f"wrote {tmp_path / 't.safetensors'}"
