import pytest

from dreambooth.events import Controls, EventLog


def test_events_are_read_incrementally(tmp_path):
    log = EventLog(tmp_path)
    assert log.read() == ([], 0)
    log.emit("start", total_steps=10)
    events, offset = log.read()
    assert [e["kind"] for e in events] == ["start"] and events[0]["total_steps"] == 10
    log.emit("step", step=1, loss=0.5)
    events, offset2 = log.read(offset)
    assert [e["kind"] for e in events] == ["step"] and offset2 > offset


def test_a_half_written_line_waits_for_its_end(tmp_path):
    log = EventLog(tmp_path)
    log.emit("start")
    with open(log.path, "a") as f:
        f.write('{"kind": "st')
    events, offset = log.read()
    assert len(events) == 1
    with open(log.path, "a") as f:
        f.write('ep"}\n')
    events, _ = log.read(offset)
    assert [e["kind"] for e in events] == ["step"]


def test_a_new_run_keeps_the_previous_log(tmp_path):
    log = EventLog(tmp_path)
    log.emit("done")
    log.clear()
    assert log.read() == ([], 0)
    assert log.path.with_suffix(".jsonl.1").exists()


def test_control_requests(tmp_path):
    controls = Controls(tmp_path)
    assert controls.pending() == set()
    controls.request("pause")
    controls.request("save")
    assert controls.pending() == {"pause", "save"}
    controls.withdraw("save")
    assert controls.pending() == {"pause"}
    controls.clear_all()
    assert controls.pending() == set()
    with pytest.raises(ValueError, match="unknown control request"):
        controls.request("explode")
