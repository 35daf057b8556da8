"""What a user can do, one function each: the tab, the REST routes and the CLI all call these.

Every action takes explicit inputs (the data root; the host where its lists must follow a new file), raises UserError
(or one of its kinds: JobRunningError, WriteError, ConfigError) for anything a user should read, and returns what it
did in one sentence, or the data asked for. Work that loads weights or traces a model (create, export, extract, the
memory plan and presets) runs in a child process (jobs.run_cli), so a webui never holds it in its own process.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import jobs
from .config import Config, Parameters, validate_for_training
from .errors import UserError
from .host import Host
from .jobs import JobRunningError
from .models import load_config, save_config
from .sources import is_starter, starter_config
from .store import EXPORT_NAME_PATTERN, DataRoot, ModelDir

REQUESTS = ("pause", "sample", "save", "cancel")
PLAN_TIMEOUT_S = 30 * 60
STOP_PLAN = ".stop-plan"  # in models/dreambooth: its presence stops the memory plan that runs


def _existing(root: DataRoot, name) -> ModelDir:
    if not name:
        raise UserError("no model selected: create one or select one in the Model panel")
    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found")
    return model


def saved_config(root: DataRoot, name) -> Config | None:
    """The model's config.json, or None where there is none to read (a missing model, a damaged file)."""
    try:
        return Config.load(root.model(name).config_path)
    except UserError:
        return None


# ---------------------------------------------------------------- models


@dataclass
class Created:
    config: Config
    message: str


def create(root: DataRoot, name: str, source: str, family: str = "auto", overwrite: bool = False) -> Created:
    """A new model from a checkpoint file, a diffusers folder or a hub id (child process: a real checkpoint is
    gigabytes). One made from the built-in tiny model gets the settings of a one-minute first run."""
    name = (name or "").strip()
    model = root.model(name)  # the name is checked before any work
    source = str(source or "").strip()
    if not source:
        raise UserError("source: choose a checkpoint, a file, a diffusers folder or a hub id")
    if model.path.exists() and not overwrite:
        raise UserError(f"a model named {name!r} exists: tick 'Overwrite' to replace it, or choose another name")
    printed = jobs.run_cli(root, "create", name, "--source", source, "--family", family or "auto",
                           *(["--overwrite"] if overwrite else []))
    config = load_config(model)
    note = ""
    if is_starter(source):
        config = save_config(model, starter_config(root, config))
        note = (" Settings for a first run of about a minute on a CPU are filled in (resolution 64, 6 epochs, the "
                "demo images as concept 1, and a learning rate of 1e-4, far above the 1e-6 to 5e-6 of a real model, "
                "so that the tiny one changes within the minute): press Train.")
    reclaimed = _reclaimed(printed)
    return Created(config, f"Created {model.name} ({config.model.family}) from {source}.{note} {reclaimed}".strip())


def save_settings(root: DataRoot, name: str, config: Config) -> Config:
    return save_config(_existing(root, name), config)


def run_length(config: Config) -> str:
    """How long a run of `config` is, counted as the trainer counts it: "24 steps (6 epochs of 4)"; "" where its
    images cannot be read yet (the check before training says why)."""
    import warnings

    from .data.dataset import TrainingData, collect_instances, split_validation
    from .train.schedule import Schedule

    p = config.parameters
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable images are named when training starts
            instances, _ = split_validation(config, collect_instances(config))
        data = TrainingData(instances, {}, p)
    except (UserError, OSError, ValueError):
        return ""
    total = Schedule.plan(p, data.steps_per_epoch).total_steps
    if p.max_train_steps:
        return f"{total} steps (Max training steps; an epoch is {data.steps_per_epoch})"
    return f"{total} steps ({p.num_train_epochs} epochs of {data.steps_per_epoch})"


def delete(root: DataRoot, name: str, confirmed: bool) -> str:
    if not name:
        raise UserError("no model selected")
    if not confirmed:
        raise UserError("tick 'Yes, delete this model' first")
    from .models import delete_model

    delete_model(root, name)
    return f"Deleted {name}."


