"""The few places where gradio 3.41 (A1111 1.10, SD.Next), 4.40 (Forge) and the newest (standalone) differ.

Everything else in the tab uses APIs present in all three: Blocks, Row/Column/Tab/Accordion, Textbox, Number,
Slider, Checkbox, Dropdown, Button, Markdown, HTML, Gallery, `gr.update`, `info=`, `show_progress="hidden"`.
"""
from __future__ import annotations

import inspect
import time

import gradio as gr

VERSION = tuple(int(p) for p in gr.__version__.split(".")[:2] if p.isdigit())


def every(blocks: gr.Blocks, seconds: float, fn, state, outputs) -> None:
    """Call `fn(request, last) -> [outputs..., now]` every `seconds` while the page is open; `state` holds `now` so
    `fn` can send only what changed.

    gradio >= 4.40 has gr.Timer. gradio 3 polls with `load(every=...)` (it needs the queue; such an event runs beside
    the queue's workers, never taking one), which repeats the inputs of the first call: there `last` stays empty and
    everything is sent each time. Its repeating wrapper hides the request from `fn`, so the registered function is
    replaced by a generator of the same behaviour that takes the request.
    """
    if hasattr(gr, "Timer"):
        gr.Timer(seconds).tick(fn, [state], outputs, show_progress="hidden")
        return

    def poll_forever(request, last):
        while True:
            yield fn(request, last)
            time.sleep(seconds)

    poll_forever.__annotations__ = {"request": gr.Request}
    poll_forever.__dict__.update(fn.__dict__)  # what marks it (the access check)
    blocks.load(fn, [state], outputs, every=seconds, show_progress="hidden")
    registered = blocks.fns[-1]
    if getattr(registered.fn, "__name__", "") != "continuous_fn":
        raise RuntimeError("gradio 3: the polling event was not registered as expected")
    registered.fn = poll_forever


def blocks(**kwargs) -> gr.Blocks:
    """gr.Blocks without the arguments this gradio does not take (css and theme moved to launch() in gradio 6)."""
    accepted = inspect.signature(gr.Blocks).parameters
    return gr.Blocks(**{k: v for k, v in kwargs.items() if k in accepted})


def launch(demo: gr.Blocks, **kwargs):
    """demo.launch without the arguments this gradio does not take; returns (FastAPI app, local url, share url)."""
    accepted = inspect.signature(gr.Blocks.launch).parameters
    return demo.launch(**{k: v for k, v in kwargs.items() if k in accepted})


def update(**kwargs):
    """A property change for an output (gr.update exists in 3.x, 4.x and 6.x)."""
    return gr.update(**kwargs)


def unchanged():
    return gr.update()


def run_js_on_load(blocks: gr.Blocks, code: str) -> None:
    """Run a piece of JavaScript once the page has loaded (the standalone app's copy of what the webui injects from
    javascript/): `js=` on gradio 4 and newer, `_js=` on gradio 3."""
    wrapped = f"() => {{ {code}\n}}"
    if VERSION >= (4, 0):
        blocks.load(None, None, None, js=wrapped)
    else:
        blocks.load(None, None, None, _js=wrapped)
