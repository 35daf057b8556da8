"""The training run, as a recipe: `setup()` builds the training state, `train()` runs the loop.

Everything the run reads comes from the model's config.json; everything it says goes to <model>/logs/events.jsonl
(see events.py); requests come from <model>/control/ and the signals (requests.py) between steps; when to preview,
save, freeze the text encoder and stop is the schedule's decision (schedule.py).
Under `accelerate launch` every process trains its share of each epoch; only the main process writes files.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, ConfigError, Problem, validate_for_training
from .. import prompt_files
from ..data import captions
from ..data import class_images as class_data
from ..data.buckets import nearest_bucket
from ..data.images import UNREADABLE_IMAGE, load_image, png_parameters, save_png
from ..data.dataset import (Example, TrainingData, class_examples_from, collect_instances, load_fixed,
                            split_validation, stable_int, tokenize)
from ..errors import UserError, WriteError
from ..events import (Cancelled, Checkpoint, ClassImages, Controls, Done, Error, Event, EventLog, Fidelity, Paused,
                      Resumed, Sample, Start, Step, Validation)
from ..lora.training import LoraRun
from ..models import load_config, read_fidelity, write_fidelity
from .. import outputs
from ..outputs import checkpoint_file, lora_file
from ..store import DataRoot, ModelDir, atomic_write_text, reclaim_leftovers
from . import fidelity
from . import pipeline as gen
from . import precision
from .components import Components, autotune_convolutions, compile_unet, default_layout, eager, load_components
from .precision import DtypePlan, Hardware
from .optim import (eval_weights, make_fused_step, make_lr_scheduler, make_optimizer, runnable_optimizer,
                    train_weights)
from .requests import Requests
from .schedule import Schedule
from .saves import keep_save, link_tree, mark_checkpoint_written, read_trainer_info, recover_folder, swap_folder
from .state import load_state, save_state, write_failed
from .step import Batch, TrainStep, encode_prompt, frozen_prompt_embedding

log = logging.getLogger("dreambooth")


@dataclass
class TrainResult:
    ok: bool
    status: str  # "done", "cancelled" or "error"
    step: int
    total_steps: int
    message: str
    checkpoints: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    best_step: int | None = None  # the best save by its fidelity scores (None: not scored, or none qualifies)

    def summary(self) -> str:
        lines = [f"{self.status}: {self.message} (step {self.step}/{self.total_steps})"]
        if self.checkpoints:
            lines.append(f"checkpoint: {self.checkpoints[-1]}")
        if self.best_step is not None:
            lines.append(f"best save by fidelity: step {self.best_step} (`python -m dreambooth scores NAME` lists them)")
        if self.samples:
            lines.append(f"previews: {Path(self.samples[-1]).parent}")
        return "\n".join(lines)


def checkpoint_stem(params, model_name: str) -> str:
    """The checkpoint files' name before _<step>: the custom name, else the model's."""
    return params.checkpoint_name.strip() or model_name


class StopTraining(Exception):
    """Ends the run early with a status ("done", "cancelled" or "error") and a message."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def train_model(root: DataRoot, name: str, max_steps: int | None = None, overrides: dict | None = None) -> TrainResult:
    """Train model `name`; `overrides` change parameters for this run only (the config file stays as it is)."""
    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found in {root.dreambooth} (create it first)")
    config = load_config(model)
    if overrides:
        config = config.with_parameters(**overrides)
    validate_for_training(config)
    optimizer = runnable_optimizer(config.parameters)
    if optimizer != config.parameters.optimizer:
        config = config.with_parameters(optimizer=optimizer)
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps: must be at least 1, got {max_steps}")
    return Trainer(root, model, config, max_steps).run()


def make_ema(params, unet):
    """An exponential moving average of the UNet weights (None when EMA is off): diffusers' EMAModel (its decay
    schedule, state and saving), its update taken in place by one multi-tensor kernel, shadow += (1 - decay) x
    (weight - shadow), where diffusers' own runs three kernels and allocates two temporaries per tensor (its foreach
    variant allocates a copy of the whole UNet)."""
    if not params.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    class EMA(EMAModel):
        @torch.no_grad()
        def step(self, parameters):
            parameters = list(parameters)
            self.optimization_step += 1
            decay = self.get_decay(self.optimization_step)
            self.cur_decay_value = decay
            shadows, weights = [], []
            for s, q in zip(self.shadow_params, parameters):
                if q.requires_grad:
                    shadows.append(s)
                    weights.append(q)
                else:
                    s.copy_(q)
            if shadows:
                torch._foreach_lerp_(shadows, weights, 1 - decay)

    return EMA(unet.parameters(), decay=params.ema_decay)


