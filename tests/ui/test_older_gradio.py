"""The tab under older gradio stacks: 3.41.2 (A1111 1.10, SD.Next) and 4.40 (Forge). The standalone app started with
that stack's python serves the DreamBooth panels, the page renders them in Chromium, and creating a model works."""
import json
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a server process under another stack, and a browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"


@pytest.mark.parametrize("version", ["3.41", "4.40"])
def test_tab_serves_and_creates_under_older_gradio(version, start_app, page, stack_python):
    app = start_app(python=stack_python(version))
    config = json.loads(urllib.request.urlopen(app.url + "config", timeout=10).read())
    assert config["version"].startswith(version)
    elem_ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"db_top_row", "db_model_select", "db_c0_instance_data_dir", "db_c3_sample_prompt",
            "db_p_learning_rate", "db_progress_box", "db_gallery"} <= elem_ids
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Instance images folder", "UNet learning rate", "Checkpoint format"} <= labels

    page.goto(app.url)
    page.wait_for_selector("#db_top_row", timeout=120_000)
    page.click("#db_starter")
    page.wait_for_function("document.querySelector('#db_message')?.innerText.includes('Wrote the tiny model')",
                           timeout=120_000)
    page.locator("#db_new_name textarea, #db_new_name input").first.fill("cat")
    page.locator("#db_source textarea, #db_source input").first.fill(
        str(app.root / "models" / "Stable-diffusion" / "dreambooth-tiny-v1.safetensors"))
    page.locator("#db_source textarea, #db_source input").first.press("Tab")
    page.click("#db_create_btn")
    page.wait_for_function("document.querySelector('#db_message')?.innerText.includes('Created cat')",
                           timeout=120_000)
    assert (app.root / "models" / "dreambooth" / "cat" / "config.json").is_file()
    # the poll (load(every=...) on gradio 3, gr.Timer on 4.40) reaches the page
    page.wait_for_function("document.querySelector('#db_status')?.innerText.includes('cat')", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"gradio{version}-model.png"), full_page=True)
