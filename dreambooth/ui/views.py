"""What the output panel shows, as HTML strings built from a jobs.Status (no gradio here). Everything that comes
from disk or from a training (names, messages, paths, states) is escaped: it reaches the page as text, never as
markup or Markdown."""
from __future__ import annotations

import html
import math
import re

from ..errors import UserError
from ..jobs import Status
from ..outputs import lora_prompt_tag, step_of


def _duration(seconds) -> str:
    if seconds is None or not math.isfinite(float(seconds)):
        return "?"
    seconds = int(round(float(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status_line(st: Status | None) -> str:
    """The status line as HTML: the model's name in bold, then its state and progress, as text."""
    if st is None:
        return ('<div class="db-status-line">No model selected. To train one: 1. create it in the Model panel from a '
                'checkpoint (none yet? the Model panel offers a built-in tiny one), 2. point Concept 1 at 3-20 photos '
                'of your subject, 3. press Train. Or select an existing model above.</div>')
    parts = [f"{st.state}"]
    active = st.state in ("running", "starting", "paused")
    if st.class_images and active and st.step == st.start_step:
        done, total = st.class_images
        eta = f", ETA {_duration(st.eta_s)}" if st.eta_s is not None and done < total else ""
        parts.append(f"class image {min(done + 1, total)} of {total}{eta}" if done < total else
                     f"{total} class images made")
    if active and st.start_step:
        parts.append(f"resuming at step {st.start_step} of {st.total_steps}")
    if st.total_steps:
        parts.append(f"step {st.step}/{st.total_steps}")
    if st.ended and st.total_steps and st.step >= st.start_step:
        parts.append(f"this run trained {st.step - st.start_step} steps")
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
    if nothing_to_do(st):
        parts.append(f"already trained to step {st.step}: nothing to do. To train on, raise Training epochs (or "
                     "Max training steps) and press Train, or choose Start over")
    elif st.message and st.message != f"trained {st.step - st.start_step} steps":  # said above already
        parts.append(st.message)
    return (f'<div class="db-status-line"><strong>{html.escape(st.name)}</strong>: '
            f'{" · ".join(html.escape(str(p)) for p in parts)}</div>')


def nothing_to_do(st: Status) -> bool:
    """A run that ended at once because the saved state had already reached the last step."""
    return st.state == "done" and st.start_step > 0 and st.step == st.start_step


def progress_bar(st: Status | None) -> str:
    """The run's progress: its steps, or while class images are made before the first step, those."""
    total = st.total_steps if st else 0
    fraction = min(1.0, st.step / total) if st and total else 0.0
    what = ""
    if st and st.class_images and st.state in ("running", "starting", "paused") and st.step == st.start_step:
        done, wanted = st.class_images
        fraction, what = (min(1.0, done / wanted) if wanted else 1.0), f"class images {done}/{wanted}"
    eta = ""
    if st and st.state in ("running", "paused") and st.eta_s is not None:
        eta = f"ETA {_duration(st.eta_s)}"
    elif st and st.state in ("done", "cancelled", "error"):
        eta = st.state
    label = f"{what or f'{fraction * 100:.0f}%'} {eta}".strip()
    state = st.state if st else "none"
    return (f'<div class="db-progress" id="db_progress" data-step="{int(st.step) if st else 0}" '
            f'data-total="{int(total)}" data-state="{html.escape(str(state))}"><div class="db-progress-fill" style="width:{fraction * 100:.1f}%"></div>'
            f'<span class="db-progress-label">{html.escape(label)}</span></div>')


def smooth(values: list, weight: float = 0.8) -> list:
    """An exponential moving average, debiased at the start (the smoothed line TensorBoard draws)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _ticks(low: float, high: float, count: int = 4) -> list:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


class _Plot:
    """An inline SVG plot area: steps across, values up, with labelled axes (no plotting library: the same in every
    gradio)."""

    LEFT, RIGHT, TOP, BOTTOM = 48, 8, 8, 34  # room for the axis labels

    def __init__(self, steps: list, values: list, width: int, height: int):
        self.width, self.height = width, height
        self.x0, self.x1 = min(steps), max(steps)
        self.y0, self.y1 = min(values), max(values)
        if self.y1 - self.y0 < 1e-12:
            self.y0, self.y1 = self.y0 - 0.5, self.y1 + 0.5

    def x(self, step) -> float:
        return self.LEFT + (step - self.x0) / max(1, self.x1 - self.x0) * (self.width - self.LEFT - self.RIGHT)

    def y(self, value) -> float:
        return self.TOP + (1 - (value - self.y0) / (self.y1 - self.y0)) * (self.height - self.TOP - self.BOTTOM)

    def line(self, points: list, cls: str, dashed: bool = False, dots: bool = False) -> str:
        path = " ".join(f"{self.x(s):.1f},{self.y(v):.1f}" for s, v in points)
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        marks = "".join(f'<circle class="{cls}" cx="{self.x(s):.1f}" cy="{self.y(v):.1f}" r="2" fill="currentColor"/>'
                        for s, v in points) if dots else ""
        return f'<polyline class="{cls}" fill="none" stroke="currentColor" points="{path}"{dash}/>{marks}'

    def svg(self, y_label: str, aria: str, body: str) -> str:
        left, top, width, height, bottom = self.LEFT, self.TOP, self.width, self.height, self.BOTTOM
        axes = [f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="currentColor"/>',
                f'<line x1="{left}" y1="{height - bottom}" x2="{width - self.RIGHT}" y2="{height - bottom}" '
                f'stroke="currentColor"/>']
        for v in _ticks(self.y0, self.y1):
            axes.append(f'<text x="{left - 4}" y="{self.y(v) + 3:.1f}" text-anchor="end" font-size="10" '
                        f'fill="currentColor">{v:.3g}</text>')
        for s in sorted({round(t) for t in _ticks(self.x0, self.x1)}):
            axes.append(f'<text x="{self.x(s):.1f}" y="{height - bottom + 13}" text-anchor="middle" font-size="10" '
                        f'fill="currentColor">{s}</text>')
        middle = (top + height - bottom) / 2
        axes.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="10" '
                    f'fill="currentColor">step</text>')
        axes.append(f'<text x="10" y="{middle:.0f}" text-anchor="middle" font-size="10" fill="currentColor" '
                    f'transform="rotate(-90 10 {middle:.0f})">{y_label}</text>')
        return (f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{aria}">'
                f'{"".join(axes)}{body}</svg>')


def loss_chart(losses: list, validation: list = (), width: int = 480, height: int = 180) -> str:
    """An inline SVG chart of (step, loss) with axes, the raw loss faint and a smoothed line on top, and the
    validation loss (held-out images, fixed noise) as a dashed line with its points."""
    points = [(s, v) for s, v in losses if math.isfinite(v)]
    held = [(s, v) for s, v in validation if math.isfinite(v)]
    if len(points) < 2:
        return '<div class="db-chart db-chart-empty" id="db_loss_chart">The loss chart appears after two steps.</div>'
    steps, values = [s for s, _ in points], [v for _, v in points]
    plot = _Plot(steps + [s for s, _ in held], values + [v for _, v in held], width, height)
    body = plot.line(points, "db-loss-raw") + plot.line(list(zip(steps, smooth(values))), "db-loss-smooth")
    caption = "loss by step: raw (faint) and smoothed"
    if held:
        body += plot.line(held, "db-loss-val", dashed=True, dots=True)
        caption += f"; validation (dashed): {held[-1][1]:.4f} at step {held[-1][0]}"
    return (f'<div class="db-chart" id="db_loss_chart">{plot.svg("loss", "loss by step, raw and smoothed", body)}'
            f'<div class="db-chart-caption">{caption}</div></div>')


def checkpoint_list(paths: list, titles: dict | None = None, lora_folder=None, best_step: int | None = None) -> str:
    """The model's checkpoint files, each with a "Use in txt2img" button (shown by javascript/dreambooth.js only
    where the page has a txt2img tab): a full checkpoint is selected in the webui's checkpoint list, a LoRA's
    `<lora:NAME:1>` tag goes into the txt2img prompt. The files of the best scored save are marked."""
    from pathlib import Path

    if not paths:
        return '<div id="db_checkpoint_list" class="db-checkpoints">No checkpoint written yet.</div>'
    titles = titles or {}
    rows = []
    for p in reversed(paths):  # newest first
        path = Path(p)
        size = f"{path.stat().st_size / 2**20:.1f} MB" if path.is_file() else "missing"
        tag = ""
        if lora_folder is not None and path.parent == Path(lora_folder).resolve():
            action = f'data-db-lora="{html.escape(lora_prompt_tag(path))}"'
            tag = f' <code class="db-lora-tag">{html.escape(lora_prompt_tag(path))}</code>'
        else:
            action = f'data-db-checkpoint="{html.escape(titles.get(str(path), path.name))}"'
        if best_step is not None and step_of(path) == best_step:
            tag += ' <strong class="db-best">best save</strong>'
        rows.append(f'<li><code>{html.escape(str(path))}</code>{tag} ({size}) '
                    f'<button type="button" class="db-use" {action} hidden>Use in txt2img</button></li>')
    return f'<ul id="db_checkpoint_list" class="db-checkpoints">{"".join(rows)}</ul>'


FIDELITY_LINES = (("dino", "DINO", False), ("clip_i", "CLIP-I", False), ("clip_t", "CLIP-T", True),
                  ("copy", "copy", True))


def fidelity_chart(scores: dict, width: int = 480, height: int = 180) -> str:
    """The four scores by step (models.read_fidelity), the best save marked by a vertical line; nothing before two
    saves were scored."""
    saves = [save for save in scores["saves"] if save["saved"]]
    if len(saves) < 2:
        return ""
    steps = [save["step"] for save in saves]
    plot = _Plot(steps, [save[k] for save in saves for k, _, _ in FIDELITY_LINES], width, height)
    body = "".join(plot.line([(save["step"], save[k]) for save in saves], f"db-fidelity-{k}", dashed, dots=True)
                   for k, _, dashed in FIDELITY_LINES)
    best = scores["best_step"]
    if best is not None and plot.x0 <= best <= plot.x1:
        body += (f'<line class="db-fidelity-best" x1="{plot.x(best):.1f}" y1="{plot.TOP}" x2="{plot.x(best):.1f}" '
                 f'y2="{height - plot.BOTTOM}" stroke="currentColor" stroke-dasharray="1 3"/>')
    key = ", ".join(f'<span class="db-fidelity-{k}">{label}{" (dashed)" if dashed else ""}</span>'
                    for k, label, dashed in FIDELITY_LINES)
    return (f'<div class="db-chart" id="db_fidelity_chart">{plot.svg("score", "fidelity scores by save", body)}'
            f'<div class="db-chart-caption">{key}; dotted: the best save</div></div>')


def fidelity_table(scores: dict) -> str:
    """The fidelity scores of a model's saves (models.read_fidelity): their chart, then a table newest first (with
    the scores taken on Sample now), the best save marked; nothing when nothing was scored."""
    if not scores["saves"]:
        return ""
    rows = []
    for save in reversed(scores["saves"]):
        best = save["saved"] and save["step"] == scores["best_step"]
        cells = "".join(f"<td>{save[k]:.3f}</td>" for k, _, _ in FIDELITY_LINES)
        marked = (' class="db-best"', " (best)") if best else ("", "" if save["saved"] else " (Sample now)")
        rows.append(f'<tr{marked[0]}><td>{int(save["step"])}{marked[1]}</td>{cells}</tr>')
    best = scores["best_step"]
    said = f"best save: step {int(best)}" if best is not None else "no save qualifies as the best yet"
    return (f'{fidelity_chart(scores)}<table id="db_fidelity_table" class="db-fidelity"><caption>Subject fidelity '
            f'of each save: DINO and CLIP-I (the subject), CLIP-T (the prompt), copy (reproduces the photos); {said}'
            '</caption><tr><th>step</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>copy</th></tr>'
            f'{"".join(rows)}</table>')


def instance_photos(photos) -> str:
    """What a concept's instance folder holds (actions.Photos): how many images, how many captioned, and the first
    ones as small thumbnails with their captions (the prompt [filewords] makes of them)."""
    figures = "".join(f'<figure><img src="{_thumbnail(path)}" alt=""><figcaption>{html.escape(caption)}</figcaption>'
                      f'</figure>' for path, caption in photos.first)
    return (f'<div class="db-photos"><div>{photos.count} image{"s" if photos.count != 1 else ""} in '
            f'<code>{html.escape(photos.folder)}</code>, {photos.captioned} with a caption (.txt); the first:</div>'
            f'<div class="db-thumbs">{figures}</div></div>')


def _thumbnail(path, side: int = 96) -> str:
    """A small JPEG of an image as a data: URL (read as training reads it: bounded, EXIF-rotated, RGB)."""
    import base64
    import io

    from ..data.images import UNREADABLE_IMAGE, load_image

    try:
        image = load_image(path)
    except (*UNREADABLE_IMAGE, UserError):
        return ""
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def preview_caption(path) -> str:
    """"step 12 · a zwx disc · seed 420" from a preview's PNG text (the webui's parameters format)."""
    from pathlib import Path

    from PIL import Image

    from ..data.images import UNREADABLE_IMAGE

    step = Path(path).stem.split("-")[0]
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters", "") if hasattr(image, "info") else ""
    except UNREADABLE_IMAGE:
        text = ""
    text = text[:2000] if isinstance(text, str) else ""
    lines = text.splitlines()
    prompt = lines[0] if lines else ""
    settings = dict(part.split(": ", 1) for part in (lines[-1] if len(lines) > 1 else "").split(", ") if ": " in part)
    step = settings.get("Training step", step)
    return " · ".join(x for x in (f"step {step}", prompt, f"seed {settings['Seed']}" if "Seed" in settings else "") if x)


def previews(folder, limit: int = 12) -> list:
    """(path, caption) of the newest previews in a model's samples folder, oldest of them first."""
    from pathlib import Path

    def key(p):
        head = p.stem.split("-")
        return (int(head[0]) if head[0].isdigit() else -1, p.name)

    files = sorted(Path(folder).glob("*.png"), key=key)[-limit:] if Path(folder).is_dir() else []
    return [(str(p), preview_caption(p)) for p in files]


