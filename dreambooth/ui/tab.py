"""The DreamBooth tab: Model, Concepts, Parameters and Output panels, every setting widget built from config.py.

Each panel has one builder that returns its components keyed by elem_id; `build` lays them out and wires each event
to its handler (dreambooth.ui.handlers) behind the access check. The tab holds no state of its own: the selected
model's config.json, the job file and the event log are read again on every action and poll, so a page reload or a
restarted UI shows the same thing. Training, creating, exporting and planning run in child processes.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from .. import actions
from ..access import Access, request_headers
from ..config import CONCEPT_SETTINGS, FAMILIES, GROUPS, MIN_CONCEPTS, MODEL_SETTINGS, PARAMETER_SETTINGS
from ..host import Host
from . import compat, handlers, views
from .concepts_files import concepts_folder
from .fields import CONCEPT_IDS, SETTING_IDS, concept_id, model_id, parameter_id, widget
from .handlers import PANEL_IDS, START_FROM, Page

CONCEPT_PARTS = (("instance", "Instance"), ("class", "Class"), ("sample", "Sample"))
POLL_SECONDS = 1.0
JAVASCRIPT = Path(__file__).resolve().parents[2] / "javascript" / "dreambooth.js"


def checked(access: Access, fn, outputs: list, message=None):
    """`fn(*values)` as a handler behind the access rule (dreambooth.access): a refused call changes nothing, and
    `message` (one of `outputs`, where the handler has one) says why. Every handler of the tab is wired through this."""

    def handler(request, *values):
        refusal = access.refusal(request_headers(request))
        if refusal is None:
            return fn(*values)
        result = [compat.unchanged()] * len(outputs)
        if message is not None:
            result[outputs.index(message)] = handlers.message(f"Error: {refusal}", "db-error")
        return result[0] if len(outputs) == 1 else result

    handler.__annotations__ = {"request": gr.Request}  # gradio passes the request to a parameter typed so
    handler.__name__ = handler.__qualname__ = getattr(fn, "__name__", "handler")
    handler.access_checked = fn
    return handler


# ---------------------------------------------------------------- panels


def model_panel(host: Host) -> dict:
    c = {}
    with gr.Accordion("Create a model", open=True, elem_id="db_create"):
        c["db_new_name"] = gr.Textbox(label="New model name", elem_id="db_new_name",
                                      info="Letters, digits, spaces, '_', '-' and '.'.")
        c["db_checkpoint"] = gr.Dropdown(label="From a checkpoint", choices=list(host.checkpoints()), value=None,
                                         elem_id="db_checkpoint",
                                         info="The host's checkpoint list (models/Stable-diffusion).")
        c["db_source"] = gr.Textbox(label="Or a file, a diffusers folder or a hub id", elem_id="db_source",
                                    info="Used instead of the list when filled in.")
        with gr.Row():
            c["db_family"] = gr.Dropdown(label="Model family", choices=["auto", *FAMILIES], value="auto",
                                         elem_id="db_family",
                                         info="auto: detected from the checkpoint. Override it for a 768 "
                                              "v-prediction v2 model without a yaml.")
            c["db_detected"] = gr.HTML(elem_id="db_detected")
        c["db_overwrite"] = gr.Checkbox(label="Overwrite", value=False, info="Replace a model of the same name.",
                                        elem_id="db_overwrite")
        with gr.Row():
            c["db_create_btn"] = gr.Button("Create model", variant="primary", elem_id="db_create_btn")
            c["db_starter"] = gr.Button("Get the built-in tiny model and demo images", elem_id="db_starter",
                                        visible=not host.checkpoints())
    c["db_model_message"] = gr.HTML(elem_id="db_model_message")
    with gr.Accordion("The selected model", open=False, elem_id="db_model_facts"):
        for s in MODEL_SETTINGS:  # of the selected model: set when it was created
            c[model_id(s)] = widget(s, model_id(s))
            c[model_id(s)].interactive = False
    with gr.Accordion("Delete the selected model", open=False, elem_id="db_delete_box"):
        with gr.Row():
            c["db_delete_confirm"] = gr.Checkbox(label="Yes, delete this model and its files", value=False,
                                                 elem_id="db_delete_confirm")
            c["db_delete"] = gr.Button("Delete model", variant="stop", elem_id="db_delete")
        c["db_delete_message"] = gr.HTML(elem_id="db_delete_message")
    return c


def concepts_panel(host: Host) -> dict:
    c = {}
    with gr.Row():
        c["db_concepts_path"] = gr.Textbox(label="Concepts file", elem_id="db_concepts_path",
                                           info=f"A file name in {concepts_folder(host.root)} (a list of "
                                                "concepts). Load also takes a model's name.")
        c["db_load_concepts"] = gr.Button("Load concepts", elem_id="db_load_concepts", scale=0)
        c["db_save_concepts"] = gr.Button("Save concepts", elem_id="db_save_concepts", scale=0)
    c["db_concepts_message"] = gr.HTML(elem_id="db_concepts_message")
    with gr.Tabs():
        for i in range(MIN_CONCEPTS):
            with gr.Tab(f"Concept {i + 1}", elem_id=f"db_concept_{i}"), gr.Tabs():
                for group, title in CONCEPT_PARTS:
                    with gr.Tab(title, elem_id=f"db_concept_{i}_{group}"):
                        for s in CONCEPT_SETTINGS:
                            if s.group == group:
                                c[concept_id(i, s)] = widget(s, concept_id(i, s))
                        if group == "instance":  # what the folder holds, shown as it is typed
                            c[f"db_c{i}_photos"] = gr.HTML(elem_id=f"db_c{i}_photos")
    return c


def parameters_panel() -> dict:
    c = {}
    for group in list(GROUPS) + sorted({s.group for s in PARAMETER_SETTINGS} - set(GROUPS)):
        title = {"lora": "LoRA"}.get(group, group.capitalize())
        with gr.Accordion(title, open=group in GROUPS[:2], elem_id=f"db_group_{group.replace(' ', '_')}"):
            for s in PARAMETER_SETTINGS:
                if s.group == group:
                    c[parameter_id(s)] = widget(s, parameter_id(s))
    return c


def run_controls() -> dict:
    c = {}
    with gr.Row(elem_id="db_run_row"):
        c["db_train"] = gr.Button("Train", variant="primary", elem_id="db_train", min_width=80)
        c["db_pause"] = gr.Button("Pause", elem_id="db_pause", min_width=80)
        c["db_cancel"] = gr.Button("Cancel", variant="stop", elem_id="db_cancel", min_width=80)
    with gr.Row(elem_id="db_run_row2"):
        c["db_save_now"] = gr.Button("Save now", elem_id="db_save_now", size="sm", min_width=80)
        c["db_sample_now"] = gr.Button("Sample now", elem_id="db_sample_now", size="sm", min_width=80)
    c["db_start_from"] = gr.Radio(label="This model has a saved run", choices=list(START_FROM),
                                  value=START_FROM[0], elem_id="db_start_from", visible=False,
                                  info="Go on where the last run stopped, or start over from the source "
                                       "checkpoint (the settings and class images stay; the saves go).")
    c["db_resume_from"] = gr.Dropdown(label="Resume from", choices=[], value=None, visible=False,
                                      elem_id="db_resume_from",
                                      info="An earlier save goes on from its step (Parameters › Saving › Saves "
                                           "to go back to sets how many are kept).")
    c["db_run_message"] = gr.HTML(elem_id="db_run_message")
    with gr.Accordion("Memory: plan and VRAM presets", open=True, elem_id="db_memory_box"):
        with gr.Row():
            c["db_vram"] = gr.Textbox(label="GPU memory (GB)", value="", max_lines=1, elem_id="db_vram",
                                      info="Empty: the free memory of this machine's GPU, if it has one.")
            c["db_preset"] = gr.Dropdown(label="VRAM preset", choices=[str(g) for g in actions.preset_sizes()],
                                         value=None, elem_id="db_preset",
                                         info="Sets the memory settings to the fastest ones that fit this size.")
        with gr.Row():
            c["db_plan"] = gr.Button("Plan memory", elem_id="db_plan", size="sm")
            c["db_apply_preset"] = gr.Button("Apply preset", elem_id="db_apply_preset", size="sm")
            c["db_plan_stop"] = gr.Button("Stop planning", elem_id="db_plan_stop", size="sm")
        c["db_plan_message"] = gr.HTML(elem_id="db_plan_message")
    return c


def output_panel() -> dict:
    c = {}
    c["db_chart_box"] = gr.HTML(views.loss_chart([]), elem_id="db_chart_box")
    c["db_fidelity"] = gr.HTML("", elem_id="db_fidelity")
    c["db_gallery"] = gr.Gallery(label="Previews", columns=3, height=300, elem_id="db_gallery")
    c["db_checkpoints"] = gr.HTML(views.checkpoint_list([]), elem_id="db_checkpoints")
    with gr.Accordion("Export the working model", open=False, elem_id="db_export_box"):
        with gr.Row():
            c["db_export_name"] = gr.Textbox(label="File name", elem_id="db_export_name",
                                             info="Without extension; empty: MODEL_<step>. Written to "
                                                  "models/Stable-diffusion.")
            c["db_export_overwrite"] = gr.Checkbox(label="Overwrite an existing file", value=False,
                                                   elem_id="db_export_overwrite")
        c["db_export"] = gr.Button("Export checkpoint", elem_id="db_export")
        c["db_export_message"] = gr.HTML(elem_id="db_export_message")
    with gr.Accordion("Extract a LoRA from the fine-tune", open=False, elem_id="db_extract_box"):
        with gr.Row():
            c["db_extract_rank"] = gr.Number(label="UNet rank", value=32, precision=0, elem_id="db_extract_rank",
                                             info="Low-rank SVD of trained minus base weights, per layer.")
            c["db_extract_te_rank"] = gr.Textbox(label="Text encoder rank", value="", max_lines=1,
                                                 elem_id="db_extract_te_rank", info="Empty: the UNet rank.")
        c["db_extract"] = gr.Button("Extract LoRA", elem_id="db_extract")
        c["db_extract_message"] = gr.HTML(elem_id="db_extract_message")
    c["db_log"] = gr.Textbox(label="Trainer log, newest line first", lines=8, max_lines=16, interactive=False,
                             elem_id="db_log")
    return c


# ---------------------------------------------------------------- the tab

# Each event: (the component whose event it is, the event, the handler, its inputs, its outputs, its message box).
SETTINGS, CONCEPTS, PANEL = tuple(SETTING_IDS), tuple(CONCEPT_IDS), PANEL_IDS + ("shown",)
EVENTS = (
    ("db_model_select", "change", handlers.select_model, ("db_model_select",), SETTINGS + ("db_model_message",),
     "db_model_message"),
    ("db_model_select", "change", handlers.show_model, ("db_model_select",), PANEL, None),
    ("db_load", "click", handlers.load_settings, ("db_model_select",), SETTINGS + ("db_settings_message",),
     "db_settings_message"),
    ("db_save", "click", handlers.save_settings, ("db_model_select",) + SETTINGS, ("db_settings_message",),
     "db_settings_message"),
    ("db_train", "click", handlers.train,
     ("db_model_select", "db_start_from", "db_resume_from", "last_plan") + SETTINGS, ("db_run_message", "last_plan"),
     "db_run_message"),
    ("db_plan", "click", handlers.plan_memory, ("db_model_select", "db_vram") + SETTINGS,
     ("db_plan_message", "last_plan"), "db_plan_message"),
    ("db_apply_preset", "click", handlers.apply_preset, ("db_model_select", "db_preset"),
     SETTINGS + ("db_plan_message",), "db_plan_message"),
    ("db_plan_stop", "click", handlers.stop_plan, (), ("db_plan_message",), "db_plan_message"),
    ("db_extract", "click", handlers.extract_lora, ("db_model_select", "db_extract_rank", "db_extract_te_rank"),
     ("db_extract_message", "db_checkpoints"), "db_extract_message"),
    ("db_cancel", "click", handlers.cancel, ("db_model_select",), ("db_run_message",), "db_run_message"),
    ("db_pause", "click", handlers.pause, ("db_model_select",), ("db_run_message",), "db_run_message"),
    ("db_save_now", "click", handlers.save_now, ("db_model_select",), ("db_run_message",), "db_run_message"),
    ("db_sample_now", "click", handlers.sample_now, ("db_model_select",), ("db_run_message",), "db_run_message"),
    ("db_export", "click", handlers.export, ("db_model_select", "db_export_name", "db_export_overwrite") + SETTINGS,
     ("db_export_message", "db_checkpoints"), "db_export_message"),
    ("db_refresh", "click", handlers.refresh, ("db_model_select",), ("db_model_select", "db_checkpoint"), None),
    ("db_delete", "click", handlers.delete, ("db_model_select", "db_delete_confirm"),
     ("db_model_select", "db_delete_confirm", "db_delete_message"), "db_delete_message"),
    ("db_checkpoint", "change", handlers.detect_source, ("db_checkpoint", "db_source"), ("db_detected",), None),
    ("db_source", "change", handlers.detect_source, ("db_checkpoint", "db_source"), ("db_detected",), None),
    ("db_create_btn", "click", handlers.create, ("db_new_name", "db_checkpoint", "db_source", "db_family",
                                                 "db_overwrite"),
     ("db_model_select",) + SETTINGS + ("db_model_message",), "db_model_message"),
    ("db_starter", "click", handlers.write_starter, (), ("db_checkpoint", "db_starter", "db_model_message"),
     "db_model_message"),
    ("db_load_concepts", "click", handlers.load_concepts, ("db_concepts_path",), CONCEPTS + ("db_concepts_message",),
     "db_concepts_message"),
    *((f"db_c{i}_instance_data_dir", "change", partial(handlers.concept_photos, index=i),
       (f"db_c{i}_instance_data_dir",), (f"db_c{i}_photos",), f"db_c{i}_photos") for i in range(MIN_CONCEPTS)),
    ("db_save_concepts", "click", handlers.save_concepts, ("db_concepts_path",) + SETTINGS,
     ("db_concepts_message",), "db_concepts_message"),
)


def bound(page: Page, fn, inputs, outputs):
    """`fn(page, form) -> {id: update}` as gradio calls it: values in the order of `inputs`, one value per output
    in the order of `outputs` (those the handler left out unchanged). Positional, as every gradio reads it alike."""

    def call(*values):
        updates = fn(page, dict(zip(inputs, values)))
        result = [updates.get(k, compat.unchanged()) for k in outputs]
        return result[0] if len(outputs) == 1 else result

    call.__name__ = getattr(fn, "__name__", None) or fn.func.__name__  # a partial: its function's name
    return call


def layout(host: Host) -> tuple[gr.Blocks, dict]:
    """The tab's components, keyed by elem_id (the states by their names)."""
    c = {}
    with compat.blocks(analytics_enabled=False, title="DreamBooth", elem_id="dreambooth_tab") as tab:
        with gr.Row(elem_id="db_layout", equal_height=False):
            with gr.Column(scale=3, elem_id="db_form"):
                with gr.Row(elem_id="db_model_row"):
                    c["db_model_select"] = gr.Dropdown(
                        label="Model", choices=host.root.model_names(), value=None, elem_id="db_model_select",
                        scale=4, info="The DreamBooth model to edit and train; its settings load into the panels.")
                    with gr.Column(scale=1, min_width=160):
                        c["db_refresh"] = gr.Button("Refresh lists", elem_id="db_refresh", size="sm")
                        c["db_load"] = gr.Button("Load settings", elem_id="db_load", size="sm")
                        c["db_save"] = gr.Button("Save settings", elem_id="db_save", size="sm")
                c["db_settings_message"] = gr.HTML(elem_id="db_settings_message")
                with gr.Tabs(elem_id="db_panels"):
                    with gr.Tab("Model", elem_id="db_model_panel"):
                        c.update(model_panel(host))
                    with gr.Tab("Concepts", elem_id="db_concepts_panel"):
                        c.update(concepts_panel(host))
                    with gr.Tab("Parameters", elem_id="db_parameters_panel"):
                        c.update(parameters_panel())
            with gr.Column(scale=2, elem_id="db_output_panel"):
                c["db_status"] = gr.HTML(views.status_line(None), elem_id="db_status")
                c["db_progress_box"] = gr.HTML(views.progress_bar(None), elem_id="db_progress_box")
                c.update(run_controls())
                c.update(output_panel())
        c["last_plan"] = gr.State(None)  # {"name", "fits", "warned"}: Train warns once before a run that won't fit
        c["shown"] = gr.State(None)  # what this page's output column shows, so a poll sends only what changed
    return tab, c


def build(host: Host) -> gr.Blocks:
    page = Page(host)
    tab, c = layout(host)
    with tab:
        def on(event, fn, inputs, outputs, message=None):
            components = [c[o] for o in outputs]
            handler = checked(host.access, bound(page, fn, inputs, outputs), components, c.get(message))
            event(handler, [c[i] for i in inputs], components)

        for source, event, fn, inputs, outputs, message in EVENTS:
            on(getattr(c[source], event), fn, inputs, outputs, message)
        poll = checked(host.access, bound(page, handlers.poll, ("shown",), PANEL), [c[o] for o in PANEL])
        compat.every(tab, POLL_SECONDS, poll, c["shown"], [c[o] for o in PANEL])
        on(tab.load, handlers.page_load, (), ("db_model_select", "db_checkpoint", "db_starter"))
        if host.name != "webui" and JAVASCRIPT.is_file():  # the webui injects javascript/ itself
            compat.run_js_on_load(tab, JAVASCRIPT.read_text(encoding="utf-8"))
    return tab
