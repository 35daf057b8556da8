"""The tab's concepts files: saved in and loaded from one folder of the data root, whatever path the page sends.

Gradio-free, so that the rules can be tested (and reused) without the UI.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import MAX_CONFIG_BYTES, MIN_CONCEPTS, Config, parse_json
from ..errors import UserError
from ..store import NAME_PATTERN, DataRoot, atomic_write_text

# Concepts files live in one folder of the data root; model names start with a letter or digit, so no model can
# take this folder's name. The tab reads and writes nowhere else, whatever path the page sends.
CONCEPTS_FOLDER = "_concepts"


def concepts_folder(root: DataRoot) -> Path:
    return root.dreambooth / CONCEPTS_FOLDER


def _json_name(text) -> str:
    name = (text or "").strip()
    return name if name.lower().endswith(".json") else name + ".json"


def save_concepts(root: DataRoot, text: str, config: Config) -> Path:
    """Write the config's concepts as `<models/dreambooth>/_concepts/NAME.json`: a file name only, never a path."""
    folder = concepts_folder(root)
    name = _json_name(text)
    if name == ".json":
        raise UserError(f"concepts file: enter a file name (it is saved in {folder})")
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(f"concepts file {text.strip()!r}: a file name only, of letters, digits, spaces, '_', '-' "
                        f"and '.' (it is saved in {folder})")
    path = folder / name
    if folder.exists() and not folder.resolve().is_relative_to(root.dreambooth.resolve()):
        raise UserError(f"concepts folder {folder}: leads outside {root.dreambooth}; nothing was written")
    try:
        atomic_write_text(path, json.dumps(config.to_dict()["concepts"], indent=2) + "\n")
    except OSError as e:
        raise UserError(f"concepts file {path}: cannot be written ({e.strerror or type(e).__name__})") from e
    return path


def load_concepts(root: DataRoot, text: str) -> tuple[Config, Path]:
    """The concepts of a file in the concepts folder, of a model (by its name: its config.json), or of any JSON file
    under models/dreambooth. Nothing outside is read, and no error quotes what the file holds."""
    folder, allowed = concepts_folder(root), root.dreambooth
    given = (text or "").strip()
    if not given:
        raise UserError(f"concepts file: enter a file name from {folder}")
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = folder / (given if path.suffix.lower() == ".json" else _json_name(given))
        if not path.exists() and given in root.model_names():
            path = root.model(given).config_path
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(allowed.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise UserError(f"concepts file {given!r}: only files under {allowed} can be loaded "
                        f"(saved concepts are in {folder}; a model's config.json works too)")
    if not resolved.is_file():
        raise UserError(f"concepts file {given!r}: not found (saved concepts are in {folder})")
    if resolved.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"concepts file {given!r}: larger than {MAX_CONFIG_BYTES} bytes, not a concepts file")
    try:
        raw = resolved.read_bytes()
    except OSError as e:
        raise UserError(f"concepts file {given!r}: cannot be read ({e.strerror or type(e).__name__})") from e
    data = parse_json(raw, f"concepts file {given!r}")
    if isinstance(data, dict) and "concepts" in data:  # a whole config.json is fine too
        data = data["concepts"]
    if not isinstance(data, list):
        raise UserError(f"concepts file {given!r}: not a concepts file (expected a list of concepts, or a config.json)")
    try:
        config = Config.from_dict({"concepts": data})
    except UserError:  # its message would quote the file's keys and values: not chained, on purpose
        raise UserError(f"concepts file {given!r}: its concepts do not fit the settings of this version "
                        "(save them again from the tab, or compare with a model's config.json)") from None
    if len(config.concepts) > MIN_CONCEPTS:
        raise UserError(f"concepts file {given!r}: {len(config.concepts)} concepts, the tab has {MIN_CONCEPTS} slots")
    return config, resolved
