"""Create a DreamBooth model from a checkpoint, and export it back to one file.

create: `<root>/models/dreambooth/NAME/` gets `working/` (a standard diffusers folder) and `config.json`. It is built
in a temp folder beside the final one and renamed at the end, so a failure leaves nothing half-created and
--overwrite replaces the old model only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .config import Config, ModelSettings, Parameters
from .errors import UserError
from .families import check_family_choice, family as family_facts
from .store import DataRoot, ModelDir, atomic_write_text, temporary_folder, writing_to

# "owner/name" on the Hugging Face hub; anything else that does not exist is a missing file or folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Weights in these files are pickles, which can run code when loaded (torch 2.1, the webui's, unpickles by default).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = ("convert them to .safetensors where you trust them (diffusers: DiffusionPipeline.from_pretrained(folder)"
                ".save_pretrained(new_folder, safe_serialization=True)), or, if you trust these files, "
                "pass --allow-pickle-weights to `create`")


def _is_pickle(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in PICKLE_SUFFIXES or any(name.endswith(f"{s}.index.json") for s in PICKLE_SUFFIXES)


def _pickle_only_components(folder: Path) -> list[str]:
    """Components of a diffusers folder whose weights exist only as pickles."""
    found = []
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in component.iterdir() if f.is_file()]
        if any(_is_pickle(f) for f in files) and not any(f.suffix == ".safetensors" for f in files):
            found.append(component.name)
    return found


def _link(target: Path, link: Path) -> None:
    try:
        link.symlink_to(target.resolve())
    except OSError:  # no symlinks here (Windows without the privilege): a hard link, else a copy
        try:
            os.link(target, link)
        except OSError:
            shutil.copy2(target, link)


def _view_without_pickles(folder: Path, view: Path) -> Path:
    """The diffusers folder as `view`: links to everything but its pickle files, so that no loader can fall back to
    them (transformers 4.30, the webui's, reads pytorch_model.bin when model.safetensors is missing, even when told
    to use safetensors)."""
    view.mkdir()
    for item in folder.iterdir():
        if item.is_dir():
            (view / item.name).mkdir()
            for f in item.iterdir():
                if f.is_file() and not _is_pickle(f):
                    _link(f, view / item.name / f.name)
        elif item.is_file() and not _is_pickle(item):
            _link(item, view / item.name)
    return view


def _import_diffusers(source: str, working: Path, forced: str, allow_pickle: bool = False) -> dict:
    """A diffusers folder or hub id: load the pipeline (from .safetensors weights only, unless `allow_pickle`) and
    save it as the working folder."""
    local = Path(source).expanduser()
    load_from, view = (str(local) if local.is_dir() else source), None
    if local.is_dir() and not allow_pickle:
        pickled = _pickle_only_components(local)
        if pickled:
            raise UserError(f"{source}: the weights of {', '.join(pickled)} are only in pickle files (.bin), which can "
                            f"run code when loaded and are not read; {CONVERT_HINT}")
        view = _view_without_pickles(local, working.parent / ".source_view")
        load_from = str(view)
    import diffusers

    from .checkpoint.detect import detect
    from .families import MODEL_INFO_FILE
    try:
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(load_from, torch_dtype=_folder_dtype(local),
                                                               use_safetensors=None if allow_pickle else True)
        except Exception as e:  # hub errors, missing files, bad configs: all one line for the user
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e).strip() else type(e).__name__
            pickles = view is not None and any(_is_pickle(f) for f in local.glob("*/*"))
            hint = f"; its pickle weights (.bin) are not read: {CONVERT_HINT}" if pickles else (
                f"; if it has pickle weights (.bin) only, {CONVERT_HINT}" if "safetensors" in str(e) else "")
            raise UserError(f"{source}: cannot load as a diffusers model ({reason}){hint}") from e
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise UserError(f"{source}: not a Stable Diffusion pipeline ({type(pipe).__name__})")
        pipe.save_pretrained(str(working), safe_serialization=True)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    for config_path in working.glob("text_encoder*/config.json"):  # load as float32 by default, like the UNet
        data = json.loads(config_path.read_text(encoding="utf-8"))
        data.update(dtype="float32", torch_dtype="float32")
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (working / MODEL_INFO_FILE).unlink(missing_ok=True)
    detection = detect(working, forced)
    name = detection.family
    if family_facts(name).prediction_type != pipe.scheduler.config.get("prediction_type", "epsilon"):
        from diffusers import DDIMScheduler  # v2 <-> v2-v forced: the scheduler carries the prediction type
        DDIMScheduler.from_pretrained(str(working), subfolder="scheduler",
                                      prediction_type=family_facts(name).prediction_type).save_config(str(working / "scheduler"))
    info = {"family": name, "detected": detection.how, "source": source, "extras": 0, "yaml_beside_source": False}
    (working / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _folder_dtype(folder: Path):
    """The dtype of a local diffusers folder's UNet weights, so that fp16 stays fp16 (None: the loader's default)."""
    import torch

    from .checkpoint.tensorio import SafetensorsSource

    files = sorted((folder / "unet").glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    try:
        source = SafetensorsSource(files[:1])
    except UserError:
        return None
    dtypes = {source.dtype(k) for k in source.keys()}
    return dtypes.pop() if len(dtypes) == 1 and torch.float32 not in dtypes else None


def create_model(root: DataRoot, name: str, source: str, family: str = "auto", overwrite: bool = False,
                 allow_pickle: bool = False) -> ModelDir:
    model = root.model(name)  # checks the name
    check_family_choice(family)
    if model.path.exists() and not overwrite:
        raise UserError(f"model {name!r} already exists at {model.path} (use --overwrite to replace it)")
    # Replacing a model waits for nobody: a training, export or other create of it makes this one refuse.
    with model.lock("being re-created") if model.path.exists() else contextlib.nullcontext():
        if not isinstance(source, str) or not source.strip():
            raise UserError("source: must not be empty")
        path = Path(source).expanduser()
        if not path.exists() and (not HUB_ID.match(source) or path.suffix.lower() in CHECKPOINT_SUFFIXES):
            raise UserError(f"source {source!r}: no such file or folder")
        kept = "the previous model is intact" if model.path.exists() else "nothing was left behind"
        with writing_to(model.path, kept):
            root.dreambooth.mkdir(parents=True, exist_ok=True)
            _build_model(root, model, path, source, family, allow_pickle)
    return model


def _build_model(root: DataRoot, model: ModelDir, path: Path, source: str, forced: str,
                 allow_pickle: bool = False) -> None:
    """Import into a temp folder beside the final one, then swap it in (the old model goes only once it is done)."""
    from .checkpoint.convert import import_single_file

    with temporary_folder(root.dreambooth, model.name) as tmp:
        working = tmp / "working"
        if path.is_file():
            info = import_single_file(path, working, forced)
        else:
            info = _import_diffusers(str(path) if path.is_dir() else source, working, forced, allow_pickle)
        config = Config(model=ModelSettings(source=str(path.resolve()) if path.exists() else source, family=info["family"]),
                        parameters=Parameters(resolution=family_facts(info["family"]).resolution))
        config.save(tmp / "config.json")
        if model.path.exists():  # --overwrite: swap in the complete new model, then drop the old one
            old = model.path.with_name(f".{model.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(model.path, old)
            os.replace(tmp, model.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, model.path)


def export_model(root: DataRoot, name: str, fmt: str = "safetensors", half: bool = False, ema: bool = False,
                 out: Path | None = None, overwrite: bool = False) -> Path:
    """Write the working model as one checkpoint file: `out` (replacing a file there only with `overwrite`), else
    NAME_<step>.<fmt> in the checkpoints folder, or the next free name when that one is taken (dreambooth.outputs)."""
    from . import outputs
    from .checkpoint.export import FORMATS, write_single_file

    model = root.model(name)
    if not model.exists():
        raise UserError(f"model {name!r}: not found under {root.dreambooth}")
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}: must be one of {', '.join(FORMATS)}")
    with model.lock("exporting"):
        if not (model.working / "model_index.json").is_file():
            raise UserError(f"model {name!r}: its working model is missing (re-create the model)")
        training = read_training_summary(model)
        step = int(training.get("step", 0)) if training else 0
        if out:
            out = outputs.chosen(model, Path(out).expanduser(), overwrite)
        else:
            out = outputs.automatic(model, outputs.checkpoint_file(root.checkpoints, name, step, fmt))
        state_dicts = None
        if ema:
            if not (model.ema_unet / "config.json").is_file():
                raise UserError(f"model {name!r}: has no EMA weights (working/unet_ema); train with use_ema first")
            from .checkpoint.tensorio import SafetensorsSource

            state_dicts = {"unet": {}}
            for f in sorted(model.ema_unet.glob("*.safetensors")):
                source = SafetensorsSource([f])
                state_dicts["unet"].update({k: source.get(k) for k in source.keys()})
        path = write_single_file(model.working, out, fmt=fmt, half=half, state_dicts=state_dicts,
                                 metadata={"dreambooth.ema": str(ema).lower()}, training=training)
        outputs.record(model, path)  # so the model's list shows it whatever its name
        return path


def read_training_summary(model: ModelDir) -> dict | None:
    """The trainer's summary of the working weights ({"step", "epoch", ...}), or None when never trained."""
    from .config import parse_json

    path = model.training_summary
    try:
        data = parse_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
    if not isinstance(data, dict) or not isinstance(data.get("step", 0), int):
        raise UserError(f"{path}: not a training summary (restore it, or re-create the model)")
    return data


