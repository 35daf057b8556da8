"""The run's schedule and the merged requests, without torch: what is due after each step."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth.config import Parameters
from dreambooth.train.schedule import Due, Schedule, plan_total_steps, text_encoder_steps, trains_text_encoder


def test_the_schedule_module_needs_no_torch():
    code = ("import sys; import dreambooth.train.schedule, dreambooth.train.requests; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("ratio,total,steps", [
    (0.0, 100, 0), (0.25, 100, 25), (1.0, 7, 7), (0.5, 4, 2),
    (0.1, 5, 1),     # 0.5 of a step: rounds to one (a trainable text encoder always gets a step)
    (0.01, 5, 1),    # 0.05 of a step: still one, never a trainable encoder that never trains
    (0.25, 6, 2),    # 1.5 steps: halves round up
    (0.29, 100, 29),  # 28.999999999999996 in floating point: the nearest step, not the floor
    (0.3, 10, 3), (0.7, 10, 7),
])
def test_text_encoder_steps_one_rule(ratio, total, steps):
    assert text_encoder_steps(ratio, total) == steps
    assert trains_text_encoder(ratio) == (steps > 0)  # what components.prepare_for_training uses
    p = Parameters(train_text_encoder_ratio=ratio, max_train_steps=total)
    assert Schedule.plan(p, steps_per_epoch=3).text_encoder_steps == steps


def test_trains_text_encoder_before_its_last_step_and_freezes_after_it():
    s = Schedule(total_steps=5, steps_per_epoch=5, text_encoder_steps=1)
    assert [s.trains_text_encoder(step) for step in range(5)] == [True, False, False, False, False]
    assert [s.after(step).freeze_text_encoder for step in range(1, 6)] == [True, False, False, False, False]
    never = Schedule(total_steps=5, steps_per_epoch=5, text_encoder_steps=0)
    assert not any(never.trains_text_encoder(step) or never.after(step + 1).freeze_text_encoder for step in range(5))


def test_total_steps():
    assert plan_total_steps(Parameters(num_train_epochs=3), steps_per_epoch=4) == 12
    assert plan_total_steps(Parameters(num_train_epochs=3, max_train_steps=5), steps_per_epoch=4) == 5
    assert plan_total_steps(Parameters(num_train_epochs=3, max_train_steps=5), steps_per_epoch=4, override=2) == 2
    s = Schedule.plan(Parameters(num_train_epochs=3, max_train_steps=7), steps_per_epoch=3)
    assert (s.total_steps, s.epochs, s.epoch(6), s.epoch(5)) == (7, 3, 2, 1)


def dues(schedule):
    return {step: schedule.after(step) for step in range(1, schedule.total_steps + 1) if schedule.after(step) != Due()}


def test_samples_and_saves_every_n_epochs_and_at_the_end():
    s = Schedule(total_steps=12, steps_per_epoch=2, sample_every_n_epochs=2, save_every_n_epochs=3, save_on_end=True)
    assert dues(s) == {4: Due(sample=True), 6: Due(save=True), 8: Due(sample=True),
                       12: Due(sample=True, save=True, stop=True)}  # epoch 6's sample and save are the end's
    assert s.after(13) == Due(sample=True, save=True, stop=True)


def test_the_end_without_previews_or_save():
    s = Schedule(total_steps=3, steps_per_epoch=1, sample_every_n_epochs=0, save_every_n_epochs=0, save_on_end=False)
    assert dues(s) == {3: Due(stop=True)}
    # A run that stops mid-epoch (max_train_steps) still ends with its previews and save.
    s = Schedule(total_steps=5, steps_per_epoch=4, sample_every_n_epochs=7, save_every_n_epochs=1, save_on_end=True)
    assert dues(s) == {4: Due(save=True), 5: Due(sample=True, save=True, stop=True)}


class FakeControls:
    def __init__(self):
        self.files = set()

    def pending(self):
        return set(self.files)

    def withdraw(self, name):
        self.files.discard(name)

    def clear_all(self):
        self.files.clear()


def test_requests_merge_files_and_signals():
    from dreambooth.train.requests import Requests

    controls = FakeControls()
    requests = Requests(controls)
    controls.files |= {"save", "sample"}
    assert requests.pending() == {"save", "sample"}
    requests.handled("save")
    assert requests.pending() == {"sample"}
    before = signal.getsignal(signal.SIGTERM)
    with requests.catching_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread: the test process lives on
        assert requests.pending() == {"sample", "cancel"}
    assert signal.getsignal(signal.SIGTERM) == before  # put back
    requests.clear()
    assert controls.files == set()
    # Not the main process: no files read, the main process's set is broadcast to it.
    controls.files.add("pause")
    other = Requests(controls, main=False, broadcast=lambda mine: mine | {"save"})
    assert other.pending() == {"save"}
    other.handled("pause")
    assert controls.files == {"pause"}  # only the main process withdraws


def test_pause_waits_until_withdrawn_or_cancelled():
    from dreambooth.train.requests import Requests

    controls = FakeControls()
    requests = Requests(controls)
    polls = []

    def later():
        polls.append(1)
        if len(polls) == 3:
            controls.files.discard("pause")
            controls.files.add("sample")
        return set(controls.files)

    controls.files |= {"pause", "save"}
    controls.pending = later
    assert requests.wait_while_paused({"pause", "save"}, poll_s=0) == {"save", "sample"} and len(polls) == 3
    controls.files = {"pause"}
    polls.clear()
    requests.interrupted = True  # Ctrl-C while paused ends the pause as a cancel
    assert "cancel" in requests.wait_while_paused({"pause"}, poll_s=0) and len(polls) == 1


def test_prior_loss_weight_falls_linearly_to_the_minimum_over_n_epochs_then_stays():
    p = Parameters(num_train_epochs=5, prior_loss_weight=1.0, prior_loss_weight_min=0.2, prior_loss_scale_epochs=2)
    s = Schedule.plan(p, steps_per_epoch=4)  # the minimum is reached at the end of epoch 2: step 8
    weights = [round(s.prior_loss_weight(step), 9) for step in range(s.total_steps)]
    assert weights[:9] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]  # fractional epochs: step / steps per epoch
    assert all(s.prior_loss_weight(step) == 0.2 for step in range(8, s.total_steps))  # exactly the minimum
    assert s.prior_loss_weight(0) == 1.0
    off = Schedule.plan(Parameters(prior_loss_weight=0.7, prior_loss_weight_min=0.1), steps_per_epoch=4)
    assert {off.prior_loss_weight(step) for step in range(off.total_steps)} == {0.7}  # 0 epochs: off
    longer = Schedule.plan(Parameters(num_train_epochs=2, prior_loss_weight=2.0, prior_loss_weight_min=0.0,
                                      prior_loss_scale_epochs=4), steps_per_epoch=3)
    assert longer.prior_loss_weight(longer.total_steps - 1) == pytest.approx(2.0 * (1 - 5 / 12))  # ends half-way down


def test_prior_loss_minimum_above_the_start_is_refused_in_the_users_words():
    from dreambooth.config import Config, ConfigError

    with pytest.raises(ConfigError) as bad:
        Config.from_dict({"parameters": {"prior_loss_weight": 0.5, "prior_loss_weight_min": 0.8,
                                         "prior_loss_scale_epochs": 3}})
    assert str(bad.value) == ("parameters.prior_loss_weight_min: 0.8 is above the Prior loss weight (0.5); with "
                              "Prior loss scaling epochs on, the weight can only fall to the minimum")
    # Scaling off: the minimum is not used, so it is not checked; equal to the start is a constant weight.
    Config.from_dict({"parameters": {"prior_loss_weight": 0.5, "prior_loss_weight_min": 0.8}})
    Config.from_dict({"parameters": {"prior_loss_weight": 0.5, "prior_loss_weight_min": 0.5,
                                     "prior_loss_scale_epochs": 3}})


def test_validation_is_due_every_n_steps_and_at_the_end():
    from dreambooth.config import Parameters
    from dreambooth.train.schedule import Schedule

    plan = Schedule.plan(Parameters(num_train_epochs=2, validation_every_n_steps=3), steps_per_epoch=4)
    assert [s for s in range(1, 9) if plan.after(s).validate] == [3, 6, 8]
    off = Schedule.plan(Parameters(num_train_epochs=2), steps_per_epoch=4)
    assert not any(off.after(s).validate for s in range(1, 9))
