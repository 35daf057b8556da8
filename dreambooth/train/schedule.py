"""When things happen in a run: how many steps, how long the text encoder trains, when previews and saves are made.

Pure arithmetic on step counts (no torch), so it is tested on its own. Steps are optimizer steps; `step` is the number
of steps done so far. The trainer asks, before each step, whether the text encoder trains in it
(`trains_text_encoder(step)`), and after it what is due (`after(step)`):

    schedule = Schedule.plan(params, steps_per_epoch=data.steps_per_epoch)
    due = schedule.after(step)   # Due(freeze_text_encoder, sample, save, stop, pause, validate)
    weight = schedule.prior_loss_weight(step)   # the class loss's weight in the step after `step`
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def plan_total_steps(params, steps_per_epoch: int, override: int | None = None) -> int:
    """Optimizer steps of the whole run: --max-steps, else max_train_steps, else epochs x steps per epoch."""
    return override or params.max_train_steps or params.num_train_epochs * steps_per_epoch


def text_encoder_steps(ratio: float, total_steps: int) -> int:
    """The steps the text encoder trains for: ratio x total steps, rounded to the nearest step (halves up), at least
    one when the ratio is above 0, at most all of them. The only reading of `train_text_encoder_ratio`."""
    if ratio <= 0 or total_steps <= 0:
        return 0
    return min(total_steps, max(1, math.floor(ratio * total_steps + 0.5)))


def trains_text_encoder(ratio: float) -> bool:
    """Whether the text encoders train at all (known before the run's length is): exactly when they get a step."""
    return text_encoder_steps(ratio, 1) > 0


@dataclass(frozen=True)
class Due:
    """What the run does once a step is done, in this order: freeze the text encoder, sample, save, stop."""
    freeze_text_encoder: bool = False
    sample: bool = False
    save: bool = False
    stop: bool = False
    pause: bool = False  # rest for `pause_seconds` (the run's pause after every n-th epoch)
    validate: bool = False  # measure the validation loss (every n-th step, and at the end when it is on)


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    text_encoder_steps: int = 0
    sample_every_n_epochs: int = 0  # 0: no previews (not even at the end)
    save_every_n_epochs: int = 0    # 0: no saves during the run
    save_on_end: bool = True
    pause_every_n_epochs: int = 0  # 0: never
    prior_loss_weight_start: float = 1.0
    prior_loss_weight_min: float = 1.0
    prior_loss_scale_epochs: int = 0  # 0: the weight stays at its start
    validation_every_n_steps: int = 0  # 0: no validation loss

    @classmethod
    def plan(cls, params, steps_per_epoch: int, max_steps: int | None = None) -> "Schedule":
        total = plan_total_steps(params, steps_per_epoch, max_steps)
        saves = params.save_every_n_epochs if params.save_during_training else 0
        return cls(total, steps_per_epoch, text_encoder_steps(params.train_text_encoder_ratio, total),
                   params.sample_every_n_epochs, saves, params.save_on_end,
                   params.pause_every_n_epochs if params.pause_seconds > 0 else 0,
                   params.prior_loss_weight, params.prior_loss_weight_min, params.prior_loss_scale_epochs,
                   params.validation_every_n_steps)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch(self, step: int) -> int:
        """The epoch (from 0) that the step after `step` belongs to; also the number of whole epochs done."""
        return step // self.steps_per_epoch

    def trains_text_encoder(self, step: int) -> bool:
        """Whether the text encoder trains in the step after `step`."""
        return step < self.text_encoder_steps

    def prior_loss_weight(self, step: int) -> float:
        """The weight of the class loss in the step after `step`: with scaling on, it goes linearly from the start
        weight at step 0 to the minimum at the end of epoch `prior_loss_scale_epochs` (counted in fractional epochs,
        step / steps per epoch), then stays at the minimum."""
        if self.prior_loss_scale_epochs <= 0:
            return self.prior_loss_weight_start
        progress = min(1.0, step / (self.prior_loss_scale_epochs * self.steps_per_epoch))
        return self.prior_loss_weight_start * (1 - progress) + self.prior_loss_weight_min * progress

    def after(self, step: int) -> Due:
        """What is due once `step` steps are done. Within the run previews and saves come at the end of every n-th
        epoch; the last step makes previews when they are on at all, and saves when save_on_end is on."""
        if step >= self.total_steps:
            return Due(freeze_text_encoder=step == self.text_encoder_steps, sample=self.sample_every_n_epochs > 0,
                       save=self.save_on_end, stop=True, validate=self.validation_every_n_steps > 0)
        epochs, into_epoch = divmod(step, self.steps_per_epoch)

        def every(n: int) -> bool:
            return n > 0 and into_epoch == 0 and epochs % n == 0

        validate = self.validation_every_n_steps > 0 and step % self.validation_every_n_steps == 0
        return Due(freeze_text_encoder=step == self.text_encoder_steps, sample=every(self.sample_every_n_epochs),
                   save=every(self.save_every_n_epochs), pause=every(self.pause_every_n_epochs), validate=validate)