def make_accelerator(params, dtypes: DtypePlan, hardware: Hardware):
    """accelerate's Accelerator for the run: its processes, the mixed precision the plan chose, accumulation."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        # Launched as several processes on a machine without CUDA: data-parallel on CPUs (gloo).
        cpu=not hardware.gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=dtypes.mixed_precision,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        # SDXL's first encoder contributes its penultimate layer only: its last layer gets no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def build_step(params, parts: Components, accelerator, total_steps: int, train_text_encoder: bool,
               dtypes: DtypePlan, optimizer_factory=make_optimizer) -> TrainStep:
    """The optimizer, the LR schedule, the models under accelerate and the TrainStep that runs them.

    How the trainer sets up its step; the benchmark (bench/train_bench.py) and the memory plan (train/memory.py, with
    its stand-ins for accelerate and bitsandbytes) call it too, so they time and trace the same thing. The returned
    step holds the prepared models (`.unet`, `.text_encoders`), `.optimizer` and `.lr_scheduler`.
    """
    acc = accelerator
    encoders = list(parts.text_encoders)
    if params.compile_unet:
        compile_unet(parts.unet)
    autotune_convolutions(params.autotune_convolutions, acc.device)
    optimizer = optimizer_factory(params, parts.unet, encoders if train_text_encoder else ())
    lr_scheduler = make_lr_scheduler(params, optimizer, total_steps)
    unet, optimizer = acc.prepare(parts.unet, optimizer)
    if train_text_encoder:
        encoders = [acc.prepare(te) for te in encoders]
    trainable = [q for q in unet.parameters() if q.requires_grad]
    if train_text_encoder:
        trainable += [q for te in encoders for q in te.parameters() if q.requires_grad]
    return TrainStep(unet, encoders, parts.noise_scheduler, params, sdxl=parts.sdxl, vae=parts.vae,
                     optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=acc, trainable_params=trainable,
                     fused=make_fused_step(params, optimizer, trainable, acc),
                     pure_bf16=any(q.dtype == torch.bfloat16 for q in trainable), autocast_dtype=dtypes.autocast)


def resume_words(last_save_step: int | None) -> str:
    return f"the last save (step {last_save_step})" if last_save_step is not None else "the start"


@contextlib.contextmanager
def writing(what: Path, last_save_step: int | None = None):
    """A write that fails (disk full, no permission, ...) ends the run, named; atomic writes keep the old file."""
    try:
        yield
    except Exception as e:
        if not write_failed(e):
            raise
        log.debug("writing %s failed", what, exc_info=True)
        problem = WriteError.of(what, e, "the previous file is intact")
        raise StopTraining("error", f"{problem}. Train again to go on from {resume_words(last_save_step)}") from e


def read_item(data: TrainingData, item, epoch: int, last_save_step: int | None = None):
    """An image of a batch, read now: one deleted or broken since the run started stops the run, named."""
    try:
        return data.load_item(item, epoch)
    except UNREADABLE_IMAGE as e:
        log.debug("reading %s failed", item.example.path, exc_info=True)
        kind = "class image" if item.is_prior else "instance image"
        happened = "was deleted" if isinstance(e, FileNotFoundError) else f"was changed and cannot be read ({e})"
        raise StopTraining("error", f"{kind} {item.example.path} {happened} during the run; put it back (or remove "
                                    f"it from its folder) and train again to go on from "
                                    f"{resume_words(last_save_step)}") from e


def micro_batches(data: TrainingData, step: int):
    """(epoch, items) of every micro-batch from optimizer step `step` on, epoch after epoch, without end."""
    epoch, into_epoch = divmod(step, data.steps_per_epoch)
    first = into_epoch * data.params.gradient_accumulation_steps
    while True:
        for items in data.epoch_batches(epoch)[first:]:
            yield epoch, items
        epoch, first = epoch + 1, 0


@dataclass
class TrainingState:
    """Everything a run trains with and keeps track of; built by Trainer.setup()."""
    parts: Components          # as loaded: VAE, tokenizers, noise scheduler, family (sdxl)
    unet: torch.nn.Module      # the trained models, prepared by accelerate (DDP-wrapped under several processes)
    text_encoders: list
    optimizer: object
    lr_scheduler: object
    ema: object | None
    train_step: TrainStep
    instances: list[list[Example]]  # per active concept
    data: TrainingData
    schedule: Schedule
    step: int = 0              # optimizer steps done
    last_save_step: int | None = None
    latent_cache: dict = field(default_factory=dict)
    embedding_cache: dict = field(default_factory=dict)  # prompt -> frozen text encoders' output
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    lora: LoraRun | None = None  # LoRA: the adapters the run trains (the model itself stays frozen)
    sample_files: dict = field(default_factory=dict)  # concept index -> its sample prompt file's prompts
    validation: list = field(default_factory=list)  # [(latent, time_ids, prompt, noise, timesteps)]: fixed
    scores: list = field(default_factory=list)  # [(step, fidelity.Scores)] of the scored saves, oldest first
    sampled: list = field(default_factory=list)  # [(step, fidelity.Scores)] scored on Sample now (no save behind them)
    best_step: int | None = None  # the best of them (fidelity.best_save)
    scorers: object = None  # fidelity.Scorers once loaded; False when they cannot be


class Trainer:
    def __init__(self, root: DataRoot, model: ModelDir, config: Config, max_steps: int | None = None):
        self.root, self.model, self.config, self.p = root, model, config, config.parameters
        self.max_steps_override = max_steps
        self.hardware = precision.detect(precision.training_device())
        # Every dtype of the run, decided once (the model's parts, the step's autocast, generation).
        self.dtypes = DtypePlan.decide(self.p, self.hardware, sdxl=config.model.family == "sdxl")
        self.accelerator = make_accelerator(self.p, self.dtypes, self.hardware)
        self.main = self.accelerator.is_main_process
        self.events = EventLog(model.events)
        self.requests = Requests(Controls(model.control), self.main, self.broadcast)

    def emit(self, event: Event) -> None:
        if self.main:
            self.events.emit(event)

    def broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        acc = self.accelerator
        self.requests.clear()
        if self.main:
            self.events.clear()
        acc.wait_for_everyone()
        try:
            with self.requests.catching_signals():
                try:
                    state = self.setup()
                except StopTraining as stop:  # cancelled while class images were made
                    self.emit(Cancelled(0, stop.message) if stop.status == "cancelled" else Error(stop.message, 0))
                    return TrainResult(False, stop.status, 0, 0, stop.message)
                return self.train(state)
        except Exception as e:  # bad input found late, or a crash: the watcher learns why, then it propagates
            self.emit(Error(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
            raise
        finally:
            if acc.num_processes == 1:
                # accelerate's settings are process-wide: let a later run in this process choose its own.
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()

    def setup(self) -> TrainingState:
        """Images, models (from the last save when resuming), class images, data order, schedule, optimizer, EMA."""
        acc, p = self.accelerator, self.p
        if self.main:
            reclaimed = reclaim_leftovers(self.root, self.model)
            if reclaimed:
                log.info(reclaimed.sentence())
            recover_folder(self.model.state)  # a save killed mid-swap
        acc.wait_for_everyone()
        # bad images are reported before the models load
        instances, validation = split_validation(self.config, collect_instances(self.config))
        sample_files = read_sample_prompt_files(self.config)  # read once, before the models load
        # A saved run's weights come from state/ (consistent with its optimizer), a new run's from working/.
        saved = read_trainer_info(self.model.state)
        resume_from = self.model.state if saved is not None else None
        parts = load_components(self.model.working, self.config.model.family, acc.device, p, self.dtypes, resume_from)
        classes = self.prepare_class_images(parts, instances)
        data = TrainingData(instances, classes, p, acc.num_processes, acc.process_index)
        schedule = Schedule.plan(p, data.steps_per_epoch, self.max_steps_override)
        # LoRA: adapters on the frozen model (kept in the training precision); the optimizer then sees only them.
        lora = LoraRun.start(parts.unet, parts.text_encoders, p, self.config.model.family,
                             schedule.text_encoder_steps > 0, resume_from, self.dtypes.weights)
        train_step = build_step(p, parts, acc, schedule.total_steps, schedule.text_encoder_steps > 0, self.dtypes)
        ema = make_ema(p, acc.unwrap_model(train_step.unet))
        state = TrainingState(parts, train_step.unet, list(train_step.text_encoders), train_step.optimizer,
                              train_step.lr_scheduler, ema, train_step, instances, data, schedule, lora=lora,
                              sample_files=sample_files, validation=self.validation_set(parts, data, validation))

        resumed = load_state(self.model.state, acc, state.optimizer, state.lr_scheduler, ema)
        train_weights(state.optimizer)  # schedule-free: saved with its averaged weights, trains the others
        if resumed is not None and p.fidelity_scores:  # the scores of the saves up to the one this run goes on from
            recorded = read_fidelity(self.model)["saves"]
            state.scores = fidelity.history(recorded, until=resumed)
            state.sampled = fidelity.history(recorded, until=resumed, saved=False)
            state.best_step = fidelity.best_save(state.scores, p.fidelity_prompt_margin, p.fidelity_copy_limit)
        if resumed is None:
            torch.manual_seed(p.seed + acc.process_index)
        else:
            state.step = state.last_save_step = resumed
            if acc.process_index:
                torch.manual_seed(p.seed + 1000003 * acc.process_index + resumed)
            if schedule.text_encoder_steps and not schedule.trains_text_encoder(resumed):
                self.freeze_text_encoders(state)
            if not saved["checkpoint_written"]:  # the last save was killed before its checkpoint file was complete
                with eval_weights(state.optimizer):
                    self.publish(state)
        return state

    def train(self, s: TrainingState) -> TrainResult:
        """The loop: one optimizer step per pass, then what the schedule and the requests ask for."""
        acc, schedule = self.accelerator, s.schedule
        self.emit(Start(schedule.total_steps, schedule.epochs, schedule.steps_per_epoch, s.step))
        progress = Progress(self, s.step, schedule.total_steps)
        status, message = "done", f"trained {schedule.total_steps} steps"
        try:
            if self.requests.interrupted:  # Ctrl-C while the models loaded or class images were made
                raise StopTraining("cancelled", "cancelled before training started")
            if s.step >= schedule.total_steps:
                raise StopTraining("done", "already trained to the last step; nothing to do")
            for epoch, items in micro_batches(s.data, s.step):
                lrs = {g.get("name", f"group_{i}"): g["lr"]  # the rates this step applies (not the next)
                       for i, g in enumerate(s.optimizer.param_groups)}
                out = s.train_step(self.make_batch(s, items, epoch),
                                   train_text_encoder=schedule.trains_text_encoder(s.step),
                                   prior_loss_weight=schedule.prior_loss_weight(s.step))
                if not acc.sync_gradients:  # accumulating: no optimizer step yet
                    continue
                s.step += 1
                due = schedule.after(s.step)
                if due.freeze_text_encoder:
                    self.freeze_text_encoders(s)
                loss = acc.reduce(out.loss.detach().float(), reduction="mean").item()
                if not math.isfinite(loss):
                    last = f"the last good save is step {s.last_save_step}" if s.last_save_step is not None \
                        else "nothing was saved"
                    raise StopTraining("error", f"loss became {loss} at step {s.step}; stopped, {last}")
                if s.ema is not None:
                    s.ema.step(acc.unwrap_model(s.unet).parameters())
                progress.update(s.step, epoch, loss, lrs)
                self.handle_requests(s)
                if due.validate:
                    progress.validation(s.step, self.validate(s))
                if due.sample:
                    self.make_samples(s)
                if due.save:
                    self.save(s)
                    self.stop_without_progress(s)
                if due.stop:
                    break
                if due.pause:
                    self.rest(s, self.p.pause_seconds)
        except StopTraining as stop:
            status, message = stop.status, stop.message
        finally:
            progress.close()
        acc.wait_for_everyone()
        ending = {"done": Done, "cancelled": Cancelled}
        self.emit(ending[status](s.step, message) if status in ending else Error(message, s.step))
        # What accelerate's end_training does for us (it needs trackers on accelerate 0.21, the webui's version).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return TrainResult(status == "done", status, s.step, schedule.total_steps, message, s.checkpoints, s.samples,
                           s.best_step)

    # -- pieces of the loop -------------------------------------------------------------------------------------
    def make_batch(self, s: TrainingState, items, epoch: int) -> Batch:
        c, p, device = s.parts, self.p, self.accelerator.device
        latents, time_ids, masks = [], [], []
        for item in items:
            key = (item.example.path, item.bucket)
            if p.cache_latents and key in s.latent_cache:
                latent, ids, mask = s.latent_cache[key]
            else:
                pixels, ids, mask = read_item(s.data, item, epoch, s.last_save_step)
                with torch.no_grad():
                    pixels = pixels.unsqueeze(0).to(device, c.vae.dtype)
                    noise = torch.Generator(pixels.device).manual_seed(s.data.item_seed(item, epoch) % 2**63)
                    latent = c.vae.encode(pixels).latent_dist.sample(noise)[0] * c.vae.config.scaling_factor
                if mask is not None:  # at latent resolution: the share of each latent pixel's area to learn
                    mask = torch.nn.functional.interpolate(mask.unsqueeze(0), size=latent.shape[-2:], mode="area")[0]
                if p.cache_latents:
                    s.latent_cache[key] = (latent, ids, mask)
            latents.append(latent)
            time_ids.append(ids)
            masks.append(mask)
        prompts = [s.data.prompt(item, epoch) for item in items]
        batch = Batch(
            latents=torch.stack(latents).float().to(device),
            add_time_ids=torch.stack(time_ids).to(device) if c.sdxl else None,
            is_prior=torch.tensor([item.is_prior for item in items]),  # on the CPU: the step counts it there
        )
        if any(m is not None for m in masks):  # images without a mask (and class images) are learnt whole
            whole = torch.ones(1, *latents[0].shape[-2:])
            batch.loss_mask = torch.stack([whole if m is None else m.cpu() for m in masks]).to(device)
        if s.schedule.trains_text_encoder(s.step):
            batch.input_ids = tuple(i.to(device) for i in tokenize(c.tokenizers, prompts))
        else:
            batch.prompt_embeds, batch.pooled_embeds = self.frozen_text_embeddings(s, prompts)
        return batch

    def frozen_text_embeddings(self, s: TrainingState, prompts: list[str]):
        """Text conditioning from the frozen text encoders, computed once per prompt: they cannot change any more,
        so each step skips their forward pass. One prompt at a time, so a value never depends on its batch."""
        c, device = s.parts, self.accelerator.device
        encoders = [self.accelerator.unwrap_model(te) for te in s.text_encoders]
        # Prompts that change every step (caption options) would fill the cache with ones never seen again.
        cache = s.embedding_cache if not captions.varies(self.p) else {}
        for prompt in dict.fromkeys(prompts):
            if prompt not in cache:
                ids = [i.to(device) for i in tokenize(c.tokenizers, [prompt])]
                cache[prompt] = frozen_prompt_embedding(encoders, ids, c.sdxl)
        hidden = torch.stack([cache[q][0] for q in prompts])
        pooled = torch.stack([cache[q][1] for q in prompts]) if c.sdxl else None
        return hidden, pooled

    def freeze_text_encoders(self, s: TrainingState) -> None:
        for te in s.text_encoders:
            te.requires_grad_(False)
        log.info("text encoder frozen after %d steps", s.schedule.text_encoder_steps)

    def handle_requests(self, s: TrainingState) -> None:
        """Pause (wait), sample, save, cancel: each request is carried out, then withdrawn."""
        pending = self.requests.pending()
        if "pause" in pending and "cancel" not in pending:
            self.emit(Paused(s.step))
            pending = self.requests.wait_while_paused(pending)
            self.emit(Resumed(s.step))
        if "sample" in pending:
            self.requests.handled("sample")
            self.make_samples(s)
            if self.main and self.p.fidelity_scores:  # the working weights judged now, as a save would be (not a best-save candidate)
                with eval_weights(s.optimizer):
                    self.score_fidelity(s, saved=False)
        if "save" in pending:
            self.requests.handled("save")
            self.save(s)
        if "cancel" in pending:
            self.requests.handled("cancel")
            if self.p.save_on_cancel and s.last_save_step != s.step:
                self.save(s)
            raise StopTraining("cancelled", f"cancelled at step {s.step}")

    # -- class images, samples, saving --------------------------------------------------------------------------
    def prepare_class_images(self, parts: Components, instances) -> dict:
        """Class examples per concept index; missing images are generated now with the frozen base model."""
        active = [(i, c) for i, c in enumerate(self.config.concepts) if c.instance_data_dir.strip()]
        plans = []  # (concept index, concept, folder or None, images to use, prompts to generate, all wanted)
        for (index, concept), examples in zip(active, instances):
            if concept.num_class_images_per_image == 0:
                continue
            if concept.class_data_dir.strip():
                pairs = class_data.user_class_images(concept)
                if not pairs:
                    raise UserError(f"concepts[{index}].class_data_dir: no readable images in {concept.class_data_dir!r}")
                plans.append((index, concept, None, pairs, [], []))
                continue
            folder = class_data.class_folder(self.model.class_images, concept)
            wanted = class_data.wanted_prompts(concept, examples)
            reuse, missing = class_data.plan_class_images(folder, wanted)
            plans.append((index, concept, folder, reuse, missing, wanted))
        total_missing = sum(len(plan[4]) for plan in plans)
        if total_missing and self.main:
            self.generate_class_images(parts, plans, total_missing)
        self.accelerator.wait_for_everyone()
        classes = {}
        for index, concept, folder, pairs, missing, wanted in plans:
            if folder is not None and missing:  # generated just now (by the main process): read the folder again
                pairs, _ = class_data.plan_class_images(folder, wanted)
            classes[index] = class_examples_from(pairs, index)
        return classes

    def generate_class_images(self, parts: Components, plans, total_missing: int) -> None:
        c, res = parts, self.p.resolution
        pipe = gen.make_pipeline(c.unet, c.vae, c.text_encoders, c.tokenizers, c.noise_scheduler.config, c.sdxl,
                                 self.dtypes.autocast)
        from tqdm.auto import tqdm

        done = 0
        made = [0]  # images made so far, all concepts
        started = time.time()
        self.emit(ClassImages(0, total_missing))
        bar = tqdm(total=total_missing, desc="class images", unit="image", dynamic_ncols=True)  # as the tab says it

        def cancelled() -> bool:
            # Only the main process generates: the others wait, so only a single process can stop here.
            return self.accelerator.num_processes == 1 and "cancel" in self.requests.local()

        def stop(count: int):
            self.requests.handled("cancel")  # the images made so far are kept and reused next time
            return StopTraining("cancelled", f"cancelled while generating class images ({count} made)")

        try:  # the bar ends its line however generation ends (a cancel, an error)
            for index, concept, folder, pairs, missing, wanted in plans:
                if not missing:
                    continue
                settings = (concept.class_negative_prompt, concept.class_infer_steps, concept.class_guidance_scale)

                def make(prompts, numbers, settings=settings):
                    negative, steps, guidance = settings
                    try:  # asked between denoising steps, so a cancel or SIGTERM stops within one step
                        return gen.generate_batch(pipe, prompts, negative, steps, guidance, numbers, res, res,
                                                  stop=cancelled)
                    except gen.Stopped:
                        raise stop(made[0]) from None

                def parameters(prompt, number, settings=settings):
                    return png_parameters(prompt, *settings, number, res, res)

                def progress(n, _total, offset=done):
                    bar.update(offset + n - made[0])
                    made[0] = offset + n
                    eta = (time.time() - started) / made[0] * (total_missing - made[0])
                    self.emit(ClassImages(made[0], total_missing, round(eta, 1)))
                    if cancelled():
                        raise stop(made[0])

                with writing(folder):
                    class_data.generate_missing(folder, missing, make, parameters, progress, self.p.class_batch_size)
                done += len(missing)
        finally:
            bar.close()

    def sample_prompts(self, s: TrainingState, every_concept: bool = False):
        """(concept position, concept, prompts) for each active concept with previews (`every_concept`: each active
        concept): the prompts of its sample prompt file, else its sample prompt, else the first instance image's
        prompt. [filewords] in a file's or the sample prompt becomes the first instance image's caption."""
        active = [(i, c) for i, c in enumerate(self.config.concepts) if c.instance_data_dir.strip()]
        for pos, ((index, concept), examples) in enumerate(zip(active, s.instances)):
            if concept.num_samples == 0 and not every_concept:
                continue
            caption = captions.caption_of(examples[0].path)
            templates = s.sample_files.get(index) or ([concept.sample_prompt] if concept.sample_prompt.strip() else [])
            prompts = [captions.instance_prompt(t, caption, concept.instance_token, concept.class_token)
                       for t in templates]
            yield pos, concept, prompts or [examples[0].prompt]

    VALIDATION_TIMESTEPS = 4  # each image at T/8, 3T/8, 5T/8 and 7T/8: the curve covers noisy and nearly clean

    def validation_set(self, parts: Components, data: TrainingData, examples: list) -> list:
        """Each validation image as it is measured every time: its latent (the VAE's mean, centre crop, no flip),
        time ids, prompt, and noise and timesteps drawn once from the run's seed."""
        out, device = [], self.accelerator.device
        if not examples or not self.main:
            return out
        total = parts.noise_scheduler.config.num_train_timesteps
        k = self.VALIDATION_TIMESTEPS
        timesteps = torch.tensor([total * (2 * i + 1) // (2 * k) for i in range(k)], device=device)
        for example in examples:
            pixels, time_ids = load_fixed(example, nearest_bucket(example.size, data.buckets))
            with torch.no_grad():
                latent = parts.vae.encode(pixels.unsqueeze(0).to(device, parts.vae.dtype)).latent_dist.mean
                latent = (latent * parts.vae.config.scaling_factor).float()
            generator = torch.Generator().manual_seed(stable_int(self.p.seed, "validation", str(example.path)) % 2**63)
            noise = torch.randn((k, *latent.shape[1:]), generator=generator).to(device)
            out.append((latent, time_ids, example.prompt, noise, timesteps))
        return out

    def validate(self, s: TrainingState) -> float | None:
        """The mean loss over the validation set (the run's loss function, its models in eval mode, no dropout)."""
        loss = None
        if self.main and s.validation:
            acc, c = self.accelerator, s.parts
            unet = acc.unwrap_model(s.unet)
            encoders = [acc.unwrap_model(te) for te in s.text_encoders]
            modes = [(m, m.training) for m in (unet, *encoders)]
            total = 0.0
            try:
                for m, _ in modes:
                    m.eval()
                with torch.no_grad(), eval_weights(s.optimizer), eager(unet), s.train_step.autocast():
                    for latent, time_ids, prompt, noise, timesteps in s.validation:
                        k = len(timesteps)
                        ids = [i.to(acc.device) for i in tokenize(c.tokenizers, [prompt])]
                        hidden, pooled = encode_prompt(encoders, ids, c.sdxl)
                        batch = Batch(latents=latent.expand(k, -1, -1, -1), prompt_embeds=hidden.expand(k, -1, -1),
                                      pooled_embeds=None if pooled is None else pooled.expand(k, -1),
                                      add_time_ids=time_ids.to(acc.device).expand(k, -1) if c.sdxl else None)
                        out = s.train_step.compute_loss(batch, noise=noise, timesteps=timesteps,
                                                        perturbation=torch.zeros_like(noise))
                        total += float(out.loss)
            finally:
                for m, was in modes:
                    m.train(was)
            loss = total / len(s.validation)
        self.accelerator.wait_for_everyone()
        return loss

    def make_samples(self, s: TrainingState) -> None:
        if self.main:
            acc, c, step = self.accelerator, s.parts, s.step
            unet = acc.unwrap_model(s.unet)
            tes = [acc.unwrap_model(te) for te in s.text_encoders]
            pipe = gen.make_pipeline(unet, c.vae, tes, c.tokenizers, c.noise_scheduler.config, c.sdxl,
                                     self.dtypes.autocast)
            res = self.p.resolution
            paths = []
            with torch.no_grad(), (s.lora.previews() if s.lora else contextlib.nullcontext()), eager(unet), \
                    eval_weights(s.optimizer):
                for pos, concept, prompts in self.sample_prompts(s):
                    # Each prompt gets the same seeds, so its images compare with the other prompts' side by side.
                    for k, (prompt, i) in enumerate(itertools.product(prompts, range(concept.num_samples))):
                        seed = concept.sample_seed + i if concept.sample_seed >= 0 else random.randrange(2**31)
                        image = gen.generate(pipe, prompt, concept.sample_negative_prompt, concept.sample_infer_steps,
                                             concept.sample_guidance_scale, seed, res, res)
                        path = self.model.samples / f"{step}-{pos}-{k}.png"
                        info = png_parameters(prompt, concept.sample_negative_prompt, concept.sample_infer_steps,
                                                  concept.sample_guidance_scale, seed, res, res,
                                                  {"Model": self.model.name, "Training step": step})
                        with writing(path, s.last_save_step):
                            save_png(image, path, info)
                        paths.append(path)
            if paths:
                s.samples.extend(paths)
                self.emit(Sample(step, tuple(str(x) for x in paths)))
        self.accelerator.wait_for_everyone()

    def save(self, s: TrainingState) -> None:
        """Resume state (with the trained weights) into state/, then `publish` it: working/ and a checkpoint file.

        state/ is the commit point: it is replaced in one rename and holds weights, optimizer, scheduler, EMA, step
        and RNG together, so a kill at any moment resumes from a consistent save (and writes a checkpoint file the
        kill cut short). Main process only writes.
        """
        if self.main:
            trained = self.trained_modules(s)

            def write_weights(tmp: Path) -> None:
                if s.lora is not None:  # the adapters only: the model's own weights never change
                    s.lora.write_state(tmp)
                    return
                for name, module in trained.items():
                    with default_layout(module):
                        module.save_pretrained(tmp / name, safe_serialization=True)

            with eval_weights(s.optimizer):  # schedule-free: its averaged weights are the ones saved
                with writing(self.model.state, s.last_save_step):
                    save_state(self.model.state, s.step, s.schedule.total_steps, s.optimizer, s.lr_scheduler, s.ema,
                               write_weights, device=self.accelerator.device)
                s.last_save_step = s.step
                if self.p.fidelity_scores:  # before publishing: the scores go into the save's summary
                    self.score_fidelity(s)
                self.publish(s)
            keep_save(self.model.state, self.model.saves, self.p.keep_saves)
        s.last_save_step = s.step
        self.accelerator.wait_for_everyone()

    def score_fidelity(self, s: TrainingState, saved: bool = True) -> None:
        """Render each concept's evaluation set with fixed seeds and score it against the concept's photos
        (train/fidelity.py); the best save so far goes into the event and NAME/fidelity.json. Scores taken on Sample
        now (`saved` False) are recorded and shown, but never the best save: there is no file to use. Scoring models
        that cannot be loaded are said once, and the run goes on without scores."""
        p = self.p
        if s.scorers is None:
            try:
                s.scorers = fidelity.Scorers.load(p.fidelity_clip_model, p.fidelity_dino_model, self.accelerator.device)
            except UserError as e:
                warnings.warn(str(e), stacklevel=2)
                s.scorers = False
        if not s.scorers:
            return
        acc, c, res = self.accelerator, s.parts, p.resolution
        unet = acc.unwrap_model(s.unet)
        pipe = gen.make_pipeline(unet, c.vae, [acc.unwrap_model(te) for te in s.text_encoders], c.tokenizers,
                                 c.noise_scheduler.config, c.sdxl, self.dtypes.autocast)
        per_concept = []
        with torch.no_grad(), (s.lora.previews() if s.lora else contextlib.nullcontext()), eager(unet):
            for pos, concept, prompts in self.sample_prompts(s, every_concept=True):
                images, texts = [], []
                for prompt in fidelity.evaluation_prompts(prompts, concept.instance_token, concept.class_token):
                    n = p.fidelity_images_per_prompt  # one batch per prompt, each image from its own fixed seed
                    images += gen.generate_batch(pipe, [prompt] * n, concept.sample_negative_prompt,
                                                 p.fidelity_infer_steps, concept.sample_guidance_scale,
                                                 [p.seed + i for i in range(n)], res, res)
                    texts += [captions.remove_instance_token(prompt, concept.instance_token)] * n
                real = s.scorers.real(pos, lambda pos=pos: [load_image(e.path) for e in s.instances[pos]])
                per_concept.append(s.scorers.score(images, texts, real))
        scores = fidelity.mean_scores(per_concept)
        if saved:
            s.scores.append((s.step, scores))
            s.best_step = fidelity.best_save(s.scores, p.fidelity_prompt_margin, p.fidelity_copy_limit)
        else:
            s.sampled.append((s.step, scores))
        recorded = [{"step": step, **sc.to_dict()} for step, sc in s.scores]
        recorded += [{"step": step, **sc.to_dict(), "saved": False} for step, sc in s.sampled]
        with writing(self.model.fidelity_scores, s.last_save_step):
            write_fidelity(self.model, sorted(recorded, key=lambda r: (r["step"], "saved" in r)), s.best_step)
        self.emit(Fidelity(s.step, **scores.to_dict(), best_step=s.best_step, saved=saved))

    def stop_without_progress(self, s: TrainingState) -> None:
        """With fidelity_patience, stop once that many scored saves in a row brought no better best save (the main
        process scores; every process stops with it)."""
        patience = self.p.fidelity_patience if self.p.fidelity_scores else 0
        if not patience:
            return
        since = [step for step, _ in s.scores if s.best_step is None or step > s.best_step]
        stop = self.broadcast(bool(s.scores) and len(since) >= patience)
        if stop:
            best = f"the best save is step {s.best_step}" if s.best_step is not None else "no save qualified"
            raise StopTraining("done", f"stopped early: {len(since)} scored saves without a better one ({best})")

    @staticmethod
    def fidelity_summary(s: TrainingState) -> dict:
        """The scores of the save being published, for its summary and its checkpoint's metadata."""
        if not s.scores or s.scores[-1][0] != s.step:
            return {}
        return {"fidelity": {**s.scores[-1][1].to_dict(), "best_step": s.best_step}}

    def trained_modules(self, s: TrainingState) -> dict:
        acc = self.accelerator
        trained = {"unet": acc.unwrap_model(s.unet)}
        if s.schedule.text_encoder_steps > 0:
            for name, te in zip(("text_encoder", "text_encoder_2"), s.text_encoders):
                trained[name] = acc.unwrap_model(te)
        return trained

    def rest(self, s: TrainingState, seconds: float) -> None:
        """The configured pause after every n-th epoch: shown as paused; a cancel (or SIGTERM) ends it at once."""
        self.emit(Paused(s.step))
        deadline = time.time() + seconds
        while time.time() < deadline and "cancel" not in self.requests.pending():
            time.sleep(min(0.2, max(0.0, deadline - time.time())))
        self.emit(Resumed(s.step))
        self.handle_requests(s)

    def publish(self, s: TrainingState) -> None:
        """The saved step's weights into working/ (hard links to state/: no extra disk), for `export` and the UI,
        its summary, and the checkpoint file in models/Stable-diffusion; state/ then records that it is written."""
        if s.lora is not None:
            return self.publish_lora(s)
        p, step, working = self.p, s.step, self.model.working
        trained = self.trained_modules(s)
        for name in trained:
            with writing(working / name, s.last_save_step):
                swap_folder(working / name, lambda tmp, name=name: link_tree(self.model.state / name, tmp))
        state_dicts = {name: module.state_dict() for name, module in trained.items()}
        if s.ema is not None:
            ema_unet = self._ema_unet(s, trained["unet"])
            with writing(self.model.ema_unet, s.last_save_step):
                swap_folder(self.model.ema_unet, lambda tmp: ema_unet.save_pretrained(tmp, safe_serialization=True))
            if p.save_ema_weights:
                state_dicts["unet"] = ema_unet.state_dict()
        summary = {"step": step, "epoch": s.schedule.epoch(step), "total_steps": s.schedule.total_steps,
                   "learning_rate": p.learning_rate, "text_encoder_learning_rate": p.text_encoder_learning_rate,
                   "text_encoder_steps": s.schedule.text_encoder_steps, "ema": p.use_ema,
                   "instance_images": len(s.data.instances),
                   "prompts": sorted({e.prompt for e in s.data.instances})[:8], **self.fidelity_summary(s)}
        with writing(self.model.training_summary, s.last_save_step):
            atomic_write_text(self.model.training_summary, json.dumps(summary, indent=2) + "\n")
        from ..checkpoint.export import write_single_file

        wanted = checkpoint_file(self.root.checkpoints, checkpoint_stem(p, self.model.name), step, p.checkpoint_format)
        out = outputs.automatic(self.model, wanted, own_allowed=True)
        with writing(out, s.last_save_step):
            path = write_single_file(working, out, fmt=p.checkpoint_format, half=p.save_half,
                                     state_dicts=state_dicts, metadata={"dreambooth.training": json.dumps(summary)},
                                     training=summary)
            outputs.record(self.model, path)
            mark_checkpoint_written(self.model.state)
        s.checkpoints.append(Path(path))
        self.emit(Checkpoint(step, str(path)))

    def publish_lora(self, s: TrainingState) -> None:
        """LoRA: the saved step's adapters as models/Lora/NAME_<step>.safetensors (and the merged checkpoint when
        asked); working/ stays the base model."""
        step = s.step
        summary = {"step": step, "epoch": s.schedule.epoch(step), "total_steps": s.schedule.total_steps,
                   **s.lora.summary(), "text_encoder_steps": s.schedule.text_encoder_steps,
                   "instance_images": len(s.data.instances),
                   "prompts": sorted({e.prompt for e in s.data.instances})[:8], **self.fidelity_summary(s)}
        stem = checkpoint_stem(self.p, self.model.name)
        lora_out = outputs.automatic(self.model, lora_file(self.root.lora, stem, step), with_yaml=False,
                                     own_allowed=True)
        merged_out = outputs.automatic(
            self.model, checkpoint_file(self.root.checkpoints, stem, step, self.p.checkpoint_format),
            own_allowed=True) if self.p.lora_export_merged else None
        with writing(self.root.lora, s.last_save_step):
            paths = s.lora.export(lora_out, merged_out, self.model.working, summary)
            for path in paths:
                outputs.record(self.model, path)
            mark_checkpoint_written(self.model.state)
        for path in paths:
            s.checkpoints.append(Path(path))
            self.emit(Checkpoint(step, str(path)))

    @staticmethod
    def _ema_unet(s: TrainingState, unet):
        import copy

        ema_unet = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)  # a copy to write, not to train
        s.ema.copy_to(ema_unet.parameters())
        return ema_unet


def read_sample_prompt_files(config: Config) -> dict:
    """Concept index -> the prompts of its sample prompt file, for each active concept that has one (read once,
    bounded; a file that cannot be used is named like the config check names it)."""
    files = {}
    for index, concept in enumerate(config.concepts):
        if concept.instance_data_dir.strip() and concept.sample_prompt_file.strip():
            try:
                files[index] = prompt_files.read_prompt_file(concept.sample_prompt_file)
            except prompt_files.PromptFileError as e:
                raise ConfigError(Problem(("concepts", index, "sample_prompt_file"), str(e))) from None
    return files


class Progress:
    """How the run shows its progress: step events, the progress bar and TensorBoard (the last two: main process)."""

    def __init__(self, trainer: Trainer, step: int, total: int):
        self.trainer, self.total = trainer, total
        self.started, self.start_step = time.time(), step
        self.bar = self.writer = None
        if trainer.main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            self.writer = SummaryWriter(log_dir=str(trainer.model.tensorboard))
            self.bar = tqdm(total=total, initial=step, desc=f"training {trainer.model.name}", unit="step",
                            dynamic_ncols=True)

    def validation(self, step: int, loss: float | None) -> None:
        if loss is None or not self.trainer.main:
            return
        self.trainer.emit(Validation(step, loss))
        self.writer.add_scalar("loss/validation", loss, step)

    def update(self, step: int, epoch: int, loss: float, lrs: dict[str, float]) -> None:
        """`lrs`: each parameter group's rate by name, the UNet's first."""
        if not self.trainer.main:
            return
        elapsed = time.time() - self.started
        it_per_s = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / it_per_s if it_per_s > 0 else None
        memory = precision.peak_memory_mb(self.trainer.accelerator.device)
        unet_lr = next(iter(lrs.values()))
        self.trainer.emit(Step(step, epoch, loss, unet_lr, round(it_per_s, 4), None if eta is None else round(eta, 1),
                               round(memory, 1)))
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{unet_lr:.2e}")
        self.bar.update(1)
        self.writer.add_scalar("loss", loss, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)

    def close(self) -> None:
        for thing in (self.bar, self.writer):
            if thing is not None:
                thing.close()
