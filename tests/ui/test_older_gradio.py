"""The tab under older gradio stacks: 3.41.2 (A1111 1.10, SD.Next) and 4.40 (Forge). The standalone app started with
that stack's python serves the DreamBooth panels, javascript/dreambooth.js runs there, and a newcomer's first run
works: create from the tiny model, an error in the tab's words with its field marked, train, buttons that follow
the run, captioned previews and the checkpoint list."""
import json
import re
import urllib.request
from pathlib import Path

import pytest

from page_helpers import CONTRAST, fill, open_panel, progress, shots, text, wait_text

pytestmark = pytest.mark.slow  # a server process under another stack, and a browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"


@pytest.mark.parametrize("version", ["3.41", "4.40"])
def test_first_run_under_older_gradio(version, start_app, page, stack_python, tmp_path):
    app = start_app(python=stack_python(version))
    config = json.loads(urllib.request.urlopen(app.url + "config", timeout=10).read())
    assert config["version"].startswith(version)
    elem_ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"db_model_select", "db_c0_instance_data_dir", "db_c3_sample_prompt", "db_p_learning_rate",
            "db_progress_box", "db_gallery", "db_run_message", "db_model_message", "db_export_name",
            "db_c0_sample_prompt_file", "db_p_class_batch_size", "db_p_prior_loss_weight_min",
            "db_p_prior_loss_scale_epochs", "db_p_keep_saves", "db_resume_from"} <= elem_ids
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Instance images folder", "UNet learning rate", "Checkpoint format"} <= labels

    page.goto(app.url)
    page.wait_for_selector("#db_model_select", timeout=120_000)
    page.wait_for_function("window.dreambooth !== undefined", timeout=30_000)  # the page's script runs here too
    page.click("#db_starter")
    wait_text(page, "db_model_message", "Wrote the tiny model")
    fill(page, "db_new_name", "cat")
    fill(page, "db_source", app.root / "models" / "Stable-diffusion" / "dreambooth-tiny-v1.safetensors")
    page.click("#db_create_btn")
    wait_text(page, "db_model_message", "Created cat")
    config_path = app.root / "models" / "dreambooth" / "cat" / "config.json"
    assert json.loads(config_path.read_text())["parameters"]["resolution"] == 64
    page.wait_for_function("document.querySelector('#db_status')?.innerText.includes('cat')", timeout=60_000)
    assert "Created cat" in text(page, "db_model_message")
    assert page.evaluate(CONTRAST) >= 4.5
    shots(page, f"gradio{version}-1-model")

    # an error in the tab's words, its field marked, nothing written
    open_panel(page, "Concepts")
    fill(page, "db_c0_instance_data_dir", tmp_path / "no such folder")
    before = config_path.read_bytes()
    page.click("#db_train")
    message = wait_text(page, "db_run_message", "Error")
    assert re.search(r"Concept 1 › Instance images folder: .*no such folder.* is not a folder", message), message
    page.wait_for_selector("#db_c0_instance_data_dir.db-invalid")
    assert config_path.read_bytes() == before
    shots(page, f"gradio{version}-2-concepts-error")
    fill(page, "db_c0_instance_data_dir", app.root / "demo-images")
    open_panel(page, "Parameters")
    assert page.locator("#db_p_learning_rate textarea, #db_p_learning_rate input").first.input_value() == "1e-04"
    fill(page, "db_p_num_train_epochs", 3)
    shots(page, f"gradio{version}-3-parameters")

    # the first run: Train is disabled while it runs, then previews with captions and the checkpoint list
    page.click("#db_train")
    wait_text(page, "db_run_message", "Training cat started")
    page.wait_for_function("document.querySelector('#db_train').disabled", timeout=60_000)
    assert progress(page)["state"] in ("starting", "running")
    wait_text(page, "db_status", r"cat\W+ done", timeout=300_000)
    page.wait_for_function("!document.querySelector('#db_train').disabled", timeout=30_000)
    wait_text(page, "db_checkpoints", "cat_12.safetensors")
    assert page.locator("#db_checkpoints button.db-use").count() == 1
    assert page.locator("#db_checkpoints button.db-use").first.is_hidden()  # no txt2img standalone
    page.locator("#db_gallery img").first.wait_for(timeout=60_000)
    assert page.locator("#db_loss_chart polyline.db-loss-smooth").count() == 1
    shots(page, f"gradio{version}-4-output-done")
    page.locator("#db_gallery img").first.click()
    assert re.search(r"step 12 · a zwx disc · seed 420", wait_text(page, "db_gallery", "seed"))
