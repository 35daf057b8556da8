"""The standalone app in headless Chromium, driving the real trainer on the built-in tiny model: the first run a
newcomer clicks through, the messages where they look, errors in the tab's words, resume and start over, export."""
import json
import re
import time

import pytest

from page_helpers import CONTRAST, TIMEOUT, choose, fill, open_panel, progress, shots, text, visible_text, wait_js, wait_text

pytestmark = pytest.mark.slow  # a server process and a browser


def test_first_run_messages_errors_resume_export(start_app, page, tmp_path, wait_for):
    app = start_app()
    page.goto(app.url)
    page.wait_for_selector("#db_model_select", timeout=TIMEOUT)
    wait_js(page, "window.dreambooth !== undefined", timeout=30_000)  # javascript/dreambooth.js runs here too

    # A first start offers the built-in tiny model; creating a model from it fills in a one-minute first run.
    page.click("#db_starter")
    wait_text(page, "db_model_message", "Wrote the tiny model")
    fill(page, "db_new_name", "dog")
    choose(page, "db_checkpoint", "dreambooth-tiny-v1.safetensors")
    wait_text(page, "db_detected", "v1")
    page.click("#db_create_btn")
    wait_text(page, "db_model_message", "Created dog")
    page.wait_for_timeout(1500)  # selecting the new model must not replace the message
    assert "Created dog" in text(page, "db_model_message") and "Loaded" not in text(page, "db_model_message")
    config_path = app.root / "models" / "dreambooth" / "dog" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["parameters"]["resolution"] == 64 and config["concepts"][0]["class_infer_steps"] <= 10
    assert config["concepts"][0]["instance_data_dir"] == str(app.root / "demo-images")
    # a second create of the same name asks for the Overwrite tick, in the tab's words (no CLI flag)
    page.click("#db_create_btn")
    message = wait_text(page, "db_model_message", "Error")
    assert "Overwrite" in message and "--" not in message
    shots(page, "1-model")

    # Parameters: ordered by use, learning rates in scientific notation, help text readable
    open_panel(page, "Parameters")
    order = page.evaluate("() => [...document.querySelectorAll('[id^=db_group_]')].map(e => e.id)")
    from dreambooth.config import GROUPS

    assert order == [f"db_group_{g.replace(' ', '_')}" for g in GROUPS]  # as config.py declares them
    assert order[:2] == ["db_group_intervals", "db_group_learning_rate"] and "db_group_performance" in order[-2:]
    assert page.locator("#db_p_learning_rate textarea, #db_p_learning_rate input").first.input_value() == "1e-04"
    page.click("#db_group_performance")
    page.locator("#db_group_performance #db_p_use_ema").wait_for()  # EMA sits under Performance
    contrast = page.evaluate(CONTRAST)
    assert contrast >= 4.5, contrast
    fill(page, "db_p_learning_rate", "5e-5")
    page.click("#db_group_saving")
    fill(page, "db_p_keep_saves", 3)  # saves a later run can go back to
    shots(page, "2-parameters")

    # Errors: in the tab's words, the field marked, and a refused Train writes nothing
    fill(page, "db_p_num_train_epochs", "")
    before = config_path.read_bytes()
    page.click("#db_train")
    message = wait_text(page, "db_run_message", "Error")
    assert "Training epochs: enter a whole number" in message and "None" not in message, message
    page.wait_for_selector("#db_p_num_train_epochs.db-invalid")
    assert config_path.read_bytes() == before
    fill(page, "db_p_num_train_epochs", 6)
    open_panel(page, "Concepts")
    fill(page, "db_c0_instance_data_dir", str(tmp_path / "no such folder"))
    page.click("#db_train")
    message = wait_text(page, "db_run_message", "Instance images folder")
    assert re.search(r"Concept 1 › Instance images folder: .*no such folder.* is not a folder", message), message
    assert "concepts[0]" not in message
    page.wait_for_selector("#db_c0_instance_data_dir.db-invalid")
    assert not page.locator("#db_p_num_train_epochs.db-invalid").count()  # that one was fixed
    assert config_path.read_bytes() == before
    shots(page, "3-concepts-error")
    fill(page, "db_c0_instance_data_dir", str(app.root / "demo-images"))
    # the sample prompt template file: a file that is not text is named, never quoted
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"secret\x00\xff" * 10)
    page.get_by_role("tab", name="Sample").first.click()
    fill(page, "db_c0_sample_prompt_file", binary)
    page.click("#db_train")
    message = wait_text(page, "db_run_message", "Sample prompt template file")
    assert re.search(r"Concept 1 › Sample prompt template file: .*prompts.txt.* not a text file", message), message
    assert "secret" not in message
    page.wait_for_selector("#db_c0_sample_prompt_file.db-invalid")
    fill(page, "db_c0_sample_prompt_file", "")

    # Train: a CPU-only warning reaches the live log at once; buttons follow the run; the first run is quick
    open_panel(page, "Parameters")
    choose(page, "db_p_mixed_precision", "fp16")
    started = time.time()
    page.click("#db_train")
    wait_text(page, "db_run_message", "Training dog started, from step 0")
    wait_js(page, "document.querySelector('#db_train').disabled", timeout=TIMEOUT)
    wait_js(page, "/needs a GPU/.test(document.querySelector('#db_log textarea')?.value || '')",
                           timeout=120_000)
    assert progress(page)["state"] in ("starting", "running")
    wait_text(page, "db_status", r"dog\W+ done")
    assert time.time() - started < 150, "the first run on the tiny model should take about a minute"
    wait_js(page, "!document.querySelector('#db_train').disabled")
    assert not visible_text(page, "db_run_message").strip()  # "Training started" gave way to the real state
    assert "this run trained 24 steps" in text(page, "db_status")
    saved = json.loads(config_path.read_text())
    assert saved["parameters"]["learning_rate"] == 5e-5 and saved["parameters"]["mixed_precision"] == "fp16"
    wait_text(page, "db_checkpoints", "dog_24.safetensors")
    assert "dog_12.safetensors" in text(page, "db_checkpoints")
    assert page.locator("#db_checkpoints button.db-use").count() == 2
    assert all(b.is_hidden() for b in page.locator("#db_checkpoints button.db-use").all())  # no txt2img here
    assert page.locator("#db_loss_chart polyline.db-loss-smooth").count() == 1
    assert "step" in text(page, "db_chart_box") and "loss" in text(page, "db_chart_box")
    page.locator("#db_gallery img").first.wait_for(timeout=TIMEOUT)
    shots(page, "4-output-done")

    # Previews are captioned with step, prompt and seed (open one)
    page.locator("#db_gallery img").first.click()
    captions = wait_text(page, "db_gallery", "seed")
    assert re.search(r"step \d+ · a zwx disc · seed 420", captions), captions

    # Train again: nothing to do, and the checkpoints, chart and previews stay, with how to continue
    from dreambooth import actions, jobs
    from dreambooth.store import DataRoot

    wait_for(lambda: not jobs.running_job(DataRoot(app.root)), timeout=60)
    page.click("#db_train")
    wait_text(page, "db_run_message", "resuming at step 24")
    status = wait_text(page, "db_status", "nothing to do")
    assert "raise Training epochs" in status
    page.wait_for_timeout(1500)
    assert "dog_24.safetensors" in text(page, "db_checkpoints")
    assert page.locator("#db_loss_chart polyline").count() == 2 and page.locator("#db_gallery img").count()

    # Export: the file name is the user's; an existing file is not replaced without the tick
    wait_for(lambda: not jobs.running_job(DataRoot(app.root)), timeout=60)
    page.click("#db_export_box")
    fill(page, "db_export_name", "dog final")
    page.click("#db_export")
    wait_text(page, "db_export_message", "Exported")
    exported = app.root / "models" / "Stable-diffusion" / "dog final.safetensors"
    assert exported.is_file()
    wait_text(page, "db_checkpoints", "dog final.safetensors")
    stamp = exported.stat().st_mtime_ns
    page.click("#db_export")
    assert "tick 'Overwrite" in wait_text(page, "db_export_message", "Error")
    assert exported.stat().st_mtime_ns == stamp
    page.locator("#db_export_overwrite input").check()
    page.click("#db_export")
    wait_text(page, "db_export_message", "Exported")
    assert exported.stat().st_mtime_ns != stamp

    # A LoRA extracted from the fine-tune: listed with the tag the webui's prompt takes
    page.click("#db_extract_box")
    fill(page, "db_extract_rank", 4)
    page.click("#db_extract")
    said = wait_text(page, "db_extract_message", "wrote|Error", timeout=240_000)
    assert "wrote" in said and "unet" in said, said
    tag = wait_text(page, "db_checkpoints", "<lora:dog_24")
    assert re.search(r"<lora:dog_24[^>]*:1>", tag), tag
    assert list((app.root / "models" / "Lora").glob("dog_24*.safetensors"))

    # Memory: the plan under Train, open from the start; a run it says will not fit is warned about once before it starts
    assert page.is_visible("#db_vram") and page.is_visible("#db_plan")
    fill(page, "db_vram", 0.001)
    page.click("#db_plan")
    plan = wait_text(page, "db_plan_message", "does not fit|Error", timeout=240_000)
    assert "Memory plan:" in plan and "does not fit 0.001 GiB" in plan, plan
    before = config_path.read_bytes()
    page.click("#db_train")
    assert "does not fit" in wait_text(page, "db_run_message", "memory plan says")
    assert config_path.read_bytes() == before and not jobs.running_job(DataRoot(app.root))
    fill(page, "db_vram", 1000)
    page.click("#db_plan")
    assert "fits 1000 GiB" in wait_text(page, "db_plan_message", "fits 1000", timeout=240_000)
    choose(page, "db_preset", "48")
    page.click("#db_apply_preset")
    said = wait_text(page, "db_plan_message", "preset|Error", timeout=240_000)
    assert "Error" not in said, said
    shots(page, "5-memory-lora")

    # A longer run resumes explicitly; Pause shows Resume; reload re-attaches; cancel; stale messages give way
    fill(page, "db_p_num_train_epochs", 500)
    page.click("#db_train")
    wait_text(page, "db_run_message", "resuming at step 24")
    wait_text(page, "db_status", "resuming at step 24 of 2000")
    wait_js(page, "Number(document.querySelector('#db_progress')?.dataset.step) > 26", timeout=TIMEOUT)
    page.click("#db_pause")
    wait_text(page, "db_status", r"dog\W+ paused")
    wait_js(page, "document.querySelector('#db_pause').innerText.trim() === 'Resume'")
    shots(page, "6-output-paused")
    page.click("#db_pause")
    wait_text(page, "db_status", r"dog\W+ running")
    page.reload()
    page.wait_for_selector("#db_model_select", timeout=TIMEOUT)
    wait_text(page, "db_status", r"dog\W+ running")
    wait_js(page, "document.querySelector('#db_train').disabled", timeout=TIMEOUT)
    page.click("#db_cancel")
    wait_text(page, "db_run_message", "Cancel requested")
    wait_text(page, "db_status", r"dog\W+ cancelled")
    wait_js(page, "document.querySelector('#db_pause').disabled", timeout=TIMEOUT)
    page.wait_for_timeout(1500)
    assert "Cancel requested" not in visible_text(page, "db_run_message")

    # Go back: an earlier kept save becomes the one the run goes on from
    wait_for(lambda: not jobs.running_job(DataRoot(app.root)), timeout=60)
    kept = {p.name for p in (app.root / "models/dreambooth/dog/saves").iterdir()}
    assert len(kept) == 3 and "step-24" in kept  # the last three saves: 24, then the long run's
    # the list as the cancel's save left it (a poll that lands after the choice would put "latest" back)
    latest = f"the latest save, step {actions.kept_saves(DataRoot(app.root), 'dog')[0]}"
    wait_js(page, "(want) => document.querySelector('#db_resume_from input')?.value === want", latest,
            timeout=TIMEOUT, what=f"Resume from to show {latest!r}")
    open_panel(page, "Parameters")
    fill(page, "db_p_num_train_epochs", 9)
    choose(page, "db_resume_from", "the save at step 24")
    page.click("#db_train")
    wait_text(page, "db_run_message", "resuming at step 24")
    wait_text(page, "db_status", r"dog\W+ done")
    assert re.search(r"step 36/36", text(page, "db_status")) and "this run trained 12 steps" in text(page, "db_status")
    # the list follows: this run's own save at 36 is the latest
    wait_js(page, "document.querySelector('#db_resume_from input')?.value === 'the latest save, step 36'",
                           timeout=TIMEOUT)

    # Start over: back to the source's weights, settings and class images kept, a new run from step 0
    wait_for(lambda: not jobs.running_job(DataRoot(app.root)), timeout=60)
    class_images = sorted(p.name for p in (app.root / "models/dreambooth/dog/class_images").rglob("*.png"))
    assert class_images
    open_panel(page, "Parameters")
    fill(page, "db_p_num_train_epochs", 1)
    page.get_by_label("Start over from the source checkpoint").check()
    page.click("#db_train")
    message = wait_text(page, "db_run_message", "Training dog started, from step 0|Error")
    assert "from step 0" in message, message
    wait_text(page, "db_status", r"dog\W+ done · step 4/4")
    saves = app.root / "models/dreambooth/dog/saves"
    assert [p.name for p in saves.iterdir()] == ["step-4"]  # starting over dropped the earlier saves
    assert sorted(p.name for p in (app.root / "models/dreambooth/dog/class_images").rglob("*.png")) == class_images
    assert json.loads(config_path.read_text())["parameters"]["learning_rate"] == 5e-5

    # Delete sits at the bottom of the Model panel, behind a confirmation
    open_panel(page, "Model")
    page.click("#db_delete_box")
    page.click("#db_delete")
    assert "tick" in wait_text(page, "db_delete_message", "Error")
    assert config_path.is_file()
    shots(page, "7-model-delete")