def concepts(root: DataRoot, name: str) -> list[dict]:
    """The model's concepts as saved, each with how many instance images its folder holds now."""
    from .data.images import find_images

    config = load_config(_existing(root, name))
    listed = []
    for concept in config.concepts:
        folder = Path(concept.instance_data_dir).expanduser()
        try:
            count = len(find_images(folder)) if concept.instance_data_dir.strip() and folder.is_dir() else 0
        except UserError:
            count = 0
        listed.append({**asdict(concept), "images": count})
    return listed


@dataclass
class Photos:
    """What a concept's instance folder holds, for a look before training."""

    folder: str
    count: int
    captioned: int  # images with a .txt caption beside them
    first: list  # [(path, caption)] of the first few


def instance_photos(folder: str, shown: int = 4) -> Photos:
    """The images a concept's instance folder holds (as the trainer finds them) and the first few captions."""
    import warnings

    from .data.captions import caption_of
    from .data.images import find_images

    path = Path(str(folder or "")).expanduser()
    if not str(folder or "").strip():
        raise UserError("no instance images folder set")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a folder")
    images = find_images(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable caption reads as the file name, as in training
        first = [(image, caption_of(image)) for image in images[:shown]]
    captioned = sum(1 for image in images if image.with_suffix(".txt").is_file())
    return Photos(str(path), len(images), captioned, first)


def _with_concepts(model, config: Config, concepts: list[dict]) -> Config:
    return save_config(model, Config.from_dict({**config.to_dict(), "concepts": concepts}))


def _numbered(config: Config, number: int) -> int:
    """The list index of concept `number` (counted from 1, as the tab's Concept 1, 2, ...)."""
    if not 1 <= number <= len(config.concepts):
        raise UserError(f"concept {number}: the model has {len(config.concepts)} concept(s), numbered from 1")
    return number - 1


def add_concept(root: DataRoot, name: str, values: dict) -> int:
    """Add a concept with `values` (the rest at their defaults); returns its number (from 1)."""
    model = _existing(root, name)
    config = load_config(model)
    _with_concepts(model, config, [asdict(c) for c in config.concepts] + [values])
    return len(config.concepts) + 1


def set_concept(root: DataRoot, name: str, number: int, values: dict) -> None:
    model = _existing(root, name)
    config = load_config(model)
    concepts = [asdict(c) for c in config.concepts]
    concepts[_numbered(config, number)].update(values)
    _with_concepts(model, config, concepts)


def remove_concept(root: DataRoot, name: str, number: int) -> None:
    model = _existing(root, name)
    config = load_config(model)
    concepts = [asdict(c) for c in config.concepts]
    del concepts[_numbered(config, number)]
    _with_concepts(model, config, concepts)


# ---------------------------------------------------------------- training


@dataclass
class Started:
    job: dict
    from_step: int  # 0: a new run
    length: str = ""  # run_length

    @property
    def message(self) -> str:
        where = f"resuming at step {self.from_step}" if self.from_step else "from step 0"
        return f"Training {self.job['name']} started, {where}" + (f"; a run of {self.length}." if self.length else ".")


def train(root: DataRoot, name: str, host: Host | None = None, config: Config | None = None,
          start_over: bool = False, from_step: int | None = None) -> Started:
    """Start training `name` in a child process: with `config`, saved first (what the trainer uses is what the face
    showed); `start_over` goes back to the source checkpoint's weights, `from_step` to a kept save. A bad config is
    refused before anything is written."""
    job = jobs.running_job(root)
    if job:
        raise JobRunningError(f"a training is already running: {job['name']!r}; cancel it or wait until it ends")
    model = _existing(root, name)
    if start_over and from_step is not None:
        raise UserError("start over or go back to a kept save: not both")
    if config is not None:
        validate_for_training(config)
    if start_over:
        back_to_source(root, name)
    elif from_step is not None:
        go_back(root, name, from_step)
    if config is not None:
        save_config(model, config)
    from .train.saves import saved_step

    saved = saved_step(model.state)
    return Started(jobs.start(root, name, host), saved or 0, run_length(config or load_config(model)))


def request(root: DataRoot, name: str, what: str) -> str:
    """Ask the running training to pause (or resume), sample, save or cancel."""
    if what not in REQUESTS:
        raise UserError(f"request {what!r}: one of {', '.join(REQUESTS)}")
    return jobs.request(root, name, what)


def back_to_source(root: DataRoot, name: str) -> str:
    """Put a model's weights back to its source checkpoint and drop its saved run, so the next training starts at
    step 0. Its settings and generated class images stay."""
    model = root.model(name)
    config = load_config(model)
    holder = model.lock("").holder()
    if holder is not None:
        raise JobRunningError(f"model {name!r} is {holder.get('purpose') or 'in use'}; wait until it ends")
    kept = root.dreambooth / f".{name}.class_images.kept"
    if kept.is_dir():  # an earlier start-over was killed while it held the class images: put them back first
        if model.class_images.exists():
            shutil.rmtree(kept)
        else:
            os.replace(kept, model.class_images)
    if model.class_images.is_dir():
        os.replace(model.class_images, kept)
    try:
        jobs.run_cli(root, "create", name, "--source", config.model.source, "--family", config.model.family,
                     "--overwrite")
        fresh = load_config(model)
        config.with_model(fresh.model).save(model.config_path)
    finally:
        if kept.is_dir():
            if model.class_images.exists():
                shutil.rmtree(model.class_images)
            os.replace(kept, model.class_images)
    return f"{name}: back to the weights of {config.model.source}; the next training starts at step 0"


def go_back(root: DataRoot, name: str, step: int) -> str:
    """Make the kept save of `step` the one the model's next training resumes from."""
    from .train.saves import go_back as restore

    model = root.model(name)
    with model.lock("going back to an earlier save"):
        return restore(model.state, model.saves, step)


def kept_saves(root: DataRoot, name: str) -> list[int]:
    """The steps of the model's saves a run can go back to, newest first (the first is the latest save)."""
    from .train.saves import kept_saves as saves, saved_step

    model = root.model(name)
    try:
        latest = saved_step(model.state)
    except UserError:
        latest = None
    steps = [save["step"] for save in saves(model.saves)]
    return ([latest] if latest is not None else []) + [step for step in steps if step != latest]


def saved_step(root: DataRoot, name: str) -> int | None:
    """The step the model's next training resumes at (None: it starts at step 0)."""
    from .train.saves import saved_step as step

    return step(root.model(name).state)


# ---------------------------------------------------------------- files


def model_files(root: DataRoot, name: str, written: list | None = None) -> list[Path]:
    """Every checkpoint and LoRA file of a model that is still there, oldest first (dreambooth.outputs): the files
    it recorded writing, those a run wrote (`written`), and NAME_<step> files (and those of its custom checkpoint
    name) in models/Stable-diffusion and models/Lora."""
    from .outputs import model_outputs

    config = saved_config(root, name)
    custom = config.parameters.checkpoint_name if config else ""
    return model_outputs(root.model(name), [root.checkpoints, root.lora], [name, custom], written or [])


def fidelity_scores(root: DataRoot, name: str) -> dict:
    """The fidelity scores of the model's saves and the best one (models.read_fidelity)."""
    from .models import read_fidelity

    return read_fidelity(root.model(name))


def export_path(root: DataRoot, file_name: str, fmt: str) -> Path | None:
    """Where an export named `file_name` goes: models/Stable-diffusion/<name>.<format>; None for an empty name
    (the model's own NAME_<step>)."""
    stem = (file_name or "").strip()
    if stem.lower().endswith((".safetensors", ".ckpt")):
        stem = stem.rsplit(".", 1)[0]
    if stem and not EXPORT_NAME_PATTERN.match(stem):
        raise UserError(f"file name {stem!r}: use letters, digits, spaces and _ - . ( )")
    return root.checkpoints / f"{stem}.{fmt}" if stem else None


def export(root: DataRoot, name: str, params: Parameters, file_name: str = "", overwrite: bool = False,
           host: Host | None = None) -> str:
    """Write the working model as one checkpoint file in the format, precision and weights (EMA or not) that
    `params` choose (child process), then refresh the host's list."""
    _existing(root, name)
    out = export_path(root, file_name, params.checkpoint_format)
    ema = params.use_ema and params.save_ema_weights
    printed = jobs.run_cli(root, "export", name, "--format", params.checkpoint_format,
                           "--half" if params.save_half else "--no-half", "--ema" if ema else "--no-ema",
                           *(["--out", str(out)] if out else []), *(["--overwrite"] if overwrite else []))
    if host is not None:
        host.checkpoints_changed()
    written = [line[len("wrote "):] for line in printed.splitlines() if line.startswith("wrote ")]
    return f"Exported {written[-1] if written else out}. {_reclaimed(printed)}".strip()


def extract_lora(root: DataRoot, name: str, rank, te_rank=None, host: Host | None = None) -> str:
    """A LoRA from the model's full fine-tune (child process: it loads two models), then refresh the host's list."""
    _existing(root, name)
    if rank is None or int(rank) < 1:
        raise UserError("UNet rank: enter a whole number of at least 1")
    printed = jobs.run_cli(root, "extract-lora", name, "--rank", str(int(rank)),
                           *(["--te-rank", str(int(te_rank))] if te_rank else []))
    if host is not None:
        host.loras_changed()
    return printed


def _reclaimed(printed: str) -> str:
    from .store import reclaimed_in

    return reclaimed_in(printed)


# ---------------------------------------------------------------- memory


@dataclass
class Plan:
    text: str
    fits: bool | None  # None: no GPU size to fit


def preset_sizes() -> tuple:
    from .train.memory import PRESET_SIZES

    return PRESET_SIZES


def _stop_file(root: DataRoot) -> Path:
    stop = root.dreambooth / STOP_PLAN
    stop.unlink(missing_ok=True)  # a stop asked for an earlier plan
    return stop


def stop_plan(root: DataRoot) -> str:
    """Stop the memory plan or preset that runs now (it takes minutes of CPU for a real model)."""
    from .store import atomic_write_text

    atomic_write_text(root.dreambooth / STOP_PLAN, "")
    return "Stopping the memory plan."


def plan(root: DataRoot, name: str, vram_gb: float | None, params: Parameters | None = None) -> Plan:
    """The predicted peak GPU memory of training `name` with `params` (default: its saved settings), and with
    `vram_gb` whether it fits and what to change (child process: tracing a model takes a CPU for minutes; stop_plan
    stops it)."""
    model = _existing(root, name)
    args = ["plan", name, "--json", *(["--vram", repr(float(vram_gb))] if vram_gb else [])]
    with tempfile.TemporaryDirectory(prefix="dreambooth-plan-") as tmp:
        if params is not None:
            config = replace(load_config(model), parameters=params)
            config.save(Path(tmp) / "config.json")
            args += ["--config", str(Path(tmp) / "config.json")]
        printed = jobs.run_cli(root, *args, timeout=PLAN_TIMEOUT_S, stop=_stop_file(root))
    result = json.loads(printed.splitlines()[-1])
    return Plan(result["text"], result["fits"])


def apply_preset(root: DataRoot, name: str, size) -> tuple[Config, str]:
    """Set the model's memory settings to the fastest ones that fit `size` GiB (child process); the saved config
    and what changed."""
    model = _existing(root, name)
    if not size:
        raise UserError("choose a VRAM preset")
    said = jobs.run_cli(root, "preset", name, repr(float(size)), timeout=PLAN_TIMEOUT_S, stop=_stop_file(root))
    return load_config(model), said
