"""Driving the tab in Chromium: fill and choose like a user, read messages, take screenshots."""
import re
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"  # git-ignored; kept by CI
TIMEOUT = 300_000  # a CPU run of the tiny model on a busy 2-core machine; a hang fails with what the page shows


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # gradio takes the value on blur


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option).click()


def text(page, elem_id: str) -> str:
    return page.inner_text(f"#{elem_id}")


def wait_text(page, elem_id: str, pattern: str, timeout=TIMEOUT) -> str:
    """Wait until the element's text matches; return that text (it may change or be hidden right after)."""
    handle = wait_js(page, "([sel, pat]) => { const t = document.querySelector(sel)?.innerText || ''; "
                           "return new RegExp(pat).test(t) && t; }", [f"#{elem_id}", pattern], timeout,
                     f"#{elem_id} to match {pattern!r}")
    return handle.json_value()


def wait_js(page, expression: str, arg=None, timeout=TIMEOUT, what: str = ""):
    """page.wait_for_function, failing with what the page shows (the run's state, its messages, the log's end)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return page.wait_for_function(expression, arg=arg, timeout=timeout)
    except PlaywrightTimeout:
        shown = page.evaluate("""() => ({
            status: document.querySelector('#db_status')?.innerText,
            progress: {...document.querySelector('#db_progress')?.dataset},
            run_message: document.querySelector('#db_run_message')?.innerText,
            train_disabled: document.querySelector('#db_train')?.disabled,
            resume_from: document.querySelector('#db_resume_from input')?.value,
            log: (document.querySelector('#db_log textarea')?.value || '').slice(-600)})""")
        raise AssertionError(f"waited {timeout / 1000:.0f} s for {what or expression}; the page shows {shown}") from None


def visible_text(page, elem_id: str) -> str:
    """What the user sees of a message box (a message the page has hidden counts as nothing)."""
    return page.evaluate("id => [...document.querySelectorAll('#' + id + ' div')].filter(d => !d.hidden && "
                         "d.offsetParent !== null).map(d => d.innerText).join(' ')", elem_id)


def progress(page) -> dict:
    return page.evaluate("() => ({...document.querySelector('#db_progress')?.dataset})")


# The tab's elements gradio has hidden (progress overlays above all) that are painted all the same: a stylesheet rule
# that overrides gradio's hiding makes an overlay cover the fields, or pulse over the status.
SHOWN_HIDDEN = """() => [...document.querySelectorAll('#db_layout .hide')].filter(e => e.offsetParent !== null)
    .filter(e => { const s = getComputedStyle(e); return s.visibility !== 'hidden' && Number(s.opacity) > 0; })
    .map(e => ((e.closest("[id]") || {}).id || "") + " " + e.tagName + "." + e.className)"""


def fields_painted(page) -> None:
    """No element gradio has hidden stays painted (a fade-out of a second is fine)."""
    try:
        page.wait_for_function(f"() => ({SHOWN_HIDDEN})().length === 0", timeout=3000)
    except Exception:
        shown = page.evaluate(SHOWN_HIDDEN)
        assert shown == [], f"hidden elements painted over these fields: {shown}"


# The output column's parts that stick out of it (wrapped into a column of their own beside it, out of reach).
OUTSIDE_THE_COLUMN = """() => { const panel = document.querySelector('#db_output_panel'); if (!panel) return [];
    const box = panel.getBoundingClientRect();
    return [...panel.querySelectorAll('[id^="db_"]')].filter(e => e.offsetParent !== null).filter(e => {
        const r = e.getBoundingClientRect(); return r.width > 0 && (r.left < box.left - 2 || r.right > box.right + 2);
    }).map(e => e.id); }"""


def output_column_whole(page) -> None:
    """Every visible part of the output column lies inside it (it scrolls; it never wraps a part out of reach)."""
    outside = page.evaluate(OUTSIDE_THE_COLUMN)
    assert outside == [], f"outside the output column: {outside}"


def shots(page, name: str) -> None:
    """A full-page screenshot at 1400 px wide (the test's window) and at 1024 px, of a page whose fields are all
    painted and whose output column holds all its parts."""
    fields_painted(page)
    output_column_whole(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}-1400.png"), full_page=True)
    page.set_viewport_size({"width": 1024, "height": 768})
    page.wait_for_timeout(1000)
    fields_painted(page)
    output_column_whole(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}-1024.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.wait_for_timeout(500)


# The lowest contrast of the visible help texts (WCAG's formula) against their background.
CONTRAST = """() => {
    const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(v => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
    const bg = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
        if (!/rgba\\(.*, 0\\)|transparent/.test(c)) return c; } return 'rgb(255, 255, 255)'; };
    const infos = [...document.querySelectorAll('#db_layout [data-testid="block-info"] + div, #db_layout .info-text')].filter(e => e.offsetParent);
    if (infos.length < 5) return 0;
    return Math.min(...infos.map(info => { const [a, b] = [lum(getComputedStyle(info).color), lum(bg(info))];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); })); }"""


def open_panel(page, name: str) -> None:
    """Click the Model / Concepts / Parameters tab: a role=tab button in gradio 4 and newer, a plain button in the
    tab bar in gradio 3.41."""
    tabs = page.get_by_role("tab", name=name)
    if tabs.count():
        tabs.first.click()
    else:
        page.locator("#db_panels button").filter(has_text=re.compile(f"^\\s*{name}\\s*$")).first.click()
