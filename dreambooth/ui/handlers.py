"""What the tab's buttons and polls do: one plain function per event, `handler(page, form) -> updates`.

`form` holds the values the event sends, keyed by the elem_id of each input (a gr.State by its name in tab.STATES);
the updates returned are keyed the same way, and only the outputs named change. Every operation is an action
(dreambooth.actions); a handler turns the page's values into its inputs and its outcome (or UserError) into
messages. Nothing here holds state: the model's files, the job file and the event log are read again on each call.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

from .. import actions, jobs
from ..config import Config
from ..errors import UserError
from ..events import Follower
from ..host import Host
from . import compat, views
from .concepts_files import load_concepts as read_concepts, save_concepts as write_concepts
from .fields import CONCEPT_IDS, form_config, setting_values

START_FROM = ("Go on from the last save", "Start over from the source checkpoint")
# The output column's parts, as `panel` fills them.
PANEL_IDS = ("db_status", "db_progress_box", "db_chart_box", "db_fidelity", "db_gallery", "db_checkpoints", "db_log",
             "db_resume_from", "db_start_from")


@dataclass
class Page:
    """What every handler may use: the host (its data root, checkpoint lists, access rule) and the follower that
    reads only what a run's log gained since the last poll."""

    host: Host
    follower: Follower = field(default_factory=Follower)

    @property
    def root(self):
        return self.host.root


# ---------------------------------------------------------------- messages


def message(text: str, css: str, state: str = "", fields=()) -> str:
    """A message beside the buttons that caused it. `state`: the run's state when it was written (the page hides it
    once the run has moved on); `fields`: the elem_ids of the fields it is about (the page marks them)."""
    attrs = f' data-state="{state}"' if state else ""
    attrs += f' data-fields="{" ".join(fields)}"' if fields else ""
    return f'<div class="{css}"{attrs}>{html.escape(text)}</div>'


def error(e: Exception, state: str = "") -> str:
    text, fields = views.explain(e)
    return message(f"Error: {text}", "db-error", state, fields)


def info(text: str, state: str = "") -> str:
    return message(text, "db-info", state)


def run_state(page: Page, name) -> str:
    """The state the output column shows for `name` now (messages are stamped with it)."""
    root = page.root
    job = jobs.running_job(root)
    name = job["name"] if job else name
    try:
        return jobs.status(root, name, page.follower).state if name and root.model(name).path.is_dir() else "none"
    except UserError:
        return "none"


# ---------------------------------------------------------------- the model and its settings


def model_choices(page: Page, selected=None):
    names = page.root.model_names()
    return compat.update(choices=names, value=selected if selected in names else None)


def checkpoint_choices(page: Page):
    return compat.update(choices=list(page.host.checkpoints()))


def select_model(page: Page, form: dict) -> dict:
    """Load a model's config into the panels (selecting says nothing: the panels show it)."""
    name = form["db_model_select"]
    if not name:
        return {}
    try:
        return setting_values(Config.load(page.root.model(name).config_path))
    except UserError as e:
        return {"db_model_message": error(e)}


