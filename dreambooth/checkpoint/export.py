"""Working diffusers folder (or the trainer's in-memory weights) -> one single-file checkpoint.

The output has the original releases' key layout, a modelspec-style metadata block (safetensors), and an inference
yaml beside it when a host could not guess the config. The file is written to a temp name and renamed at the end.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..errors import UserError
from ..families import family, family_from_folder
from ..store import atomic_path, current_umask
from .convert import (EXTRAS_FILE, canonical_source, components_of, component_source, plan_export, read_configs)
from .layout import render_yaml
from .tensorio import Entry, SafetensorsSource, write_ckpt, write_safetensors

FORMATS = ("safetensors", "ckpt")


def modelspec(family_name: str, title: str, training: dict | None = None) -> dict[str, str]:
    fam = family(family_name)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.architecture,
        "modelspec.implementation": fam.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{fam.resolution}x{fam.resolution}",
        "modelspec.prediction_type": "v" if fam.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if training:
        meta["modelspec.description"] = f"DreamBooth, step {training.get('step', 0)}, epoch {training.get('epoch', 0)}"
        meta["dreambooth.training"] = json.dumps(training, sort_keys=True)
    return meta


def write_entries(out: Path, entries: list[Entry], fmt: str, metadata: dict | None, yaml_text: str | None) -> Path:
    """Atomically write the checkpoint (and the yaml beside it, if any)."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}: must be one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix.lower() != f".{fmt}":
        raise UserError(f"{out}: a {fmt} checkpoint must be named *.{fmt}")
    if out.is_dir():
        raise UserError(f"{out}: is a folder, expected a file path")

    def write_checkpoint(tmp: Path) -> None:
        if fmt == "safetensors":
            write_safetensors(tmp, entries, metadata={"format": "pt", **(metadata or {})})
        else:
            write_ckpt(tmp, entries)

    _write_file(out, write_checkpoint)
    if yaml_text:
        _write_file(out.with_suffix(".yaml"), lambda tmp: tmp.write_text(yaml_text, encoding="utf-8"))
    return out


def _write_file(path: Path, write) -> None:
    """Write `path` through a temp file beside it; a failed write (disk full, no permission) is one line, and what
    was there before stays as it was."""
    with atomic_path(path) as tmp:
        write(tmp)
        _readable(tmp)


def _readable(path: Path) -> None:
    """The temp file is private (0600); a checkpoint is a normal file that the webui and others read."""
    os.chmod(path, 0o666 & ~current_umask())


def write_single_file(working: Path, out: Path, fmt: str = "safetensors", half: bool = False,
                      state_dicts: dict | None = None, metadata: dict | None = None,
                      training: dict | None = None) -> Path:
    """Export `working` (with components replaced by `state_dicts`, diffusers layout) to `out`. `training` is the
    trainer's summary of the weights ({"step", "epoch", ...}; None for a model that was never trained)."""
    working = Path(working)
    if not (working / "model_index.json").is_file():
        raise UserError(f"{working}: not a working diffusers model (no model_index.json)")
    state_dicts = state_dicts or {}
    family_name = family_from_folder(working)
    configs = read_configs(working, family_name)
    sources = {}
    for component in components_of(family_name):
        if component in state_dicts:
            sources[component] = canonical_source(component, state_dicts[component])
        else:
            sources[component] = component_source(working / component, component)
    extras_path = working / EXTRAS_FILE
    extras = SafetensorsSource([extras_path]) if extras_path.is_file() else None
    # The source's EMA copy describes the untrained UNet: keep it only while the UNet is untouched.
    unet_untouched = "unet" not in state_dicts and training is None
    entries = plan_export(family_name, configs, sources, extras, include_ema=unet_untouched, half=half)
    meta = modelspec(family_name, Path(out).stem, training)
    meta.update(metadata or {})
    yaml_text, needed = render_yaml(family_name, configs["unet"], configs["vae"])
    return write_entries(out, entries, fmt, meta, yaml_text if needed else None)
