"""webui.py's start, as far as an extension sees it: `python webui.py [webui flags]` with $STUB_WEBUI_DIR the webui's
folder (its extensions/ holds the extension). The order follows AUTOMATIC1111 1.10.1's webui.py and ui.create_ui:
preload the extensions' flags, parse, load the extensions' scripts, the settings and tabs callbacks, every tab
rendered into one Blocks (its own TabItem), the queue, launch, gradio's CORS middleware dropped, the webui's own
middleware, the API with --api, then the app_started callbacks; then it serves until killed."""
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradio as gr  # noqa: E402
from modules import paths, script_callbacks, sd_models, shared  # noqa: E402


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_middleware(app):
    """modules/initialize_util.setup_middleware: gzip, and CORS only for the origins the flags allow."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.gzip import GZipMiddleware

    app.middleware_stack = None
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    opts = shared.cmd_opts
    if opts.cors_allow_origins or opts.cors_allow_origins_regex:
        app.add_middleware(CORSMiddleware, allow_origins=(opts.cors_allow_origins or "").split(","),
                           allow_origin_regex=opts.cors_allow_origins_regex, allow_methods=["*"],
                           allow_credentials=True, allow_headers=["*"])
    app.build_middleware_stack()


def main(argv):
    home = Path(os.environ["STUB_WEBUI_DIR"])
    paths.models_path = str(home / "models")
    extensions = sorted(p for p in (home / "extensions").iterdir() if p.is_dir())
    for ext in extensions:
        if (ext / "preload.py").is_file():
            load_file(ext / "preload.py", "preload").preload(shared.parser)
    shared.parser.add_argument("--port", type=int, default=7860)
    shared.cmd_opts = shared.parser.parse_args(argv)
    sd_models.list_models()
    for ext in extensions:
        for script in sorted((ext / "scripts").glob("*.py")):
            load_file(script, script.name)
    script_callbacks.ui_settings_callback()
    interfaces = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    demo.queue(64) if gr.__version__.startswith("3.") else demo.queue()
    opts = shared.cmd_opts
    app, _, _ = demo.launch(server_name="0.0.0.0" if opts.listen else (opts.server_name or "127.0.0.1"),
                            server_port=opts.port, prevent_thread_lock=True, quiet=True)
    app.user_middleware = [x for x in app.user_middleware if x.cls.__name__ != "CORSMiddleware"]
    setup_middleware(app)
    if opts.api:
        from modules.api.api import Api

        Api(app)
    script_callbacks.app_started_callback(demo, app)
    print("webui stand-in: serving", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
