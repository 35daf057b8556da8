"""The standalone app in headless Chromium, driving the real trainer on the built-in tiny model."""
import json
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a server process and a browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"  # git-ignored; kept by CI

TIMEOUT = 120_000


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # gradio takes the value on blur


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option).click()


def message(page) -> str:
    return page.inner_text("#db_message")


def wait_message(page, pattern: str, timeout=TIMEOUT) -> None:
    page.wait_for_function("([sel, pat]) => new RegExp(pat).test(document.querySelector(sel)?.innerText || '')",
                           arg=["#db_message", pattern], timeout=timeout)


def progress_step(page) -> int:
    return int(page.get_attribute("#db_progress", "data-step") or 0)


def wait_status(page, pattern: str, timeout=TIMEOUT) -> None:
    page.wait_for_function("([sel, pat]) => new RegExp(pat).test(document.querySelector(sel)?.innerText || '')",
                           arg=["#db_status", pattern], timeout=timeout)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_click_through_train_cancel_reload(start_app, page, tmp_path):
    app = start_app()
    page.goto(app.url)
    page.wait_for_selector("#db_top_row", timeout=TIMEOUT)

    # a first start with nothing in the data root offers the built-in tiny model
    page.click("#db_starter")
    wait_message(page, "Wrote the tiny model")
    images = app.root / "demo-images"
    assert len(list(images.glob("*.png"))) >= 3

    # Model: create from the checkpoint list, the family is detected and shown
    fill(page, "db_new_name", "dog")
    choose(page, "db_checkpoint", "dreambooth-tiny-v1.safetensors")
    page.wait_for_function("document.querySelector('#db_detected')?.innerText.includes('v1')", timeout=TIMEOUT)
    page.click("#db_create_btn")
    wait_message(page, "Created dog")
    config_path = app.root / "models" / "dreambooth" / "dog" / "config.json"
    assert json.loads(config_path.read_text())["model"]["family"] == "v1"
    shot(page, "1-model")

    # CPU-friendly settings written to the file, then 'Load settings' brings them into the panels
    config = json.loads(config_path.read_text())
    config["parameters"].update(resolution=64, mixed_precision="no", optimizer="adamw", save_every_n_epochs=2,
                                sample_every_n_epochs=1)
    config_path.write_text(json.dumps(config))
    page.click("#db_load")
    wait_message(page, "Loaded the settings of dog")

    # Concepts: a missing folder is refused with its name in the page
    page.get_by_role("tab", name="Concepts").click()
    fill(page, "db_c0_instance_data_dir", str(tmp_path / "no such folder"))
    page.click("#db_train")
    wait_message(page, "no such folder.*is not a folder")
    assert page.locator("#db_error").is_visible()
    shot(page, "2-bad-input")

    fill(page, "db_c0_instance_data_dir", str(images))
    fill(page, "db_c0_instance_prompt", "a zwx disc")
    page.get_by_role("tab", name="Sample").first.click()
    fill(page, "db_c0_sample_prompt", "a zwx disc")
    fill(page, "db_c0_sample_infer_steps", 2)
    shot(page, "3-concepts")

    # Parameters: a few epochs
    page.get_by_role("tab", name="Parameters").click()
    fill(page, "db_p_num_train_epochs", 3)
    shot(page, "4-parameters")

    # Train: progress advances, previews appear, the checkpoint is listed and on disk
    page.click("#db_train")
    wait_message(page, "Training dog started")
    page.wait_for_function("Number(document.querySelector('#db_progress')?.dataset.step) > 0", timeout=TIMEOUT)
    page.wait_for_selector("#db_gallery img", timeout=TIMEOUT)
    wait_status(page, "dog\\W+ done")
    saved = json.loads(config_path.read_text())
    assert saved["parameters"]["num_train_epochs"] == 3  # what the panels showed is what the trainer used
    assert saved["concepts"][0]["instance_data_dir"] == str(images)
    page.wait_for_function("document.querySelector('#db_checkpoints')?.innerText.includes('dog_12.safetensors')",
                           timeout=TIMEOUT)
    assert (app.root / "models" / "Stable-diffusion" / "dog_12.safetensors").is_file()
    assert progress_step(page) == 12
    shot(page, "5-output-done")

    # Export checkpoint: a child process writes the file into models/Stable-diffusion
    from dreambooth import worker
    from dreambooth.store import DataRoot

    deadline = time.time() + 60
    while worker.running_job(DataRoot(app.root)) and time.time() < deadline:  # 'done' is said just before exiting
        time.sleep(0.2)
    page.click("#db_export")
    wait_message(page, "wrote \\S+\\.safetensors|Error")
    exported = re.search(r"wrote (\S+\.safetensors)", message(page))
    assert exported, message(page)
    assert Path(exported.group(1)).is_file()

    # A longer run: reload the page mid-run (it re-attaches), then cancel
    page.get_by_role("tab", name="Parameters").click()
    fill(page, "db_p_num_train_epochs", 500)
    assert "Training dog started" not in message(page)  # the export's message is shown now
    page.click("#db_train")
    wait_message(page, "Training dog started|Error")
    assert "Training dog started" in message(page), message(page)
    page.wait_for_function("Number(document.querySelector('#db_progress')?.dataset.step) > 14", timeout=TIMEOUT)
    page.reload()
    page.wait_for_selector("#db_top_row", timeout=TIMEOUT)
    wait_status(page, "dog\\W+ running")
    before = progress_step(page)
    page.wait_for_function(f"Number(document.querySelector('#db_progress')?.dataset.step) > {before}",
                           timeout=TIMEOUT)
    assert page.locator("#db_model_select input").first.input_value() == "dog"
    shot(page, "6-reattached")
    page.click("#db_cancel")
    wait_message(page, "cancel requested")
    wait_status(page, "dog\\W+ cancelled")
    shot(page, "7-cancelled")
    assert re.search(r"step \d+/2000", page.inner_text("#db_status"))
