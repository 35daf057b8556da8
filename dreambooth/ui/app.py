"""`python -m dreambooth ui`: the DreamBooth tab as a standalone gradio app."""
from __future__ import annotations

from pathlib import Path

from .. import worker
from ..host import standalone_host
from ..store import DataRoot
from . import compat

# style.css sits at the extension's root, where the webui loads it; the standalone app uses the same file.
STYLE = Path(__file__).resolve().parents[2] / "style.css"


def create_app(root: DataRoot):
    from .tab import build

    host = standalone_host(root.ensure())
    worker.attach(root, host)  # a training started by an earlier UI process keeps being followed
    demo = build(host)
    demo.queue()  # gradio 3's polling (load(every=...)) needs the queue
    return demo


def launch(root: DataRoot, host: str = "127.0.0.1", port: int = 7861) -> None:
    demo = create_app(root)
    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else None
    if css and "css" not in __import__("inspect").signature(type(demo).launch).parameters:
        demo.css = css  # gradio < 6 takes the css on the Blocks
    print(f"DreamBooth: data root {root.root}", flush=True)
    compat.launch(demo, server_name=host, server_port=port, allowed_paths=[str(root.root)], css=css,
                  show_api=False, inbrowser=False, quiet=False)
