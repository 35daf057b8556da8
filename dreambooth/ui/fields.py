"""The tab's setting widgets, built from the declarations in config.py, and the mapping between what a page holds
(values keyed by each widget's elem_id) and a Config."""
from __future__ import annotations

from dataclasses import asdict

import gradio as gr

from ..config import CONCEPT_SETTINGS, MIN_CONCEPTS, MODEL_SETTINGS, PARAMETER_SETTINGS, Config, Setting


def model_id(setting: Setting) -> str:
    return f"db_model_{setting.name}"


def concept_id(index: int, setting: Setting) -> str:
    return f"db_c{index}_{setting.name}"


def parameter_id(setting: Setting) -> str:
    return f"db_p_{setting.name}"


MODEL_IDS = [model_id(s) for s in MODEL_SETTINGS]
CONCEPT_IDS = [concept_id(i, s) for i in range(MIN_CONCEPTS) for s in CONCEPT_SETTINGS]
PARAMETER_IDS = [parameter_id(s) for s in PARAMETER_SETTINGS]
SETTING_IDS = MODEL_IDS + CONCEPT_IDS + PARAMETER_IDS  # every setting widget of the tab


def widget(setting: Setting, elem_id: str):
    """One gradio component for one declared setting: label, default, range and tooltip come from the declaration."""
    common = dict(label=setting.label, info=setting.tooltip, value=shown(setting, setting.default), elem_id=elem_id)
    if setting.type is bool:
        return gr.Checkbox(**common)
    if setting.choices:
        return gr.Dropdown(choices=list(setting.choices), **common)
    if setting.kind == "scientific":  # a learning rate reads best as 2e-06
        return gr.Textbox(max_lines=1, **common)
    if setting.type in (int, float):
        bounded = setting.min is not None and setting.max is not None and setting.step is not None
        if bounded and (setting.max - setting.min) / setting.step <= 10000:
            return gr.Slider(minimum=setting.min, maximum=setting.max, step=setting.step, **common)
        return gr.Number(minimum=setting.min, maximum=setting.max, precision=0 if setting.type is int else None,
                         **common)
    return gr.Textbox(lines=2 if setting.kind == "prompt" else 1, max_lines=4, **common)


def shown(setting: Setting, value):
    """A setting's value as its widget shows it: a "scientific" number as 2e-06 or 1.23456789e-06, with the fewest
    digits that read back as the same number (saving untouched settings never rounds them)."""
    if setting.kind != "scientific" or not isinstance(value, (int, float)) or value == 0:
        return value
    for digits in range(17):
        text = f"{value:.{digits}e}"
        if float(text) == value:
            break
    mantissa, exponent = text.split("e")
    return f"{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{exponent}"


def coerce(setting: Setting, value):
    """Gradio gives floats for whole numbers and None for an emptied field; the config check names what is left."""
    if setting.kind == "scientific" and isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else None
        except ValueError:
            return value
    if setting.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if setting.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def form_config(form: dict, saved: Config | None = None) -> Config:
    """The config a page's widgets show. The tab shows MIN_CONCEPTS concept slots: the concepts of a `saved` config
    beyond those (a config may hold up to 100) are kept after the shown ones."""
    model = {s.name: coerce(s, form[model_id(s)]) for s in MODEL_SETTINGS}
    concepts = []
    for i in range(MIN_CONCEPTS):
        concept = {s.name: coerce(s, form[concept_id(i, s)]) for s in CONCEPT_SETTINGS}
        if any(concept[s.name] != s.default for s in CONCEPT_SETTINGS):  # untouched slots are not saved
            concepts.append(concept)
    concepts += [asdict(c) for c in (saved.concepts[MIN_CONCEPTS:] if saved else ())]
    parameters = {s.name: coerce(s, form[parameter_id(s)]) for s in PARAMETER_SETTINGS}
    return Config.from_dict({"model": model, "concepts": concepts, "parameters": parameters})


def setting_values(config: Config) -> dict:
    """What each setting widget shows for `config`, keyed by elem_id (empty concept slots show the defaults)."""
    model, params = asdict(config.model), asdict(config.parameters)
    values = {model_id(s): model[s.name] for s in MODEL_SETTINGS}
    for i in range(MIN_CONCEPTS):
        concept = asdict(config.concepts[i]) if i < len(config.concepts) else {}
        values.update({concept_id(i, s): shown(s, concept.get(s.name, s.default)) for s in CONCEPT_SETTINGS})
    values.update({parameter_id(s): shown(s, params[s.name]) for s in PARAMETER_SETTINGS})
    return values