def explain(error: Exception) -> tuple[str, list]:
    """A config error in the tab's words ("Concept 1 › Instance images folder: ...") and the elem_ids of the
    fields it is about, built from ConfigError.problems and the settings' labels."""
    from ..config import CONCEPT_SETTINGS, MODEL_SETTINGS, PARAMETER_SETTINGS, ConfigError

    if not isinstance(error, ConfigError):
        return str(error), []
    sections = {"model": ({s.name: s for s in MODEL_SETTINGS}, "db_model_{}"),
                "parameters": ({s.name: s for s in PARAMETER_SETTINGS}, "db_p_{}"),
                "concepts": ({s.name: s for s in CONCEPT_SETTINGS}, "db_c{}_{}")}
    lines, fields = [], []
    for problem in error.problems[:ConfigError.SHOWN]:
        where = list(problem.where)
        names, elem = sections.get(where[0], ({}, "")) if where else ({}, "")
        index = where[1] if len(where) > 2 and isinstance(where[1], int) else None
        setting = names.get(where[-1]) if where else None
        parts = [f"Concept {index + 1}"] if index is not None else []
        if where[:1] == ["concepts"] and len(where) == 1:
            parts.append("Concepts")
        if setting is not None:
            parts.append(setting.label)
            fields.append(elem.format(index, setting.name) if index is not None else elem.format(setting.name))
        elif where and where[-1] not in ("concepts",) and not isinstance(where[-1], int):
            parts.append(str(where[-1]))
        lines.append(f"{' › '.join(parts)}: {problem.message}" if parts else problem.message)
    if len(error.problems) > ConfigError.SHOWN:
        lines.append(f"and {len(error.problems) - ConfigError.SHOWN} more problems")
    return "\n".join(lines), fields


SAVE_CHOICE = re.compile(r"^the (latest save, step|save at step) (\d+)$")


def save_choices(steps: list[int]) -> list[str]:
    """The kept saves as the "Resume from" list shows them: the latest first."""
    return [f"the latest save, step {steps[0]}"] + [f"the save at step {step}" for step in steps[1:]] if steps else []


def chosen_save(choice: str | None) -> int | None:
    """The step of an earlier save picked in "Resume from"; None for the latest save (or none picked)."""
    if not choice:
        return None
    match = SAVE_CHOICE.match(choice)
    if not match:
        raise UserError("Resume from: choose one of the listed saves")
    return None if match.group(1).startswith("latest") else int(match.group(2))
