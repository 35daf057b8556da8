"""The webui adapter: the only file that imports the webui's `modules`. Registers the DreamBooth tab, its settings and
its REST routes, and gives the tab a Host whose hooks are the webui's own functions."""
import sys
from pathlib import Path

# The extension's folder may have any name: put its root (which holds the `dreambooth` package) on the path.
EXTENSION_ROOT = Path(__file__).resolve().parent.parent
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

import gradio as gr  # noqa: E402
from modules import paths, script_callbacks, sd_models, shared  # noqa: E402

from dreambooth import worker  # noqa: E402
from dreambooth.config import HOST_SETTINGS  # noqa: E402
from dreambooth.host import Host  # noqa: E402
from dreambooth.store import DataRoot  # noqa: E402

SECTION = ("dreambooth", "DreamBooth")


def data_root() -> DataRoot:
    """--dreambooth-dir, else the settings' data folder, else the webui's own models folder's parent, so that
    <root>/models/Stable-diffusion is the folder txt2img lists."""
    folder = getattr(shared.cmd_opts, "dreambooth_dir", None) or shared.opts.data.get("dreambooth_data_dir", "")
    return DataRoot(Path(folder).expanduser() if folder else Path(paths.models_path).parent)


def webui_host() -> Host:
    return Host(
        root=data_root().ensure(),
        name="webui",
        list_checkpoints=lambda: {info.title: info.filename for info in sd_models.checkpoints_list.values()},
        before_training=sd_models.unload_model_weights,
        after_training=sd_models.reload_model_weights,
        checkpoints_changed=shared.refresh_checkpoints,
    )


def on_ui_settings():
    """The webui's Settings page section, generated from the host settings' declarations."""
    for setting in HOST_SETTINGS:
        component, args = (gr.Radio, {"choices": list(setting.choices)}) if setting.choices else (None, None)
        shared.opts.add_option(f"dreambooth_{setting.name}", shared.OptionInfo(
            setting.default, f"{setting.label} ({setting.tooltip})", component, args, section=SECTION))


def on_ui_tabs():
    from dreambooth.ui.tab import build

    return [(build(webui_host()), "DreamBooth", "dreambooth")]


def on_app_started(demo, app):
    from dreambooth.ui.routes import add_routes, basic_auth

    host = webui_host()
    auth = getattr(shared.cmd_opts, "api_auth", None)
    add_routes(app, host, basic_auth(auth) if auth else [])
    worker.attach(host.root, host)  # a training that outlived the last webui run: reload/refresh when it ends


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
