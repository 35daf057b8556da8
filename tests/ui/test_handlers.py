"""The tab's handlers without a browser or a gradio server (tab_handlers.Tab): what each one does with the values a
page sends, the message it answers with, and what it leaves alone when it refuses."""
import json
import os
from html import unescape
import signal
import sys
from pathlib import Path

import pytest

from dreambooth import jobs
from dreambooth.config import Concept, Config
from dreambooth.store import DataRoot
from dreambooth.ui.handlers import START_FROM
from tab_handlers import Tab

FAKE = Path(__file__).with_name("fake_trainer.py")


@pytest.fixture
def tab(tmp_path, monkeypatch):
    """A page on a data root with the model 'dog' (two photos, learning rate 3e-6); trainings run a stand-in
    trainer that waits until it is cancelled."""
    from PIL import Image

    root = DataRoot(tmp_path / "root").ensure()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (100 * i, 0, 0)).save(images / f"{i}.png")
    model = root.model("dog")
    model.path.mkdir(parents=True)
    Config(concepts=(Concept(instance_data_dir=str(images), instance_token="zwx"),)).with_parameters(
        learning_rate=3e-6).save(model.config_path)
    monkeypatch.setattr(jobs, "trainer_command",
                        lambda r, name, settings: [sys.executable, str(FAKE), str(r.model(name).path), "wait"])
    yield Tab(root)
    job = jobs.running_job(root)
    if job:  # a failed test must not leave its trainer running
        os.kill(job["pid"], signal.SIGKILL)


def saved(tab) -> dict:
    return json.loads(tab.root.model("dog").config_path.read_text())


def test_selecting_a_model_shows_its_saved_settings(tab):
    shown = tab.select_model(db_model_select="dog")
    assert shown["db_p_learning_rate"] == "3e-06" and shown["db_c0_instance_token"] == "zwx"
    assert "db_model_message" not in shown  # the panels say it
    assert tab.select_model(db_model_select=None) == {}
    loaded = tab.load_settings(db_model_select="dog")
    assert loaded["db_settings_message"].endswith("Loaded the saved settings of dog.</div>")
    tab.root.model("dog").config_path.write_text("{not json")
    assert "Error: " in tab.select_model()["db_model_message"]


def test_saving_writes_what_the_page_shows_and_a_bad_value_nothing(tab):
    tab.show(Config.load(tab.root.model("dog").config_path))
    said = tab.save_settings(db_model_select="dog", db_p_learning_rate="2e-6", db_p_max_grad_norm=0.5)
    assert "Saved the settings of dog: a run of 200 steps (100 epochs of 2)." in said["db_settings_message"]
    assert saved(tab)["parameters"]["learning_rate"] == 2e-6 and saved(tab)["parameters"]["max_grad_norm"] == 0.5
    before = tab.root.model("dog").config_path.read_bytes()
    said = tab.save_settings(db_p_learning_rate="fast")["db_settings_message"]
    assert "UNet learning rate: enter a number, got 'fast'" in unescape(said) and 'data-fields="db_p_learning_rate"' in said
    assert tab.root.model("dog").config_path.read_bytes() == before


def test_train_refuses_before_writing_anything(tab):
    assert "no model selected" in tab.train()["db_run_message"]
    tab.show(Config.load(tab.root.model("dog").config_path))
    before = tab.root.model("dog").config_path.read_bytes()
    refused = tab.train(db_model_select="dog", db_c0_instance_data_dir="", db_p_learning_rate="1e-5")
    assert "no concept has an instance images folder" in refused["db_run_message"]
    # a memory plan that said "does not fit" makes Train warn once; the second press goes on
    warned = tab.train(db_c0_instance_data_dir=str(tab.root.root.parent / "images"),
                       last_plan={"name": "dog", "fits": False, "warned": False})
    assert "does not fit the GPU" in warned["db_run_message"] and warned["last_plan"]["warned"] is True
    assert tab.root.model("dog").config_path.read_bytes() == before and jobs.last_job(tab.root) is None
    going_back = tab.train(last_plan=None, db_resume_from="the save at step 7")
    assert "no kept save at step 7" in going_back["db_run_message"] and jobs.last_job(tab.root) is None


def test_train_saves_the_shown_settings_then_starts_and_the_run_is_followed(tab, wait_for):
    tab.show(Config.load(tab.root.model("dog").config_path))
    started = tab.train(db_model_select="dog", db_p_learning_rate="4e-6", db_start_from=START_FROM[0])
    assert "Training dog started, from step 0; a run of 200 steps (100 epochs of 2)." in started["db_run_message"]
    assert saved(tab)["parameters"]["learning_rate"] == 4e-6
    assert "a training is already running: &#x27;dog&#x27;" in tab.train()["db_run_message"]
    polled = wait_for(lambda: (p := tab.poll(shown=None)).get("db_status") and "running" in p["db_status"] and p)
    assert set(polled) == {"db_status", "db_progress_box", "db_chart_box", "db_fidelity", "db_gallery", "db_start_from",
                           "db_checkpoints", "db_log", "db_resume_from", "shown"}
    again = tab.poll(shown=polled["shown"])  # only what changed since the page's last poll
    assert set(again) - {"db_status", "db_progress_box", "db_chart_box", "db_log"} == {"shown"}
    assert "Pause requested." in tab.pause()["db_run_message"]
    assert "Cancel requested." in tab.cancel()["db_run_message"]
    wait_for(lambda: jobs.running_job(tab.root) is None)
    assert tab.page_load()["db_model_select"]["value"] == "dog"


