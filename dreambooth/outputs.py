"""The files a model writes outside its own folder (checkpoints in models/Stable-diffusion, LoRAs in models/Lora):
their names, which of them are the model's, and the rule that the product never replaces a file it did not write.

Names: NAME_<step>.<format> (a checkpoint), NAME_<step>[_suffix].safetensors (a LoRA; `_extract_r32` ...), where NAME
is the model's name or its custom checkpoint name. Every file written is recorded in the model's logs/exports.txt,
so the model's list holds exactly its own files, whatever their names.

The rule, for every writer:
- a name that is free is taken;
- the trainer may replace a file the model itself wrote at the same step (a run started over);
- an automatic name (the trainer's, or an export without a name) that is taken by anything else moves on to the next
  free `NAME_<step>-2` ... and says so;
- a name the user typed replaces an existing file only when the user ticked Overwrite (`--overwrite`);
- the model's own source checkpoint is never replaced.
A checkpoint's `.yaml` beside it counts as part of its name.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import UserError
from .store import ModelDir, writing_to

log = logging.getLogger("dreambooth")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def checkpoint_file(folder: Path, stem: str, step: int, fmt: str) -> Path:
    return Path(folder) / f"{stem}_{int(step)}.{fmt}"


def lora_file(folder: Path, stem: str, step: int, suffix: str = "") -> Path:
    return Path(folder) / f"{stem}_{int(step)}{suffix}.safetensors"


def lora_prompt_tag(path: Path, weight: float = 1.0) -> str:
    """The tag that applies a LoRA file in a webui prompt (its name is the file's own: ss_output_name says so)."""
    return f"<lora:{Path(path).stem}:{weight:g}>"


def output_pattern(stem: str) -> re.Pattern:
    """NAME_<step>[-n][_suffix].(safetensors|ckpt): a suffix starts with a letter, so model `a` never matches the
    files of a model `a_1` (a_1_5.safetensors)."""
    return re.compile(rf"^{re.escape(stem)}_(\d+)(-\d+)?(_[A-Za-z][^.]*)?\.(safetensors|ckpt)$")


def step_of(path: Path) -> int | None:
    """The training step in an output file's name (NAME_<step>...), None for a name of another shape."""
    found = re.search(r"_(\d+)(-\d+)?(_[A-Za-z][^.]*)?\.(safetensors|ckpt)$", Path(path).name)
    return int(found.group(1)) if found else None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def recorded(model: ModelDir) -> list[Path]:
    """The files the model recorded writing (a damaged or unreadable record counts as empty)."""
    try:
        text = model.exports.read_bytes().decode("utf-8", errors="replace") if model.exports.is_file() else ""
    except OSError:
        return []
    return [Path(line) for line in text.splitlines() if line.strip() and "\x00" not in line]


def record(model: ModelDir, path: Path) -> None:
    """Note that the model wrote `path` (so its list shows it, whatever its name)."""
    with writing_to(model.exports):
        model.logs.mkdir(parents=True, exist_ok=True)
        with open(model.exports, "a", encoding="utf-8") as out:
            out.write(f"{Path(path).resolve()}\n")


def is_models(model: ModelDir, path: Path) -> bool:
    return any(_same(path, p) for p in recorded(model))


def _taken(path: Path, with_yaml: bool) -> list[Path]:
    return [p for p in ([path, path.with_suffix(".yaml")] if with_yaml else [path]) if p.exists() or p.is_symlink()]


def _yaml_is_models(model: ModelDir, yaml: Path) -> bool:
    """A .yaml belongs to the checkpoints of its name beside it: the model's when they all are; with none left, when
    the model wrote one of that name (the yaml of its own checkpoint that was deleted)."""
    siblings = [yaml.with_suffix(s) for s in CHECKPOINT_SUFFIXES]
    present = [s for s in siblings if s.exists()]
    return all(is_models(model, s) for s in present) if present else any(is_models(model, s) for s in siblings)


def _source(model: ModelDir) -> Path | None:
    """The checkpoint file the model was created from, where it is a file here."""
    from .models import load_config

    try:
        source = load_config(model).model.source
    except UserError:
        return None
    return Path(source) if source and Path(source).is_file() else None


def _is_source(model: ModelDir, path: Path) -> bool:
    source = _source(model)
    return source is not None and _same(source, path)


def _next_free(path: Path, with_yaml: bool) -> Path:
    for n in range(2, 10000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not _taken(candidate, with_yaml):
            return candidate
    raise UserError(f"{path.parent}: no free name for {path.name}")


def automatic(model: ModelDir, wanted: Path, with_yaml: bool = True, own_allowed: bool = False) -> Path:
    """Where a file with an automatic name goes: `wanted`, unless something else holds that name (the trainer's own
    file of the same step may be replaced where `own_allowed`); then the next free name, said in the log."""
    taken = [p for p in _taken(wanted, with_yaml) if not (p.suffix == ".yaml" and _yaml_is_models(model, p))]
    ours = own_allowed and all(is_models(model, p) for p in taken)
    if not taken or (ours and not any(_is_source(model, p) for p in taken)):
        return wanted
    free = _next_free(wanted, with_yaml)
    whose = "is this model's earlier file" if is_models(model, taken[0]) else "is not this model's own file"
    log.warning("%s exists and %s: writing %s beside it", taken[0], whose, free.name)
    return free


def chosen(model: ModelDir, wanted: Path, overwrite: bool, with_yaml: bool = True) -> Path:
    """Where a file the user named goes: `wanted`; an existing file there (or its .yaml) is replaced only with
    `overwrite`, and never the model's own source checkpoint."""
    taken = [p for p in _taken(wanted, with_yaml) if not (p.suffix == ".yaml" and _yaml_is_models(model, p))]
    if any(_is_source(model, p) for p in taken):
        raise UserError(f"{wanted.name} is the checkpoint model {model.name!r} was created from: choose another "
                        "file name")
    if taken and not overwrite:
        raise UserError(f"{taken[0].name} exists in {taken[0].parent}: tick 'Overwrite an existing file' "
                        "(--overwrite) to replace it, or choose another file name")
    return wanted


def model_outputs(model: ModelDir, folders, stems, written=()) -> list[Path]:
    """Every checkpoint or LoRA file of the model that is still there, oldest first: the files recorded or `written`
    by this run, and NAME_<step>... files in `folders` for each stem (files of runs before the record existed)."""
    found, source = {}, _source(model)
    for path in [*written, *recorded(model)]:
        path = Path(path)
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            found[str(path.resolve())] = path.resolve()
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for stem in {s.strip() for s in stems} - {""}:
            pattern = output_pattern(stem)
            for path in Path(folder).iterdir():
                if pattern.match(path.name) and path.is_file() and not (source and _same(source, path)):
                    found[str(path.resolve())] = path.resolve()
    return sorted(found.values(), key=lambda p: (p.stat().st_mtime, p.name))
