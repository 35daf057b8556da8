"""modules/script_callbacks.py: callbacks registered by scripts, run by the webui at fixed moments."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_app_started": [], "callbacks_ui_tabs": [], "callbacks_ui_settings": []}


def _add(key, callback, name=None):
    callback_map[key].append(ScriptCallback("stub", callback, name))


def on_app_started(callback, *, name=None):
    """callback(demo: gradio.Blocks | None, app: FastAPI): after the FastAPI app is created (demo None in --nowebui)."""
    _add("callbacks_app_started", callback, name)


def on_ui_tabs(callback, *, name=None):
    """callback() -> list of (blocks, title, elem_id) tuples."""
    _add("callbacks_ui_tabs", callback, name)


def on_ui_settings(callback, *, name=None):
    """callback(): add options with shared.opts.add_option."""
    _add("callbacks_ui_settings", callback, name)


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        c.callback(demo, app)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        c.callback()
