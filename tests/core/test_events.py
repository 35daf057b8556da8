import pytest

from dreambooth.events import (Cancelled, Checkpoint, ClassImages, Controls, Done, Error, EventLog, Paused, Resumed,
                               Sample, Start, Step, fold)


def test_events_are_read_incrementally(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    assert log.read() == ([], 0)
    log.emit(Start(total_steps=10, epochs=2, steps_per_epoch=5, step=0))
    events, offset = log.read()
    assert [type(e) for e in events] == [Start] and events[0].total_steps == 10 and events[0].time > 0
    log.emit(Step(1, 0, loss=0.5, lr=1e-6, it_per_s=1.0, eta_s=9.0, memory_mb=10.0))
    events, offset2 = log.read(offset)
    assert [e.kind for e in events] == ["step"] and events[0].loss == 0.5 and offset2 > offset


def test_a_half_written_line_waits_for_its_end(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(Done(1, "finished"))
    with open(log.path, "a") as f:
        f.write('{"kind": "paused", "st')
    events, offset = log.read()
    assert len(events) == 1
    with open(log.path, "a") as f:
        f.write('ep": 3}\n')
    events, _ = log.read(offset)
    assert events == [Paused(3, time=0.0)]


def test_foreign_and_damaged_lines_are_skipped(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.path.write_bytes(b'{"kind": "step"}\n[1, 2]\n{"kind": "unknown"}\n\xff\xfe\nnot json\n')
    log.emit(Error("boom"))
    events, _ = log.read()
    assert [e.kind for e in events] == ["error"]


def test_a_new_run_keeps_the_previous_log(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(Done(1, "finished"))
    log.clear()
    assert log.read() == ([], 0)
    assert log.path.with_suffix(".jsonl.1").exists()


def test_the_fold_turns_a_log_into_a_status():
    events = [Start(10, 2, 5, step=4), ClassImages(1, 2), Step(5, 1, 0.25, 1e-6, 2.0, 2.5, 100.0),
              Sample(5, ("a.png",)), Checkpoint(5, "m_5.safetensors"), Paused(5)]
    st = fold(events)
    assert (st.state, st.step, st.start_step, st.total_steps, st.loss) == ("paused", 5, 4, 10, 0.25)
    assert st.samples == ["a.png"] and st.checkpoints == ["m_5.safetensors"] and st.losses == [(5, 0.25)]
    st = fold(events + [Resumed(5), Cancelled(6, "cancelled at step 6")])
    assert (st.state, st.step, st.message, st.ended) == ("cancelled", 6, "cancelled at step 6", True)
    assert fold([Error("bad input")]).state == "error" and fold([]).state == "idle"


def test_control_requests(tmp_path):
    controls = Controls(tmp_path / "control")
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