FIDELITY_FIELDS = ("dino", "clip_i", "clip_t", "copy")


def read_fidelity(model: ModelDir) -> dict:
    """The fidelity scores of the model's saves ({"best_step": step or None, "saves": [{"step", "dino", "clip_i",
    "clip_t", "copy", "saved"}]}, oldest first; "saved" is False for scores taken on Sample now); empty when none
    were scored. A damaged file reads as none."""
    from .config import parse_json
    from .store import read_bytes

    empty = {"best_step": None, "saves": []}
    try:
        data = parse_json(read_bytes(model.fidelity_scores, limit=1 << 20), str(model.fidelity_scores))
    except (FileNotFoundError, UserError):
        return empty
    saves = data.get("saves") if isinstance(data, dict) else None
    ok = isinstance(saves, list) and all(
        isinstance(s, dict) and type(s.get("step")) is int and all(isinstance(s.get(k), (int, float))
                                                                   and not isinstance(s.get(k), bool)
                                                                   for k in FIDELITY_FIELDS)
        and isinstance(s.get("saved", True), bool) for s in saves)
    best = data.get("best_step") if ok else None
    if not ok or not (best is None or type(best) is int):
        return empty
    return {"best_step": best, "saves": [{"step": s["step"], **{k: float(s[k]) for k in FIDELITY_FIELDS},
                                          "saved": s.get("saved", True)} for s in saves]}


