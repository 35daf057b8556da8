"""`python -m dreambooth ui`: the DreamBooth tab as a standalone gradio app, with the same REST routes as the webui.

It listens on 127.0.0.1 unless told otherwise. `--auth user:pass[,user:pass]` puts gradio's login in front of the
page and HTTP Basic auth in front of the REST routes. Like the webui, it drops gradio's CORS middleware, so that
no other origin (another local app included) gets a browser's permission to call the routes; and it answers no call
from another site's page or addressed to a name that is not this machine's (dreambooth.access), on every path.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import jobs
from ..access import Access, install
from ..host import Host, standalone_host
from ..store import DataRoot
from . import compat
from .routes import add_routes, basic_auth, parse_credentials

# style.css sits at the extension's root, where the webui loads it; the standalone app uses the same file.
STYLE = Path(__file__).resolve().parents[2] / "style.css"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def standalone_access(server_name: str = "127.0.0.1", allow_origins=(), logged_in: bool = False) -> Access:
    return Access(origins=tuple(allow_origins), hosts=(server_name,), any_host=logged_in,
                  allow_hint="start the app with --allow-origin ORIGIN")


def create_app(root: DataRoot, access: Access | None = None):
    from .tab import build

    host = standalone_host(root.ensure(), access)
    jobs.attach(root, host)  # a training started by an earlier UI process keeps being followed
    demo = build(host)
    demo.queue()  # gradio 3's polling (load(every=...)) needs the queue
    return demo


def serve_routes(app, host: Host, credentials: list) -> None:
    """Mount the REST routes on the app gradio serves, take away gradio's CORS headers (as the webui does) and put
    the access rule in front of every path."""
    app.user_middleware = [m for m in app.user_middleware if "CORS" not in getattr(m.cls, "__name__", "")]
    app.middleware_stack = None  # rebuilt from user_middleware on the next request
    install(app, host.access, everywhere=True)
    add_routes(app, host, basic_auth(credentials) if credentials else [])


def launch(root: DataRoot, host: str = "127.0.0.1", port: int = 7861, auth: str | None = None,
           allow_origins=()) -> None:
    credentials = parse_credentials(auth)
    access = standalone_access(host, allow_origins, logged_in=bool(credentials))
    demo = create_app(root, access)
    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else None
    if css and "css" not in __import__("inspect").signature(type(demo).launch).parameters:
        demo.css = css  # gradio < 6 takes the css on the Blocks
    print(f"DreamBooth: data root {root.root}", flush=True)
    if host not in LOOPBACK and not credentials:
        print(f"DreamBooth: warning: serving on {host} without --auth: anyone who can reach this machine can use "
              "the tab and the REST routes", file=sys.stderr, flush=True)
    app, local_url, _ = compat.launch(demo, server_name=host, server_port=port, allowed_paths=[str(root.root)],
                                      css=css, auth=credentials or None, show_api=False, inbrowser=False, quiet=False,
                                      prevent_thread_lock=True)
    serve_routes(app, standalone_host(root, access), credentials)
    print(f"DreamBooth: REST routes at {str(local_url).rstrip('/')}/dreambooth/"
          + (" (HTTP Basic auth)" if credentials else ""), flush=True)
    demo.block_thread()
