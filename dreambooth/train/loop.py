"""The training run: load the working model, prepare data and class images, run the steps, sample, save, resume.

One obvious loop (Trainer.run). Everything it reads comes from the model's config.json; everything it says goes to
<model>/logs/events.jsonl (see events.py); requests come from <model>/control/ between steps.
Under `accelerate launch` every process trains its share of each epoch; only the main process writes files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, validate_for_training
from ..models import load_config
from ..errors import UserError
from ..events import (Cancelled, Checkpoint, ClassImages, Controls, Done, Error, Event, EventLog, Paused, Resumed,
                      Sample, Start, Step)
from ..store import DataRoot, ModelDir, atomic_write_text
from ..data import class_images as class_data
from ..data import captions
from ..data.dataset import TrainingData, class_examples_from, collect_instances, tokenize
from . import pipeline as gen
from .components import load_components
from .optim import make_lr_scheduler, make_optimizer
from .state import link_tree, load_state, save_state, saved_step, swap_folder
from .step import Batch, TrainStep

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

    def summary(self) -> str:
        lines = [f"{self.status}: {self.message} (step {self.step}/{self.total_steps})"]
        if self.checkpoints:
            lines.append(f"checkpoint: {self.checkpoints[-1]}")
        if self.samples:
            lines.append(f"previews: {Path(self.samples[-1]).parent}")
        return "\n".join(lines)


class StopTraining(Exception):
    """Ends the loop early with a status ("cancelled" or "error") and a message."""

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
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps: must be at least 1, got {max_steps}")
    return Trainer(root, model, config, max_steps).run()


def choose_precision(requested: str, on_gpu: bool, gpu_has_bf16: bool = True) -> str:
    """The precision that can run here, said in one line when it differs from the request.

    fp16 autocast on a CPU is slow and poorly supported: fp32 there instead. bf16 on a GPU without it (before
    Ampere): fp16 instead. bf16 on a CPU works.
    """
    if requested == "fp16" and not on_gpu:
        warnings.warn("mixed_precision fp16 needs a GPU; training in full precision (fp32) on the CPU", stacklevel=2)
        return "no"
    if requested == "bf16" and on_gpu and not gpu_has_bf16:
        warnings.warn("mixed_precision bf16: this GPU has no bf16 support; using fp16", stacklevel=2)
        return "fp16"
    return requested


def plan_total_steps(params, steps_per_epoch: int, override: int | None = None) -> int:
    """Optimizer steps of the whole run: --max-steps, else max_train_steps, else epochs x steps per epoch."""
    return override or params.max_train_steps or params.num_train_epochs * steps_per_epoch


def make_ema(params, unet):
    """An exponential moving average of the UNet weights (None when EMA is off)."""
    if not params.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=params.ema_decay)


class Trainer:
    def __init__(self, root: DataRoot, model: ModelDir, config: Config, max_steps: int | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.root, self.model, self.config, self.p = root, model, config, config.parameters
        self.max_steps_override = max_steps
        on_gpu = torch.cuda.is_available()
        self.accelerator = Accelerator(
            # Launched as several processes on a machine without CUDA: data-parallel on CPUs (gloo).
            cpu=not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            mixed_precision=choose_precision(self.p.mixed_precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported()),
            gradient_accumulation_steps=self.p.gradient_accumulation_steps,
            # SDXL's first encoder contributes its penultimate layer only: its last layer gets no gradient.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.main = self.accelerator.is_main_process
        self.events = EventLog(model.events)
        self.controls = Controls(model.control)
        self.checkpoints: list[Path] = []
        self.sample_paths: list[Path] = []
        self.last_save_step: int | None = None
        self.interrupted = False

    # -- helpers ------------------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if self.main:
            self.events.emit(event)

    def broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def _on_signal(self, signum, frame):
        self.interrupted = True

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        acc = self.accelerator
        if self.main:
            self.controls.clear_all()
            self.events.clear()
        acc.wait_for_everyone()
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except Exception as e:  # bad input found late, or a crash: the watcher learns why, then it propagates
            self.emit(Error(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if acc.num_processes == 1:
                # accelerate's settings are process-wide: let a later run in this process choose its own.
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()

    def _run(self) -> TrainResult:
        acc, p = self.accelerator, self.p
        instances = collect_instances(self.config)  # bad images are reported before the models load
        # A saved run's weights come from state/ (consistent with its optimizer), a new run's from working/.
        resume_from = self.model.state if saved_step(self.model.state) is not None else None
        self.c = c = load_components(self.model.working, self.config.model.family, acc.device, p, resume_from)
        try:
            classes = self.prepare_class_images(instances)
        except StopTraining as stop:
            self.emit(Cancelled(0, stop.message) if stop.status == "cancelled" else Error(stop.message, 0))
            return TrainResult(False, stop.status, 0, 0, stop.message)
        self.data = data = TrainingData(instances, classes, p, acc.num_processes, acc.process_index)
        self.instances = instances

        steps_per_epoch = data.steps_per_epoch
        total = plan_total_steps(p, steps_per_epoch, self.max_steps_override)
        self.total_steps = total
        te_steps = int(p.train_text_encoder_ratio * total) if c.text_encoders_trainable else 0
        self.te_steps = te_steps

        optimizer = make_optimizer(p, c.unet, c.text_encoders if te_steps > 0 else ())
        lr_scheduler = make_lr_scheduler(p, optimizer, total)
        unet, optimizer = acc.prepare(c.unet, optimizer)
        text_encoders = list(c.text_encoders)
        if te_steps > 0:
            text_encoders = [acc.prepare(te) for te in text_encoders]
        self.unet, self.text_encoders, self.optimizer, self.lr_scheduler = unet, text_encoders, optimizer, lr_scheduler
        self.ema = ema = make_ema(p, acc.unwrap_model(unet))

        step = 0
        resumed = load_state(self.model.state, acc, optimizer, lr_scheduler, ema)
        if resumed is not None:
            step = resumed
            self.last_save_step = step
        else:
            torch.manual_seed(p.seed + acc.process_index)
        if acc.process_index and resumed is not None:
            torch.manual_seed(p.seed + 1000003 * acc.process_index + step)

        trainable = [q for q in unet.parameters() if q.requires_grad]
        if te_steps > 0:
            trainable += [q for te in text_encoders for q in te.parameters() if q.requires_grad]
        self.train_step = TrainStep(unet, text_encoders, c.noise_scheduler, p, sdxl=c.sdxl, vae=c.vae,
                                    optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=acc,
                                    trainable_params=trainable)
        self.latent_cache: dict = {}

        self.emit(Start(total, math.ceil(total / steps_per_epoch), steps_per_epoch, step))
        writer = self.tensorboard()
        bar = self.progress_bar(total, step)
        status, message = "done", "training finished"
        started, start_step = time.time(), step
        try:
            if self.interrupted:  # Ctrl-C while the models loaded or class images were made
                raise StopTraining("cancelled", "cancelled before training started")
            if step >= total:
                raise StopTraining("done", "already trained to the last step; nothing to do")
            while step < total:
                epoch = step // steps_per_epoch
                batches = data.epoch_batches(epoch)
                first = (step - epoch * steps_per_epoch) * p.gradient_accumulation_steps
                for items in batches[first:]:
                    batch = self.make_batch(items, epoch)
                    out = self.train_step(batch, train_text_encoder=step < te_steps)
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    if step == te_steps:
                        self.freeze_text_encoders()
                    loss = acc.reduce(out.loss.detach().float(), reduction="mean").item()
                    if not math.isfinite(loss):
                        last = f"the last good save is step {self.last_save_step}" if self.last_save_step is not None \
                            else "nothing was saved"
                        raise StopTraining("error", f"loss became {loss} at step {step}; stopped, {last}")
                    if ema is not None:
                        ema.step(acc.unwrap_model(unet).parameters())
                    self.report(step, epoch, loss, started, start_step, bar, writer)
                    end_of_epoch = step % steps_per_epoch == 0
                    done_epochs = step // steps_per_epoch
                    self.handle_controls(step, epoch)
                    if step < total and end_of_epoch:
                        if p.sample_every_n_epochs and done_epochs % p.sample_every_n_epochs == 0:
                            self.make_samples(step)
                        if p.save_every_n_epochs and done_epochs % p.save_every_n_epochs == 0:
                            self.save(step, done_epochs)
                    if step >= total or end_of_epoch:
                        break
            if p.sample_every_n_epochs:
                self.make_samples(step)
            if p.save_on_end:
                self.save(step, step // steps_per_epoch)
            message = f"trained {total} steps"
        except StopTraining as stop:
            status, message = stop.status, stop.message
        except OSError as e:
            status = "error"
            kept = f"; the previous save (step {self.last_save_step}) is intact" if self.last_save_step else ""
            message = f"saving failed: {e}{kept}"
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        acc.wait_for_everyone()
        if status == "done":
            self.emit(Done(step, message))
        elif status == "cancelled":
            self.emit(Cancelled(step, message))
        else:
            self.emit(Error(message, step))
        # What accelerate's end_training does for us (it needs trackers on accelerate 0.21, the webui's version).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return TrainResult(status == "done", status, step, total, message, self.checkpoints, self.sample_paths)

    # -- pieces of the loop -------------------------------------------------------------------------------------
    def make_batch(self, items, epoch: int) -> Batch:
        c, p = self.c, self.p
        latents, time_ids = [], []
        for item in items:
            key = (item.example.path, item.bucket)
            if p.cache_latents and key in self.latent_cache:
                latent, ids = self.latent_cache[key]
            else:
                pixels, ids = self.data.load_item(item, epoch)
                with torch.no_grad():
                    pixels = pixels.unsqueeze(0).to(self.accelerator.device, c.vae.dtype)
                    noise = torch.Generator(pixels.device).manual_seed(self.data.item_seed(item, epoch) % 2**63)
                    latent = c.vae.encode(pixels).latent_dist.sample(noise)[0] * c.vae.config.scaling_factor
                if p.cache_latents:
                    self.latent_cache[key] = (latent, ids)
            latents.append(latent)
            time_ids.append(ids)
        prompts = [item.example.prompt for item in items]
        device = self.accelerator.device
        return Batch(
            latents=torch.stack(latents).float().to(device),
            input_ids=tuple(i.to(device) for i in tokenize(c.tokenizers, prompts)),
            add_time_ids=torch.stack(time_ids).to(device) if c.sdxl else None,
            is_prior=torch.tensor([item.is_prior for item in items], device=device),
        )

    def freeze_text_encoders(self) -> None:
        for te in self.text_encoders:
            te.requires_grad_(False)
        log.info("text encoder frozen after %d steps", self.te_steps)

    def report(self, step, epoch, loss, started, start_step, bar, writer) -> None:
        if not self.main:
            return
        lrs = self.lr_scheduler.get_last_lr()
        elapsed = time.time() - started
        it_per_s = (step - start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / it_per_s if it_per_s > 0 else None
        if torch.cuda.is_available():
            memory = torch.cuda.max_memory_allocated() / 2**20
        else:
            import resource

            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.emit(Step(step, epoch, loss, lrs[0], round(it_per_s, 4), None if eta is None else round(eta, 1),
                       round(memory, 1)))
        if bar is not None:
            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}")
            bar.update(1)
        if writer is not None:
            writer.add_scalar("loss", loss, step)
            for i, lr in enumerate(lrs):
                writer.add_scalar(f"lr/{['unet', 'text_encoder'][min(i, 1)]}", lr, step)

    def handle_controls(self, step: int, epoch: int) -> None:
        pending = self.controls.pending() if self.main else set()
        if self.interrupted:
            pending.add("cancel")
        pending = self.broadcast(pending)
        if "pause" in pending and "cancel" not in pending:
            self.emit(Paused(step))
            while True:
                time.sleep(0.2)
                now = self.controls.pending() if self.main else set()
                if self.interrupted:
                    now.add("cancel")
                now = self.broadcast(now)
                if "cancel" in now or "pause" not in now:
                    pending |= now
                    break
            self.emit(Resumed(step))
        if "sample" in pending:
            if self.main:
                self.controls.withdraw("sample")
            self.make_samples(step)
        if "save" in pending:
            if self.main:
                self.controls.withdraw("save")
            self.save(step, epoch)
        if "cancel" in pending:
            if self.main:
                self.controls.withdraw("cancel")
            if self.p.save_on_cancel and self.last_save_step != step:
                self.save(step, epoch)
            raise StopTraining("cancelled", f"cancelled at step {step}")

    # -- class images, samples, saving --------------------------------------------------------------------------
    def prepare_class_images(self, instances) -> dict:
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
            self.generate_class_images(plans, total_missing)
        self.accelerator.wait_for_everyone()
        classes = {}
        for index, concept, folder, pairs, missing, wanted in plans:
            if folder is not None and missing:  # generated just now (by the main process): read the folder again
                pairs, _ = class_data.plan_class_images(folder, wanted)
            classes[index] = class_examples_from(pairs, index)
        return classes

    def generate_class_images(self, plans, total_missing: int) -> None:
        c, res = self.c, self.p.resolution
        pipe = gen.make_pipeline(c.unet, c.vae, c.text_encoders, c.tokenizers, c.noise_scheduler.config, c.sdxl)
        done = 0
        self.emit(ClassImages(0, total_missing))
        for index, concept, folder, pairs, missing, wanted in plans:
            if not missing:
                continue
            settings = (concept.class_negative_prompt, concept.class_infer_steps, concept.class_guidance_scale)

            def make(prompt, number, settings=settings):
                return gen.generate(pipe, prompt, *settings, number, res, res)

            def parameters(prompt, number, settings=settings):
                return gen.png_parameters(prompt, *settings, number, res, res)

            def progress(n, _total, offset=done):
                self.emit(ClassImages(offset + n, total_missing))
                if self.accelerator.num_processes == 1 and (self.interrupted or "cancel" in self.controls.pending()):
                    self.controls.withdraw("cancel")  # the images made so far are kept and reused next time
                    raise StopTraining("cancelled", f"cancelled while generating class images ({offset + n} made)")

            class_data.generate_missing(folder, missing, make, parameters, progress)
            done += len(missing)

    def sample_prompts(self):
        """(concept position, concept, prompt) for each active concept with previews."""
        active = [c for c in self.config.concepts if c.instance_data_dir.strip()]
        for pos, (concept, examples) in enumerate(zip(active, self.instances)):
            if concept.num_samples == 0:
                continue
            caption = captions.caption_of(examples[0].path)
            if concept.sample_prompt.strip():
                prompt = captions.instance_prompt(concept.sample_prompt, caption, concept.instance_token,
                                                  concept.class_token)
            else:
                prompt = examples[0].prompt
            yield pos, concept, prompt

    def make_samples(self, step: int) -> None:
        if self.main:
            acc, c = self.accelerator, self.c
            unet = acc.unwrap_model(self.unet)
            tes = [acc.unwrap_model(te) for te in self.text_encoders]
            pipe = gen.make_pipeline(unet, c.vae, tes, c.tokenizers, c.noise_scheduler.config, c.sdxl)
            res = self.p.resolution
            paths = []
            with torch.no_grad():
                for pos, concept, prompt in self.sample_prompts():
                    for i in range(concept.num_samples):
                        seed = concept.sample_seed + i if concept.sample_seed >= 0 else random.randrange(2**31)
                        image = gen.generate(pipe, prompt, concept.sample_negative_prompt, concept.sample_infer_steps,
                                             concept.sample_guidance_scale, seed, res, res)
                        path = self.model.samples / f"{step}-{pos}-{i}.png"
                        info = gen.png_parameters(prompt, concept.sample_negative_prompt, concept.sample_infer_steps,
                                                  concept.sample_guidance_scale, seed, res, res,
                                                  {"Model": self.model.name, "Training step": step})
                        gen.save_png(image, path, info)
                        paths.append(path)
            if paths:
                self.sample_paths.extend(paths)
                self.emit(Sample(step, tuple(str(x) for x in paths)))
        self.accelerator.wait_for_everyone()

    def save(self, step: int, epoch: int) -> None:
        """Resume state (with the trained weights) into state/, the weights into working/, then a checkpoint file.

        state/ is the commit point: it is replaced in one rename and holds weights, optimizer, scheduler, EMA, step
        and RNG together, so a kill at any moment resumes from a consistent save. working/ gets hard links to the
        same weight files (no extra disk), for `export` and the UI. Main process only writes.
        """
        acc, p = self.accelerator, self.p
        if self.main:
            from ..checkpoint.export import write_single_file

            unet = acc.unwrap_model(self.unet)
            trained = {"unet": unet}
            if self.te_steps > 0:
                for name, te in zip(("text_encoder", "text_encoder_2"), self.text_encoders):
                    trained[name] = acc.unwrap_model(te)

            def write_weights(tmp: Path) -> None:
                for name, module in trained.items():
                    module.save_pretrained(tmp / name, safe_serialization=True)

            save_state(self.model.state, step, self.total_steps, self.optimizer, self.lr_scheduler, self.ema,
                       write_weights)
            working = self.model.working
            for name in trained:
                swap_folder(working / name, lambda tmp, name=name: link_tree(self.model.state / name, tmp))
            state_dicts = {name: module.state_dict() for name, module in trained.items()}
            if self.ema is not None:
                ema_unet = self._ema_unet(unet)
                swap_folder(self.model.ema_unet, lambda tmp: ema_unet.save_pretrained(tmp, safe_serialization=True))
                if p.save_ema_weights:
                    state_dicts["unet"] = ema_unet.state_dict()
            summary = {"step": step, "epoch": epoch, "total_steps": self.total_steps,
                       "learning_rate": p.learning_rate, "text_encoder_learning_rate": p.text_encoder_learning_rate,
                       "text_encoder_steps": self.te_steps, "ema": p.use_ema,
                       "instance_images": len(self.data.instances), "prompts": sorted({e.prompt for e in self.data.instances})[:8]}
            atomic_write_text(self.model.training_summary, json.dumps(summary, indent=2) + "\n")
            out = self.root.checkpoints / f"{self.model.name}_{step}.{p.checkpoint_format}"
            metadata = {"dreambooth.training": json.dumps(summary)}
            path = write_single_file(working, out, fmt=p.checkpoint_format, half=p.save_half,
                                     state_dicts=state_dicts, metadata=metadata, training=summary)
            self.checkpoints.append(Path(path))
            self.emit(Checkpoint(step, str(path)))
        self.last_save_step = step
        acc.wait_for_everyone()

    def _ema_unet(self, unet):
        import copy

        ema_unet = copy.deepcopy(unet)
        self.ema.copy_to(ema_unet.parameters())
        return ema_unet

    # -- output -------------------------------------------------------------------------------------------------
    def tensorboard(self):
        if not self.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.model.tensorboard))

    def progress_bar(self, total: int, step: int):
        if not self.main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=step, desc=f"training {self.model.name}", unit="step", dynamic_ncols=True)
