"""The DreamBooth tab: Model, Concepts, Parameters and Output panels, every setting widget built from config.py.

The tab holds no state of its own: the selected model's config.json, the job file and the event log are read again on
every action and poll, so a page reload or a restarted UI shows the same thing. Training, creating and exporting run
in child processes (dreambooth.worker).
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from .. import worker
from ..access import Access, request_headers
from ..config import (CONCEPT_SETTINGS, FAMILIES, GROUPS, MIN_CONCEPTS, MODEL_SETTINGS, PARAMETER_SETTINGS, Config,
                      Setting, validate_for_training)
from ..errors import UserError
from ..events import Follower
from ..models import save_config
from ..store import reclaimed_in
from ..host import Host
from . import compat, views
from .concepts_files import concepts_folder, load_concepts, save_concepts
from .sources import detect_source_family, is_starter, starter_config, write_starter_kit

CONCEPT_PARTS = (("instance", "Instance"), ("class", "Class"), ("sample", "Sample"))
POLL_SECONDS = 1.0


# ---------------------------------------------------------------- widgets from declarations


def widget(setting: Setting, elem_id: str):
    """One gradio component for one declared setting: label, default, range and tooltip come from the declaration."""
    common = dict(label=setting.label, info=setting.tooltip, value=_shown(setting, setting.default), elem_id=elem_id)
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


def _shown(setting: Setting, value):
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


def _coerce(setting: Setting, value):
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


class Fields:
    """The setting widgets in one fixed order, and the mapping between their values and a Config."""

    def __init__(self):
        self.model: list = []  # one per MODEL_SETTINGS
        self.concepts: list[list] = []  # MIN_CONCEPTS lists, one per CONCEPT_SETTINGS
        self.parameters: dict = {}  # name -> component

    @property
    def components(self) -> list:
        return self.model + [c for concept in self.concepts for c in concept] + [
            self.parameters[s.name] for s in PARAMETER_SETTINGS]

    def to_config(self, values, saved: Config | None = None) -> Config:
        """The config the widgets show. The tab shows MIN_CONCEPTS concept slots: the concepts of a `saved` config
        beyond those (a config may hold up to 100) are kept after the shown ones."""
        values = list(values)
        n_model, n_concept = len(MODEL_SETTINGS), len(CONCEPT_SETTINGS)
        model = {s.name: _coerce(s, v) for s, v in zip(MODEL_SETTINGS, values[:n_model])}
        concepts = []
        rest = values[n_model:]
        for i in range(MIN_CONCEPTS):
            chunk = rest[i * n_concept:(i + 1) * n_concept]
            concept = {s.name: _coerce(s, v) for s, v in zip(CONCEPT_SETTINGS, chunk)}
            if any(concept[s.name] != s.default for s in CONCEPT_SETTINGS):  # untouched slots are not saved
                concepts.append(concept)
        concepts += [asdict(c) for c in (saved.concepts[MIN_CONCEPTS:] if saved else ())]
        params_values = rest[MIN_CONCEPTS * n_concept:]
        parameters = {s.name: _coerce(s, v) for s, v in zip(PARAMETER_SETTINGS, params_values)}
        return Config.from_dict({"model": model, "concepts": concepts, "parameters": parameters})

    @staticmethod
    def values(config: Config) -> list:
        model = asdict(config.model)
        out = [model[s.name] for s in MODEL_SETTINGS]
        for i in range(MIN_CONCEPTS):
            concept = asdict(config.concepts[i]) if i < len(config.concepts) else {}
            out += [_shown(s, concept.get(s.name, s.default)) for s in CONCEPT_SETTINGS]
        params = asdict(config.parameters)
        return out + [_shown(s, params[s.name]) for s in PARAMETER_SETTINGS]


def _message(text: str, css: str, state: str = "", fields=()) -> str:
    """A message beside the buttons that caused it. `state`: the run's state when it was written (the page hides it
    once the run has moved on); `fields`: the elem_ids of the fields it is about (the page marks them)."""
    attrs = f' data-state="{state}"' if state else ""
    attrs += f' data-fields="{" ".join(fields)}"' if fields else ""
    return f'<div class="{css}"{attrs}>{html.escape(text)}</div>'


def _error(e: Exception, state: str = "") -> str:
    text, fields = views.explain(e)
    return _message(f"Error: {text}", "db-error", state, fields)


def _info(text: str, state: str = "") -> str:
    return _message(text, "db-info", state)


def preset_sizes() -> tuple:
    from ..train.memory import PRESET_SIZES  # the planner imports torch: the webui has it loaded anyway

    return PRESET_SIZES


def free_gpu_gib() -> float | None:
    """Free memory of this machine's GPU in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def checked(access: Access, fn, outputs: list, message=None):
    """`fn` as a handler behind the access rule (dreambooth.access): a refused call changes nothing, and `message`
    (one of `outputs`, where the handler has one) says why. Every handler of the tab is wired through this."""

    def handler(request, *values):
        refusal = access.refusal(request_headers(request))
        if refusal is None:
            return fn(*values)
        result = [compat.unchanged()] * len(outputs)
        if message is not None:
            result[outputs.index(message)] = _message(f"Error: {refusal}", "db-error")
        return result[0] if len(outputs) == 1 else result

    handler.__annotations__ = {"request": gr.Request}  # gradio passes the request to a parameter typed so
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.access_checked = fn
    return handler


EXPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()\-]{0,119}$")
START_FROM = ("Resume the saved run", "Start over from the source checkpoint")
JAVASCRIPT = Path(__file__).resolve().parents[2] / "javascript" / "dreambooth.js"


# ---------------------------------------------------------------- the tab


def build(host: Host) -> gr.Blocks:
    root = host.root
    fields = Fields()
    follower = Follower()  # each poll reads only what the run's log gained since the last one

    with compat.blocks(analytics_enabled=False, title="DreamBooth", elem_id="dreambooth_tab") as tab:
        with gr.Row(elem_id="db_layout", equal_height=False):
            with gr.Column(scale=3, elem_id="db_form"):
                with gr.Row(elem_id="db_model_row"):
                    model_select = gr.Dropdown(label="Model", choices=root.model_names(), value=None,
                                               elem_id="db_model_select", scale=4,
                                               info="The DreamBooth model to edit and train; its settings load into the panels.")
                    with gr.Column(scale=1, min_width=160):
                        refresh_btn = gr.Button("Refresh lists", elem_id="db_refresh", size="sm")
                        load_btn = gr.Button("Load settings", elem_id="db_load", size="sm")
                        save_btn = gr.Button("Save settings", elem_id="db_save", size="sm")
                settings_msg = gr.HTML(elem_id="db_settings_message")
                with gr.Tabs(elem_id="db_panels"):
                    with gr.Tab("Model", elem_id="db_model_panel"):
                        with gr.Accordion("Create a model", open=True, elem_id="db_create"):
                            new_name = gr.Textbox(label="New model name", elem_id="db_new_name",
                                                  info="Letters, digits, spaces, '_', '-' and '.'.")
                            checkpoint = gr.Dropdown(label="From a checkpoint", choices=list(host.checkpoints()),
                                                     value=None, elem_id="db_checkpoint",
                                                     info="The host's checkpoint list (models/Stable-diffusion).")
                            source_text = gr.Textbox(label="Or a file, a diffusers folder or a hub id",
                                                     elem_id="db_source",
                                                     info="Used instead of the list when filled in.")
                            with gr.Row():
                                family = gr.Dropdown(label="Model family", choices=["auto", *FAMILIES], value="auto",
                                                     elem_id="db_family",
                                                     info="auto: detected from the checkpoint. Override it for a 768 v-prediction v2 model without a yaml.")
                                detected = gr.HTML(elem_id="db_detected")
                            overwrite = gr.Checkbox(label="Overwrite", value=False, info="Replace a model of the same name.",
                                                    elem_id="db_overwrite")
                            with gr.Row():
                                create_btn = gr.Button("Create model", variant="primary", elem_id="db_create_btn")
                                starter_btn = gr.Button("Get the built-in tiny model and demo images",
                                                        elem_id="db_starter", visible=not host.checkpoints())
                        model_msg = gr.HTML(elem_id="db_model_message")
                        with gr.Accordion("The selected model", open=False, elem_id="db_model_facts"):
                            for s in MODEL_SETTINGS:  # of the selected model: set when it was created
                                w = widget(s, f"db_model_{s.name}")
                                w.interactive = False
                                fields.model.append(w)
                        with gr.Accordion("Delete the selected model", open=False, elem_id="db_delete_box"):
                            with gr.Row():
                                delete_confirm = gr.Checkbox(label="Yes, delete this model and its files",
                                                             value=False, elem_id="db_delete_confirm")
                                delete_btn = gr.Button("Delete model", variant="stop", elem_id="db_delete")
                            delete_msg = gr.HTML(elem_id="db_delete_message")
                    with gr.Tab("Concepts", elem_id="db_concepts_panel"):
                        with gr.Row():
                            concepts_path = gr.Textbox(label="Concepts file", elem_id="db_concepts_path",
                                                       info=f"A file name in {concepts_folder(root)} (a list of "
                                                            "concepts). Load also takes a model's name.")
                            load_concepts_btn = gr.Button("Load concepts", elem_id="db_load_concepts", scale=0)
                            save_concepts_btn = gr.Button("Save concepts", elem_id="db_save_concepts", scale=0)
                        concepts_msg = gr.HTML(elem_id="db_concepts_message")
                        with gr.Tabs():
                            for i in range(MIN_CONCEPTS):
                                with gr.Tab(f"Concept {i + 1}", elem_id=f"db_concept_{i}"):
                                    by_name = {}
                                    with gr.Tabs():
                                        for group, title in CONCEPT_PARTS:
                                            with gr.Tab(title, elem_id=f"db_concept_{i}_{group}"):
                                                for s in CONCEPT_SETTINGS:
                                                    if s.group == group:
                                                        by_name[s.name] = widget(s, f"db_c{i}_{s.name}")
                                    fields.concepts.append([by_name[s.name] for s in CONCEPT_SETTINGS])
                    with gr.Tab("Parameters", elem_id="db_parameters_panel"):
                        groups = list(GROUPS) + sorted({s.group for s in PARAMETER_SETTINGS} - set(GROUPS))
                        for group in groups:
                            title = {"lora": "LoRA"}.get(group, group.capitalize())
                            with gr.Accordion(title, open=group in GROUPS[:2],
                                              elem_id=f"db_group_{group.replace(' ', '_')}"):
                                for s in PARAMETER_SETTINGS:
                                    if s.group == group:
                                        fields.parameters[s.name] = widget(s, f"db_p_{s.name}")
            with gr.Column(scale=2, elem_id="db_output_panel"):
                status_md = gr.HTML(views.status_line(None), elem_id="db_status")
                progress = gr.HTML(views.progress_bar(None), elem_id="db_progress_box")
                with gr.Row(elem_id="db_run_row"):
                    train_btn = gr.Button("Train", variant="primary", elem_id="db_train", min_width=80)
                    pause_btn = gr.Button("Pause", elem_id="db_pause", min_width=80)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="db_cancel", min_width=80)
                with gr.Row(elem_id="db_run_row2"):
                    save_now_btn = gr.Button("Save now", elem_id="db_save_now", size="sm", min_width=80)
                    sample_now_btn = gr.Button("Sample now", elem_id="db_sample_now", size="sm", min_width=80)
                start_from = gr.Radio(label="Train a model that has a saved run", choices=list(START_FROM),
                                      value=START_FROM[0], elem_id="db_start_from",
                                      info="Resume where the last run stopped, or start over from the source "
                                           "checkpoint (the settings and class images stay; the saves go).")
                resume_from = gr.Dropdown(label="Resume from", choices=[], value=None, visible=False,
                                          elem_id="db_resume_from",
                                          info="An earlier save goes on from its step (Parameters › Saving › Saves "
                                               "to go back to sets how many are kept).")
                run_msg = gr.HTML(elem_id="db_run_message")
                with gr.Accordion("Memory: plan and VRAM presets", open=False, elem_id="db_memory_box"):
                    with gr.Row():
                        vram = gr.Number(label="GPU memory (GB)", value=None, elem_id="db_vram",
                                         info="Empty: the free memory of this machine's GPU, if it has one.")
                        preset = gr.Dropdown(label="VRAM preset", choices=[str(g) for g in preset_sizes()],
                                             value=None, elem_id="db_preset",
                                             info="Sets the memory settings to the fastest ones that fit this size.")
                    with gr.Row():
                        plan_btn = gr.Button("Plan memory", elem_id="db_plan", size="sm")
                        preset_btn = gr.Button("Apply preset", elem_id="db_apply_preset", size="sm")
                    plan_msg = gr.HTML(elem_id="db_plan_message")
                    last_plan = gr.State(None)  # {"name", "fits", "warned"}: Train warns once before a run that won't fit
                chart = gr.HTML(views.loss_chart([]), elem_id="db_chart_box")
                gallery = gr.Gallery(label="Previews", columns=3, height=300, elem_id="db_gallery")
                checkpoints_md = gr.HTML(views.checkpoint_list([]), elem_id="db_checkpoints")
                with gr.Accordion("Export the working model", open=False, elem_id="db_export_box"):
                    with gr.Row():
                        export_name = gr.Textbox(label="File name", elem_id="db_export_name",
                                                 info="Without extension; empty: MODEL_<step>. Written to "
                                                      "models/Stable-diffusion.")
                        export_overwrite = gr.Checkbox(label="Overwrite an existing file", value=False,
                                                       elem_id="db_export_overwrite")
                    export_btn = gr.Button("Export checkpoint", elem_id="db_export")
                    export_msg = gr.HTML(elem_id="db_export_message")
                with gr.Accordion("Extract a LoRA from the fine-tune", open=False, elem_id="db_extract_box"):
                    with gr.Row():
                        extract_rank = gr.Number(label="UNet rank", value=32, precision=0, elem_id="db_extract_rank",
                                                 info="Low-rank SVD of trained minus base weights, per layer.")
                        extract_te_rank = gr.Number(label="Text encoder rank", value=None, precision=0,
                                                    elem_id="db_extract_te_rank", info="Empty: the UNet rank.")
                    extract_btn = gr.Button("Extract LoRA", elem_id="db_extract")
                    extract_msg = gr.HTML(elem_id="db_extract_message")
                log_box = gr.Textbox(label="Trainer log", lines=8, max_lines=16, interactive=False,
                                     elem_id="db_log")
                shown = gr.State(None)  # what this page shows now, so a poll only sends what changed

        settings = fields.components

        # ------------------------------------------------------------ handlers

        def run_state(name) -> str:
            """The state the output column shows for `name` now (messages are stamped with it)."""
            job = worker.running_job(root)
            name = job["name"] if job else name
            try:
                return worker.status(root, name, follower).state if name and root.model(name).path.is_dir() else "none"
            except UserError:
                return "none"

        def select_model(name):
            """Load a model's config into the panels (selecting says nothing: the panels show it)."""
            if not name:
                return [compat.unchanged()] * len(settings) + [compat.unchanged()]
            try:
                config = Config.load(root.model(name).config_path)
            except UserError as e:
                return [compat.unchanged()] * len(settings) + [_error(e)]
            return Fields.values(config) + [compat.unchanged()]

        def on_load(name):
            if not name:
                return [compat.unchanged()] * len(settings) + [_info("Select a model first.")]
            try:
                config = Config.load(root.model(name).config_path)
            except UserError as e:
                return [compat.unchanged()] * len(settings) + [_error(e)]
            return Fields.values(config) + [_info(f"Loaded the saved settings of {name}.")]

        def save_settings(name, values) -> Config:
            if not name:
                raise UserError("no model selected: create one or select one in the Model panel")
            model = root.model(name)
            if not model.exists():
                raise UserError(f"model {name!r}: not found")
            return save_config(model, fields.to_config(values, saved_config(model)))

        def saved_config(model) -> Config | None:
            try:
                return Config.load(model.config_path)
            except UserError:
                return None

        def on_save(name, *values):
            try:
                save_settings(name, values)
                return _info(f"Saved the settings of {name}.")
            except UserError as e:
                return _error(e)

        def on_plan(name, vram_gb, *values):
            try:
                if not name:
                    raise UserError("no model selected")
                from ..train.memory import plan_report  # torch: imported when needed

                text, fits = plan_report(root, name, float(vram_gb) if vram_gb else free_gpu_gib(),
                                         fields.to_config(values).parameters)
                return _message(text, "db-info db-plan"), {"name": name, "fits": fits, "warned": False}
            except UserError as e:
                return _error(e), None

        def on_preset(name, size):
            try:
                if not name or not size:
                    raise UserError("choose a model and a VRAM preset")
                from ..train.memory import apply_preset

                said = apply_preset(root, name, float(size))
                return Fields.values(Config.load(root.model(name).config_path)) + [_info(said)]
            except UserError as e:
                return [compat.unchanged()] * len(settings) + [_error(e)]

        def on_extract(name, rank, te_rank):
            try:
                if not name:
                    raise UserError("no model selected")
                if rank is None or int(rank) < 1:
                    raise UserError("UNet rank: enter a whole number of at least 1")
                said = worker.extract_lora(root, name, int(rank), int(te_rank) if te_rank else None, host)
                return _info(said), panel(name)["checkpoints"]
            except UserError as e:
                return _error(e), compat.unchanged()

        def on_train(name, start, resume, plan, *values):
            state = run_state(name)
            if plan and plan.get("name") == name and plan.get("fits") is False and not plan.get("warned"):
                return (_message("The memory plan says this run does not fit the GPU (see Memory above). Press "
                                 "Train again to start it anyway, or apply a VRAM preset.", "db-error", state),
                        {**plan, "warned": True})
            try:
                if not name:
                    raise UserError("no model selected: create one or select one in the Model panel")
                job = worker.running_job(root)
                if job:
                    raise worker.JobRunningError(f"{job['name']} is training; cancel it or wait until it ends")
                model = root.model(name)
                config = fields.to_config(values, saved_config(model))
                validate_for_training(config)  # refused before anything is written
                earlier_save = views.chosen_save(resume)
                if start == START_FROM[1]:
                    worker.start_over(root, name)
                elif earlier_save is not None:
                    worker.go_back(root, name, earlier_save)
                save_config(model, config)  # what the trainer uses is what the panels show
                from ..train.saves import saved_step

                saved = saved_step(model.state)
                job = worker.start(root, name, host)
                where = f"resuming at step {saved}" if saved else "from step 0"
                return _info(f"Training {job['name']} started, {where}.", run_state(name)), plan
            except UserError as e:
                return _error(e, state), plan

        def control(what):
            def handler(name):
                job = worker.running_job(root)
                state = run_state(name)
                try:
                    return _info(worker.request(root, job["name"] if job else (name or ""), what).capitalize() + ".",
                                 state)
                except UserError as e:
                    return _error(e, state)
            return handler

        def on_export(name, file_name, replace, *values):
            try:
                if not name:
                    raise UserError("no model selected")
                params = fields.to_config(values).parameters
                stem = (file_name or "").strip()
                if stem.lower().endswith((".safetensors", ".ckpt")):
                    stem = stem.rsplit(".", 1)[0]
                if stem and not EXPORT_NAME.match(stem):
                    raise UserError(f"file name {stem!r}: use letters, digits, spaces and _ - . ( )")
                out = root.checkpoints / f"{stem}.{params.checkpoint_format}" if stem else None  # None: NAME_<step>
                said = worker.export(root, name, params.checkpoint_format, params.save_half,
                                     params.use_ema and params.save_ema_weights, host, out, overwrite=bool(replace))
                written = [line[len("wrote "):] for line in said.splitlines() if line.startswith("wrote ")]
                return (_info(f"Exported {written[-1] if written else out}. {reclaimed_in(said)}".strip()),
                        panel(name)["checkpoints"])
            except UserError as e:
                return _error(e), compat.unchanged()

        def model_choices(selected=None):
            names = root.model_names()
            return compat.update(choices=names, value=selected if selected in names else None)

        def on_refresh(name):
            return model_choices(name), compat.update(choices=list(host.checkpoints()))

        def on_delete(name, confirmed):
            try:
                if not name:
                    raise UserError("no model selected")
                if not confirmed:
                    raise UserError("tick 'Yes, delete this model' first")
                worker.delete_model(root, name)
                return model_choices(None), False, _info(f"Deleted {name}.")
            except UserError as e:
                return compat.unchanged(), compat.unchanged(), _error(e)

        def on_source(checkpoint_title, text):
            source = (text or "").strip() or host.checkpoints().get(checkpoint_title or "", "")
            return _message(detect_source_family(source), "db-detected") if source else ""

        def on_create(name, checkpoint_title, text, family_choice, replace):
            try:
                name = (name or "").strip()
                source = (text or "").strip() or host.checkpoints().get(checkpoint_title or "", checkpoint_title or "")
                if root.model(name).path.exists() and not replace:
                    raise UserError(f"a model named {name!r} exists: tick 'Overwrite' to replace it, or choose "
                                    "another name")
                said = worker.create(root, name, source, family_choice, overwrite=bool(replace))
                model = root.model(name)
                config = Config.load(model.config_path)
                note = ""
                if is_starter(source):
                    config = save_config(model, starter_config(root, config))
                    note = (" Settings for a first run of about a minute on a CPU are filled in (resolution 64, "
                            "6 epochs, the demo images as concept 1): press Train.")
                return [model_choices(model.name)] + Fields.values(config) + [
                    _info(f"Created {model.name} ({config.model.family}) from {source}.{note} {reclaimed_in(said)}".strip())]
            except UserError as e:
                return [compat.unchanged()] + [compat.unchanged()] * len(settings) + [_error(e)]

        def on_starter():
            try:
                text = write_starter_kit(root)
                return compat.update(choices=list(host.checkpoints())), compat.update(visible=False), _info(text)
            except UserError as e:
                return compat.unchanged(), compat.unchanged(), _error(e)

        def on_load_concepts(text):
            try:
                config, path = load_concepts(root, text)
                values = Fields.values(config)[len(MODEL_SETTINGS):len(MODEL_SETTINGS) + MIN_CONCEPTS * len(CONCEPT_SETTINGS)]
                return values + [_info(f"Loaded {len(config.concepts)} concept(s) from {path}.")]
            except UserError as e:
                return [compat.unchanged()] * (MIN_CONCEPTS * len(CONCEPT_SETTINGS)) + [_error(e)]

        def on_save_concepts(text, *values):
            try:
                config = fields.to_config(values)
                path = save_concepts(root, text, config)
                return _info(f"Saved {len(config.concepts)} concept(s) to {path}.")
            except UserError as e:
                return _error(e)

        def checkpoint_titles() -> dict:
            """The host's name of each checkpoint file (what its checkpoint list shows), by real path."""
            return {os.path.realpath(path): title for title, path in host.checkpoints().items()}

        def panel(name) -> dict:
            """The output panel's content for a model (its running or last training)."""
            st = worker.status(root, name, follower) if name and root.model(name).path.is_dir() else None
            try:
                custom = Config.load(root.model(name).config_path).parameters.checkpoint_name if st else ""
            except UserError:
                custom = ""
            files = worker.model_checkpoints(root, name, st.checkpoints, custom) if st else []
            return {
                "status": views.status_line(st),
                "progress": views.progress_bar(st),
                "chart": views.loss_chart(st.losses if st else [], st.validation if st else []),
                "gallery": [list(item) for item in views.previews(root.model(name).samples)] if st else [],
                "checkpoints": views.checkpoint_list(files, checkpoint_titles(), root.lora),
                "log": st.log_tail if st else "",
                "saves": saves_update(name),
            }

        def saves_update(name):
            choices = views.save_choices(worker.kept_saves(root, name)) if name and root.model(name).exists() else []
            return compat.update(choices=choices, value=choices[0] if choices else None, visible=len(choices) > 1)

        def show_model(name):
            """A one-off refresh of the output panel when a model is selected."""
            now = panel(name)
            return list(now.values()) + [now]

        def poll(last):
            """The running job's progress (or the last job's end), sending only what changed since `last`.

            It takes no other input on purpose: gradio 3 polls with the inputs of the page's first call. Once the
            job has ended (and its end was shown), it stops sending, so a model selected afterwards stays shown.
            """
            job = worker.last_job(root)
            if job is None or not (worker.running_job(root) or worker.recently_active(root, job["name"])):
                # Nothing running: leave the panel to whatever model the page selected.
                return [compat.unchanged()] * 7 + [last]
            now = panel(job["name"])
            last = last or {}
            return [now[k] if now[k] != last.get(k) else compat.unchanged() for k in now] + [now]

        # ------------------------------------------------------------ wiring

        def on(event, fn, inputs, outputs, message=None):
            event(checked(host.access, fn, outputs, message), inputs, outputs)

        panel_outputs = [status_md, progress, chart, gallery, checkpoints_md, log_box, resume_from, shown]
        on(model_select.change, select_model, [model_select], settings + [model_msg], model_msg)
        on(model_select.change, show_model, [model_select], panel_outputs)
        on(load_btn.click, on_load, [model_select], settings + [settings_msg], settings_msg)
        on(save_btn.click, on_save, [model_select] + settings, [settings_msg], settings_msg)
        on(train_btn.click, on_train, [model_select, start_from, resume_from, last_plan] + settings,
           [run_msg, last_plan], run_msg)
        on(plan_btn.click, on_plan, [model_select, vram] + settings, [plan_msg, last_plan], plan_msg)
        on(preset_btn.click, on_preset, [model_select, preset], settings + [plan_msg], plan_msg)
        on(extract_btn.click, on_extract, [model_select, extract_rank, extract_te_rank], [extract_msg, checkpoints_md],
           extract_msg)
        for btn, what in ((cancel_btn, "cancel"), (pause_btn, "pause"), (save_now_btn, "save"),
                          (sample_now_btn, "sample")):
            on(btn.click, control(what), [model_select], [run_msg], run_msg)
        on(export_btn.click, on_export, [model_select, export_name, export_overwrite] + settings,
           [export_msg, checkpoints_md], export_msg)
        on(refresh_btn.click, on_refresh, [model_select], [model_select, checkpoint])
        on(delete_btn.click, on_delete, [model_select, delete_confirm], [model_select, delete_confirm, delete_msg],
           delete_msg)
        on(checkpoint.change, on_source, [checkpoint, source_text], [detected])
        on(source_text.change, on_source, [checkpoint, source_text], [detected])
        on(create_btn.click, on_create, [new_name, checkpoint, source_text, family, overwrite],
           [model_select] + settings + [model_msg], model_msg)
        on(starter_btn.click, on_starter, [], [checkpoint, starter_btn, model_msg], model_msg)
        concept_components = [c for concept in fields.concepts for c in concept]
        on(load_concepts_btn.click, on_load_concepts, [concepts_path], concept_components + [concepts_msg],
           concepts_msg)
        on(save_concepts_btn.click, on_save_concepts, [concepts_path] + settings, [concepts_msg], concepts_msg)
        compat.every(tab, POLL_SECONDS, checked(host.access, poll, panel_outputs), shown, panel_outputs)

        def on_page_load():
            job = worker.running_job(root)
            names = root.model_names()
            selected = job["name"] if job else (names[0] if names else None)
            return [compat.update(choices=names, value=selected), compat.update(choices=list(host.checkpoints())),
                    compat.update(visible=not host.checkpoints())]

        on(tab.load, on_page_load, [], [model_select, checkpoint, starter_btn])
        if host.name != "webui" and JAVASCRIPT.is_file():  # the webui injects javascript/ itself
            compat.run_js_on_load(tab, JAVASCRIPT.read_text(encoding="utf-8"))
    return tab