def test_requests_exports_and_extracts_check_their_inputs(tab):
    assert "no training is running" in tab.save_now(db_model_select="dog")["db_run_message"]
    assert "no training is running" in tab.sample_now()["db_run_message"]
    said = unescape(tab.export(db_export_name="../../escape")["db_export_message"])
    assert "file name '../../escape': use letters" in said and "db_checkpoints" not in tab.export()
    assert "UNet rank" in tab.extract_lora(db_extract_rank=0)["db_extract_message"]
    said = unescape(tab.extract_lora(db_extract_rank=4, db_extract_te_rank="four")["db_extract_message"])
    assert "Text encoder rank: enter a whole number, or leave it empty" in said
    said = unescape(tab.plan_memory(db_vram="lots")["db_plan_message"])
    assert "GPU memory (GB): enter a number, or leave it empty" in said
    assert "above 0" in tab.plan_memory(db_vram="-2")["db_plan_message"]
    assert "no model selected" in tab.export(db_model_select=None)["db_export_message"]
    assert "Stopping the memory plan." in tab.stop_plan()["db_plan_message"]
    assert (tab.root.dreambooth / ".stop-plan").exists()  # what the running plan's child process is killed by


def test_create_and_delete_ask_first(tab):
    refused = tab.create(db_new_name="dog", db_source=str(tab.root.root / "any.safetensors"))
    assert "a model named 'dog' exists: tick 'Overwrite'" in unescape(refused["db_model_message"])
    assert "source: choose a checkpoint" in tab.create(db_new_name="cat", db_source=" ")["db_model_message"]
    assert "tick 'Yes, delete this model' first" in unescape(tab.delete(db_model_select="dog")["db_delete_message"])
    assert tab.root.model("dog").exists()
    deleted = tab.delete(db_delete_confirm=True)
    assert "Deleted dog." in deleted["db_delete_message"] and deleted["db_delete_confirm"] is False
    assert deleted["db_model_select"]["choices"] == [] and not tab.root.model("dog").exists()


def test_concepts_files_round_trip_through_the_page(tab):
    tab.show(Config.load(tab.root.model("dog").config_path))
    assert "Saved 1 concept(s)" in tab.save_concepts(db_concepts_path="mine")["db_concepts_message"]
    tab.form.update(db_c0_instance_token="")
    loaded = tab.load_concepts()
    assert loaded["db_c0_instance_token"] == "zwx" and "Loaded 1 concept(s)" in loaded["db_concepts_message"]
    assert not any(key.startswith("db_p_") for key in loaded)  # concepts only


def test_go_on_or_start_over_shows_only_for_a_model_with_a_saved_run(tab):
    assert tab.show_model(db_model_select="dog")["db_start_from"]["visible"] is False
    state = tab.root.model("dog").state
    state.mkdir()
    (state / "trainer.json").write_text(json.dumps({"step": 4, "total_steps": 8, "checkpoint_written": True,
                                                    "saved_at": 1.0}))
    assert tab.show_model()["db_start_from"]["visible"] is True
    (state / "trainer.json").write_text("{damaged")
    assert tab.show_model()["db_start_from"]["visible"] is True  # starting over is the way out of a damaged save


def test_the_trainer_log_shows_its_newest_line_first(tab):
    model = tab.root.model("dog")
    model.logs.mkdir(parents=True)
    model.train_log.write_text("warning: the first line\nthe second line\n")
    assert tab.show_model(db_model_select="dog")["db_log"] == "the second line\nwarning: the first line"


def test_a_quiet_data_root_polls_nothing_and_detects_no_source(tab):
    assert tab.poll(shown=None) == {}
    assert tab.detect_source(db_checkpoint=None, db_source="") == {"db_detected": ""}
    assert "no such file" in tab.detect_source(db_source="/nowhere/x.safetensors")["db_detected"]


def test_a_concepts_folder_shows_its_photos_and_their_captions(tab, tmp_path):
    from PIL import Image

    from dreambooth.ui.handlers import concept_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a <b>zwx</b> dog")
    shown = concept_photos(tab.page, {"db_c1_instance_data_dir": str(folder)}, index=1)["db_c1_photos"]
    assert "3 images in" in shown and "1 with a caption" in shown and shown.count("<img ") == 3
    assert "a &lt;b&gt;zwx&lt;/b&gt; dog" in shown and "<b>" not in shown  # a caption is text, never markup
    assert 'src="data:image/jpeg;base64,' in shown
    missing = concept_photos(tab.page, {"db_c0_instance_data_dir": str(tmp_path / "nowhere")})["db_c0_photos"]
    assert "is not a folder" in missing and "db-error" in missing
    assert concept_photos(tab.page, {"db_c2_instance_data_dir": " "}, index=2) == {"db_c2_photos": ""}
