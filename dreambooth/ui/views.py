"""What the output panel shows, as plain HTML/Markdown strings built from a worker.Status (no gradio here)."""
from __future__ import annotations

import html
import math

from ..worker import Status


def _duration(seconds) -> str:
    if seconds is None or not math.isfinite(float(seconds)):
        return "?"
    seconds = int(round(float(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status_line(st: Status | None) -> str:
    if st is None:
        return "No model selected. Create one in the Model panel, or select an existing one."
    parts = [f"**{html.escape(st.name)}**: {st.state}"]
    if st.class_images and st.state in ("running", "starting") and st.step == 0:
        parts.append(f"class images {st.class_images[0]}/{st.class_images[1]}")
    if st.total_steps:
        parts.append(f"step {st.step}/{st.total_steps}")
    if st.epochs:
        parts.append(f"epoch {min(st.epoch + 1, st.epochs)}/{st.epochs}")  # events count epochs from 0
    if st.loss is not None:
        parts.append(f"loss {st.loss:.4f}")
    if st.lr is not None:
        parts.append(f"lr {st.lr:.2e}")
    if st.it_per_s:
        parts.append(f"{st.it_per_s:.2f} it/s")
    if st.memory_mb:
        parts.append(f"memory {st.memory_mb / 1024:.2f} GB")
    if st.message:
        parts.append(html.escape(st.message))
    return " · ".join(parts)


def progress_bar(st: Status | None) -> str:
    total = st.total_steps if st else 0
    fraction = min(1.0, st.step / total) if st and total else 0.0
    eta = ""
    if st and st.state in ("running", "paused") and st.eta_s is not None:
        eta = f"ETA {_duration(st.eta_s)}"
    elif st and st.state in ("done", "cancelled", "error"):
        eta = st.state
    label = f"{fraction * 100:.0f}% {eta}".strip()
    return (f'<div class="db-progress" id="db_progress" data-step="{st.step if st else 0}" data-total="{total}">'
            f'<div class="db-progress-fill" style="width:{fraction * 100:.1f}%"></div>'
            f'<span class="db-progress-label">{html.escape(label)}</span></div>')


def loss_chart(losses: list, width: int = 480, height: int = 160) -> str:
    """An inline SVG line chart of (step, loss): the same in every gradio, no pandas or plotting library."""
    if len(losses) < 2:
        return '<div class="db-chart db-chart-empty" id="db_loss_chart">The loss chart appears after two steps.</div>'
    steps = [s for s, _ in losses]
    values = [v for _, v in losses if math.isfinite(v)] or [0.0]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 30

    def xy(step, value):
        x = pad + (step - x0) / max(1, x1 - x0) * (width - pad - 5)
        y = 5 + (1 - (min(max(value, y0), y1) - y0) / (y1 - y0)) * (height - pad)
        return f"{x:.1f},{y:.1f}"

    points = " ".join(xy(s, v) for s, v in losses if math.isfinite(v))
    return (f'<div class="db-chart" id="db_loss_chart"><svg viewBox="0 0 {width} {height}" width="100%" '
            f'preserveAspectRatio="none" role="img" aria-label="loss by step">'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
            f'<text x="2" y="12" font-size="10" fill="currentColor">{y1:.3g}</text>'
            f'<text x="2" y="{height - pad + 5}" font-size="10" fill="currentColor">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 5}" font-size="10" fill="currentColor">step {x0}</text>'
            f'<text x="{width - 60}" y="{height - 5}" font-size="10" fill="currentColor">step {x1}</text>'
            f'</svg><div class="db-chart-caption">loss</div></div>')


def checkpoint_list(paths: list) -> str:
    from pathlib import Path

    if not paths:
        return "No checkpoint written yet."
    lines = []
    for p in paths:
        path = Path(p)
        size = f"{path.stat().st_size / 2**20:.1f} MB" if path.is_file() else "missing"
        lines.append(f"- `{p}` ({size})")
    return "\n".join(lines)