def write_fidelity(model: ModelDir, saves: list[dict], best_step: int | None) -> None:
    atomic_write_text(model.fidelity_scores, json.dumps({"best_step": best_step, "saves": saves}, indent=1) + "\n")


def delete_model(root: DataRoot, name: str) -> None:
    """Delete a model's folder (its exported checkpoints stay); refused while another process writes it."""
    model = root.model(name)
    if not model.path.is_dir():
        raise UserError(f"model {name!r}: not found")
    with model.lock("being deleted"):
        trash = model.path.with_name(f".{name}.deleting")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(model.path, trash)  # gone from the list at once; a kill mid-delete leaves only a hidden folder
    shutil.rmtree(trash, ignore_errors=True)


def load_config(model: ModelDir) -> Config:
    """The model's settings, checked against the model itself: its `model` section is the one `create` wrote."""
    from .families import family_from_folder

    config = Config.load(model.config_path)
    if (model.working / "model_index.json").is_file():
        actual = family_from_folder(model.working)
        if config.model.family != actual:
            raise UserError(f"model {model.name!r}: its config says family {config.model.family!r}, but the model "
                            f"is a {actual} model; the family is set when a model is created (create a new model "
                            "to change it)")
    return config


def save_config(model: ModelDir, data: dict | Config, paths_fixed: bool = False) -> Config:
    """Store edited settings (a Config, or its JSON form where a missing `model` section means the current one).
    The `model` section stays what `create` made: a different one is refused. With `paths_fixed` (the REST routes),
    the folders and files of the concepts and parameters stay as they are: a route cannot make the trainer read a
    file (and echo its text in a preview) that the user did not choose in the tab or the CLI."""
    from .config import CONCEPT_SETTINGS, PARAMETER_SETTINGS, ConfigError, Problem

    current = Config.load(model.config_path)
    if isinstance(data, dict):
        data = Config.from_dict({"model": current.to_dict()["model"], **data})
    if data.model != current.model:
        changed = [k for k, v in vars(data.model).items() if getattr(current.model, k) != v]
        raise ConfigError([Problem(("model", k), "is set when the model is created and cannot be changed; create "
                                   "a new model instead") for k in changed])
    if paths_fixed:
        paths = [s.name for s in CONCEPT_SETTINGS if s.kind == "path"]
        moved = [Problem(("concepts", i, name), "folders and files are chosen in the tab or with the CLI; the REST "
                         "routes keep them as they are")
                 for i, concept in enumerate(data.concepts) for name in paths
                 if getattr(concept, name) != (getattr(current.concepts[i], name) if i < len(current.concepts) else "")]
        moved += [Problem(("parameters", s.name), "folders and files are chosen in the tab or with the CLI; the REST "
                          "routes keep them as they are")
                  for s in PARAMETER_SETTINGS if s.kind == "path"
                  and getattr(data.parameters, s.name) != getattr(current.parameters, s.name)]
        if moved:
            raise ConfigError(moved)
    data.save(model.config_path)
    return data