def load_settings(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    if not name:
        return {"db_settings_message": info("Select a model first.")}
    try:
        config = Config.load(page.root.model(name).config_path)
    except UserError as e:
        return {"db_settings_message": error(e)}
    return {**setting_values(config), "db_settings_message": info(f"Loaded the saved settings of {name}.")}


def shown_config(page: Page, form: dict) -> Config:
    """The config the page shows, keeping the saved concepts it has no slots for."""
    name = form.get("db_model_select")
    return form_config(form, actions.saved_config(page.root, name) if name else None)


def save_settings(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    try:
        config = actions.save_settings(page.root, name, shown_config(page, form))
        length = actions.run_length(config)
        return {"db_settings_message": info(f"Saved the settings of {name}" + (f": a run of {length}." if length
                                                                              else "."))}
    except UserError as e:
        return {"db_settings_message": error(e)}


def detect_source(page: Page, form: dict) -> dict:
    from ..sources import detect_source_family

    source = (form["db_source"] or "").strip() or page.host.checkpoints().get(form["db_checkpoint"] or "", "")
    return {"db_detected": message(detect_source_family(source), "db-detected") if source else ""}


def create(page: Page, form: dict) -> dict:
    title = form["db_checkpoint"] or ""
    source = (form["db_source"] or "").strip() or page.host.checkpoints().get(title, title)
    try:
        created = actions.create(page.root, form["db_new_name"], source, form["db_family"], bool(form["db_overwrite"]))
    except UserError as e:
        return {"db_model_message": error(e)}
    name = (form["db_new_name"] or "").strip()
    return {"db_model_select": model_choices(page, name), **setting_values(created.config),
            "db_model_message": info(created.message)}


def write_starter(page: Page, form: dict) -> dict:
    from ..sources import write_starter_kit

    try:
        said = write_starter_kit(page.root)
    except UserError as e:
        return {"db_model_message": error(e)}
    return {"db_checkpoint": checkpoint_choices(page), "db_starter": compat.update(visible=False),
            "db_model_message": info(said)}


def refresh(page: Page, form: dict) -> dict:
    return {"db_model_select": model_choices(page, form["db_model_select"]), "db_checkpoint": checkpoint_choices(page)}


def delete(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    try:
        said = actions.delete(page.root, name, bool(form["db_delete_confirm"]))
    except UserError as e:
        return {"db_delete_message": error(e)}
    return {"db_model_select": model_choices(page, None), "db_delete_confirm": False, "db_delete_message": info(said)}


def load_concepts(page: Page, form: dict) -> dict:
    try:
        config, path = read_concepts(page.root, form["db_concepts_path"])
    except UserError as e:
        return {"db_concepts_message": error(e)}
    concepts = {k: v for k, v in setting_values(config).items() if k in CONCEPT_IDS}
    return {**concepts, "db_concepts_message": info(f"Loaded {len(config.concepts)} concept(s) from {path}.")}


def concept_photos(page: Page, form: dict, index: int = 0) -> dict:
    """A look at the images of concept `index`, whose instance folder changed."""
    key, shown = f"db_c{index}_instance_data_dir", f"db_c{index}_photos"
    if not (form[key] or "").strip():
        return {shown: ""}
    try:
        return {shown: views.instance_photos(actions.instance_photos(form[key]))}
    except UserError as e:
        return {shown: error(e)}


def save_concepts(page: Page, form: dict) -> dict:
    try:
        config = form_config(form)
        path = write_concepts(page.root, form["db_concepts_path"], config)
    except UserError as e:
        return {"db_concepts_message": error(e)}
    return {"db_concepts_message": info(f"Saved {len(config.concepts)} concept(s) to {path}.")}


# ---------------------------------------------------------------- training


def train(page: Page, form: dict) -> dict:
    name, plan = form["db_model_select"], form["last_plan"]
    state = run_state(page, name)
    if plan and plan.get("name") == name and plan.get("fits") is False and not plan.get("warned"):
        return {"db_run_message": message("The memory plan says this run does not fit the GPU (see Memory above). "
                                           "Press Train again to start it anyway, or apply a VRAM preset.",
                                           "db-error", state),
                "last_plan": {**plan, "warned": True}}
    try:
        if not name:
            raise UserError("no model selected: create one or select one in the Model panel")
        started = actions.train(page.root, name, page.host, shown_config(page, form),
                                start_over=form["db_start_from"] == START_FROM[1],
                                from_step=views.chosen_save(form["db_resume_from"]))
    except UserError as e:
        return {"db_run_message": error(e, state)}
    return {"db_run_message": info(started.message, run_state(page, name))}


def _request(page: Page, form: dict, what: str) -> dict:
    job = jobs.running_job(page.root)
    name = job["name"] if job else (form["db_model_select"] or "")
    state = run_state(page, name)
    try:
        return {"db_run_message": info(actions.request(page.root, name, what).capitalize() + ".", state)}
    except UserError as e:
        return {"db_run_message": error(e, state)}


def pause(page: Page, form: dict) -> dict:
    return _request(page, form, "pause")


def cancel(page: Page, form: dict) -> dict:
    return _request(page, form, "cancel")


def save_now(page: Page, form: dict) -> dict:
    return _request(page, form, "save")


def sample_now(page: Page, form: dict) -> dict:
    return _request(page, form, "sample")


def optional_number(text, what: str, kind=float):
    """A number typed into a field whose empty value means "the default": None when empty."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{what}: enter {'a whole number' if kind is int else 'a number'}, or leave it empty") \
            from None
    if value <= 0:
        raise UserError(f"{what}: enter a number above 0, or leave it empty")
    return value


def plan_memory(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    try:
        if not name:
            raise UserError("no model selected")
        vram = optional_number(form["db_vram"], "GPU memory (GB)")
        plan = actions.plan(page.root, name, vram if vram is not None else free_gpu_gib(),
                            form_config(form).parameters)
    except UserError as e:
        return {"db_plan_message": error(e), "last_plan": None}
    return {"db_plan_message": message(plan.text, "db-info db-plan"),
            "last_plan": {"name": name, "fits": plan.fits, "warned": False}}


def apply_preset(page: Page, form: dict) -> dict:
    name, size = form["db_model_select"], form["db_preset"]
    try:
        if not name or not size:
            raise UserError("choose a model and a VRAM preset")
        config, said = actions.apply_preset(page.root, name, size)
    except UserError as e:
        return {"db_plan_message": error(e)}
    return {**setting_values(config), "db_plan_message": info(said)}


def stop_plan(page: Page, form: dict) -> dict:
    try:
        return {"db_plan_message": info(actions.stop_plan(page.root))}
    except UserError as e:
        return {"db_plan_message": error(e)}


def free_gpu_gib() -> float | None:
    """Free memory of this machine's GPU in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


# ---------------------------------------------------------------- files


def export(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    try:
        if not name:
            raise UserError("no model selected")
        said = actions.export(page.root, name, form_config(form).parameters, form["db_export_name"],
                              bool(form["db_export_overwrite"]), page.host)
    except UserError as e:
        return {"db_export_message": error(e)}
    return {"db_export_message": info(said), "db_checkpoints": panel(page, name)["db_checkpoints"]}


def extract_lora(page: Page, form: dict) -> dict:
    name = form["db_model_select"]
    try:
        if not name:
            raise UserError("no model selected")
        te_rank = optional_number(form["db_extract_te_rank"], "Text encoder rank", int)
        said = actions.extract_lora(page.root, name, form["db_extract_rank"], te_rank, page.host)
    except UserError as e:
        return {"db_extract_message": error(e)}
    return {"db_extract_message": info(said), "db_checkpoints": panel(page, name)["db_checkpoints"]}


# ---------------------------------------------------------------- the output column


def checkpoint_titles(page: Page) -> dict:
    """The host's name of each checkpoint file (what its checkpoint list shows), by real path."""
    return {os.path.realpath(path): title for title, path in page.host.checkpoints().items()}


def saves_update(page: Page, name):
    root = page.root
    choices = views.save_choices(actions.kept_saves(root, name)) if name and root.model(name).exists() else []
    return compat.update(choices=choices, value=choices[0] if choices else None, visible=len(choices) > 1)


def panel(page: Page, name) -> dict:
    """The output column's content for a model (its running or last training)."""
    root = page.root
    st = jobs.status(root, name, page.follower) if name and root.model(name).path.is_dir() else None
    files = actions.model_files(root, name, st.checkpoints) if st else []
    scores = actions.fidelity_scores(root, name) if st else {"best_step": None, "saves": []}
    return {
        "db_status": views.status_line(st),
        "db_progress_box": views.progress_bar(st),
        "db_chart_box": views.loss_chart(st.losses if st else [], st.validation if st else []),
        "db_fidelity": views.fidelity_table(scores),
        "db_gallery": [list(item) for item in views.previews(root.model(name).samples)] if st else [],
        "db_checkpoints": views.checkpoint_list(files, checkpoint_titles(page), root.lora, scores["best_step"]),
        "db_log": "\n".join(reversed(st.log_tail.splitlines())) if st else "",  # the newest line in view
        "db_resume_from": saves_update(page, name),
        "db_start_from": start_choice(page, name, st),
    }


def start_choice(page: Page, name, st):
    """"Go on or start over" shows for a model that has a saved run and is not training."""
    if st is None or st.state in ("running", "starting", "paused"):
        return compat.update(visible=False)
    try:
        saved = actions.saved_step(page.root, name) is not None
    except UserError:
        saved = True  # a damaged save: starting over is the way out
    return compat.update(visible=saved)


def show_model(page: Page, form: dict) -> dict:
    """A one-off refresh of the output column when a model is selected."""
    now = panel(page, form["db_model_select"])
    return {**now, "shown": now}


def poll(page: Page, form: dict) -> dict:
    """The running job's progress (or the last job's end), sending only what changed since the page's `shown`.

    It takes no other input on purpose: gradio 3 polls with the inputs of the page's first call. Once the job has
    ended (and its end was shown), it stops sending, so a model selected afterwards stays shown.
    """
    root = page.root
    job = jobs.last_job(root)
    if job is None or not (jobs.running_job(root) or jobs.recently_active(root, job["name"])):
        return {}  # nothing running: the column stays with whatever model the page selected
    now = panel(page, job["name"])
    last = form["shown"] or {}
    return {**{k: v for k, v in now.items() if v != last.get(k)}, "shown": now}


def page_load(page: Page, form: dict) -> dict:
    job = jobs.running_job(page.root)
    names = page.root.model_names()
    selected = job["name"] if job else (names[0] if names else None)
    return {"db_model_select": compat.update(choices=names, value=selected), "db_checkpoint": checkpoint_choices(page),
            "db_starter": compat.update(visible=not page.host.checkpoints())}

