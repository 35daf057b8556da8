"""The webui adapter: the only file that imports the webui's `modules`. Registers the DreamBooth tab, its settings and
its REST routes, and gives the tab a Host whose hooks are the webui's own functions."""
import sys
from pathlib import Path

# The extension's folder may have any name: put its root (which holds the `dreambooth` package) on the path.
EXTENSION_ROOT = Path(__file__).resolve().parent.parent
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

from modules import paths, script_callbacks, sd_models, shared  # noqa: E402

from dreambooth import jobs  # noqa: E402
from dreambooth.access import Access, install  # noqa: E402
from dreambooth.config import HOST_SETTINGS, PARAMETER_SETTINGS  # noqa: E402
from dreambooth.host import Host  # noqa: E402
from dreambooth.store import DataRoot  # noqa: E402

SECTION = ("dreambooth", "DreamBooth")


def data_root() -> DataRoot:
    """--dreambooth-dir, else the settings' data folder, else the webui's own models folder's parent, so that
    <root>/models/Stable-diffusion is the folder txt2img lists."""
    folder = getattr(shared.cmd_opts, "dreambooth_dir", None) or shared.opts.data.get("dreambooth_data_dir", "")
    return DataRoot(Path(folder).expanduser() if folder else Path(paths.models_path).parent)


def forge_memory_manager():
    """Forge's memory manager (backend.memory_management), or None on the webui."""
    try:
        from backend import memory_management
    except ImportError:
        return None
    return memory_management


def free_host_model():
    """Give the GPU to training. Forge keeps its models in its own memory manager (its
    sd_models.unload_model_weights leaves them loaded): that manager moves every model off the GPU and empties
    the CUDA cache. The webui unloads its checkpoint."""
    manager = forge_memory_manager()
    if manager is None:
        sd_models.unload_model_weights()
        return
    manager.unload_all_models()
    manager.soft_empty_cache(force=True)


def restore_host_model():
    """Forge loads its models again by itself at the next generation; the webui reloads its checkpoint."""
    if forge_memory_manager() is None:
        sd_models.reload_model_weights()


def webui_access() -> Access:
    """The access rule from the webui's own flags: the origins it allows (--cors-allow-origins[-regex]) are the
    user's declaration of who else may call; --server-name is a name it is reached by; a login (--gradio-auth) makes
    the Host check moot, and a public link (--share, --ngrok) both checks (anyone may call it directly)."""
    opts = shared.cmd_opts
    origins = tuple(o.strip() for o in (getattr(opts, "cors_allow_origins", None) or "").split(",") if o.strip())
    logged_in = bool(getattr(opts, "gradio_auth", None) or getattr(opts, "gradio_auth_path", None))
    public = bool(getattr(opts, "share", False) or getattr(opts, "ngrok", None))
    return Access(origins=origins, origin_pattern=getattr(opts, "cors_allow_origins_regex", None) or None,
                  hosts=tuple(h for h in [getattr(opts, "server_name", None)] if h), any_host=logged_in, public=public,
                  allow_hint="add it to the webui's --cors-allow-origins")


def webui_host() -> Host:
    return Host(
        root=data_root().ensure(),
        name="webui",
        list_checkpoints=lambda: {info.title: info.filename for info in sd_models.checkpoints_list.values()},
        before_training=free_host_model,
        after_training=restore_host_model,
        checkpoints_changed=shared.refresh_checkpoints,
        loras_changed=refresh_loras,
        access=webui_access(),
        parameter_defaults=parameter_defaults,
    )


def parameter_defaults() -> dict:
    """The Settings page's values that fill a model's empty parameters of the same name (the scoring models)."""
    names = {s.name for s in PARAMETER_SETTINGS}
    return {s.name: str(shared.opts.data.get(f"dreambooth_{s.name}", "") or "").strip()
            for s in HOST_SETTINGS if s.name in names}


def refresh_loras() -> None:
    """The webui's built-in Lora extension keeps its list in its `networks` module (loaded as a top-level module by the
    webui's script loader, in A1111 and Forge): ask it to scan again. Without that extension: nothing to refresh."""
    networks = sys.modules.get("networks")
    refresh = getattr(networks, "list_available_networks", None)
    if callable(refresh):
        refresh()


def on_ui_settings():
    """The webui's Settings page section, generated from the host settings' declarations."""
    import gradio as gr  # the webui's own (imported here: the routes need no gradio)

    for setting in HOST_SETTINGS:
        component, args = (gr.Radio, {"choices": list(setting.choices)}) if setting.choices else (None, None)
        shared.opts.add_option(f"dreambooth_{setting.name}", shared.OptionInfo(
            setting.default, f"{setting.label} ({setting.tooltip})", component, args, section=SECTION))


def on_ui_tabs():
    from dreambooth.ui.tab import build

    return [(build(webui_host()), "DreamBooth", "dreambooth")]


def api_credentials():
    """Who may call the REST routes: --api-auth's users, else --gradio-auth's (the password that protects the tab
    also protects the routes that drive it), else anyone who can reach the webui (as its own API)."""
    opts = shared.cmd_opts
    if getattr(opts, "api_auth", None):
        return opts.api_auth
    try:
        from modules.initialize_util import get_gradio_auth_creds
    except ImportError:  # older webuis: --gradio-auth only
        return getattr(opts, "gradio_auth", None)
    return [tuple(c) for c in get_gradio_auth_creds() if len(c) == 2]


def on_app_started(demo, app):
    from dreambooth.ui.routes import add_routes, basic_auth

    host = webui_host()
    install(app, host.access)  # the tab's handlers see the headers the browser sent (dreambooth.access)
    opts = shared.cmd_opts
    if getattr(opts, "api", False) or getattr(opts, "nowebui", False):  # where the webui mounts its own API
        credentials = api_credentials()
        add_routes(app, host, basic_auth(credentials) if credentials else [])
    jobs.attach(host.root, host)  # a training that outlived the last webui run: reload/refresh when it ends


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
