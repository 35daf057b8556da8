"""What the tab shows, from files and declarations alone (no browser): the live log, messages in the tab's words,
the checkpoint list with its txt2img buttons, captioned previews, the loss chart, resume in the status line."""
import re

import pytest

from dreambooth import actions, jobs
from dreambooth.config import Config, ConfigError
from dreambooth.events import Checkpoint, Done, EventLog, Sample, Start, Step
from dreambooth.store import DataRoot
from dreambooth.ui import views


def test_log_tail_keeps_the_trainers_lines_without_progress_bar_redraws(tmp_path):
    root = DataRoot(tmp_path).ensure()
    model = root.model("dog")
    model.logs.mkdir(parents=True)
    model.train_log.write_text(
        "loop.py:123: UserWarning: mixed_precision fp16 needs a GPU; training in full precision\n"
        "training dog:   0%|          | 0/24 [00:00<?, ?step/s]\rtraining dog:   4%|▍         | 1/24 "
        "[00:01<00:45,  2.00s/step, epoch=0, loss=2.2367]\rtraining dog:   8%|▊         | 2/24 [00:03<00:37]"
        "some warning printed after a bar\n"
        "\x1b[AWriting model shards: 100%|██████████| 1/1 [00:00<00:00, 54.22it/s]\n"
        "done: trained 24 steps (step 24/24)\n")
    assert jobs.log_tail(root, "dog").splitlines() == [
        "loop.py:123: UserWarning: mixed_precision fp16 needs a GPU; training in full precision",
        "some warning printed after a bar", "done: trained 24 steps (step 24/24)"]


def test_config_errors_in_the_tabs_words_name_the_fields(tmp_path):
    with pytest.raises(ConfigError) as bad:
        Config.from_dict({"concepts": [{}, {"num_class_images_per_image": 1.5}],
                          "parameters": {"num_train_epochs": None, "learning_rate": "fast"}})
    text, fields = views.explain(bad.value)
    assert text.splitlines() == ["Concept 2 › Class images per instance image: enter a whole number, got 1.5",
                                 "Training epochs: enter a whole number",
                                 "UNet learning rate: enter a number, got 'fast'"]
    assert fields == ["db_c1_num_class_images_per_image", "db_p_num_train_epochs", "db_p_learning_rate"]
    from dreambooth.config import validate_for_training

    with pytest.raises(ConfigError) as missing:
        validate_for_training(Config.from_dict({"concepts": [{"instance_data_dir": str(tmp_path / "gone")}]}))
    text, fields = views.explain(missing.value)
    assert re.fullmatch(r"Concept 1 › Instance images folder: '.*gone' is not a folder", text)
    assert fields == ["db_c0_instance_data_dir"] and "--" not in text

    # A sample prompt file is named by its label, and the field is marked; so are both fields of a cross-field rule.
    with pytest.raises(ConfigError) as unusable:
        validate_for_training(Config.from_dict({"concepts": [{"instance_data_dir": str(tmp_path),
                                                              "sample_prompt_file": str(tmp_path)}]}))
    text, fields = views.explain(unusable.value)
    assert re.fullmatch(r"Concept 1 › Sample prompt template file: '.*' is a folder; choose a text file with one "
                        r"prompt per line", text)
    assert fields == ["db_c0_sample_prompt_file"]
    with pytest.raises(ConfigError) as rising:
        Config.from_dict({"parameters": {"prior_loss_weight": 0.5, "prior_loss_weight_min": 0.8,
                                         "prior_loss_scale_epochs": 2}})
    text, fields = views.explain(rising.value)
    assert text == ("Minimum prior loss weight: 0.8 is above the Prior loss weight (0.5); with Prior loss scaling "
                    "epochs on, the weight can only fall to the minimum")
    assert fields == ["db_p_prior_loss_weight_min"]


@pytest.mark.slow  # imports diffusers, for the previews' PNG text as the trainer writes it
def test_status_checkpoints_previews_and_chart(tmp_path):
    root = DataRoot(tmp_path).ensure()
    model = root.model("dog")
    model.path.mkdir(parents=True)
    Config().save(model.config_path)
    from dreambooth.data.images import png_parameters, save_png
    from PIL import Image

    preview = model.samples / "30-0-0.png"
    save_png(Image.new("RGB", (8, 8)), preview,
             png_parameters("a zwx dog", "", 10, 7.5, 420, 8, 8, {"Model": "dog", "Training step": 30}))
    older = root.checkpoints / "dog_10.safetensors"  # written by an earlier run
    older.write_bytes(b"x")
    lora = root.lora / "dog_30.safetensors"
    lora.write_bytes(b"x")
    log = EventLog(model.events)
    log.emit(Start(total_steps=40, epochs=4, steps_per_epoch=10, step=20))
    for step in range(21, 31):
        log.emit(Step(step, 2, loss=1.0 / step, lr=1e-6, it_per_s=2.0, eta_s=5.0, memory_mb=100.0))
    elsewhere = tmp_path / "custom.safetensors"
    elsewhere.write_bytes(b"x")
    log.emit(Sample(30, (str(preview),)))
    log.emit(Checkpoint(30, str(elsewhere)))
    st = jobs.status(root, "dog")
    assert "resuming at step 20 of 40" not in views.status_line(st)  # only while it runs
    st.state = "running"
    assert "resuming at step 20 of 40" in views.status_line(st)
    log.emit(Done(30, "cancelled"))
    st = jobs.status(root, "dog")
    assert "this run trained 10 steps" in views.status_line(st)

    files = actions.model_files(root, "dog", st.checkpoints)
    assert {f.name for f in files} == {"dog_10.safetensors", "dog_30.safetensors", "custom.safetensors"}
    html = views.checkpoint_list(files, {str(older): "dog_10.safetensors [abc123]"}, root.lora)
    assert 'data-db-checkpoint="dog_10.safetensors [abc123]"' in html
    assert 'data-db-lora="&lt;lora:dog_30:1&gt;"' in html
    assert html.count("hidden>Use in txt2img</button>") == 3  # the page's script shows them where txt2img is

    assert views.previews(model.samples) == [(str(preview), "step 30 · a zwx dog · seed 420")]
    chart = views.loss_chart(st.losses)
    assert chart.count("<polyline") == 2 and ">step<" in chart and ">loss<" in chart
    assert views.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def a_run(tmp_path):
    """A data root with the model dog and its event log, where a run of 4 steps has started."""
    root = DataRoot(tmp_path).ensure()
    model = root.model("dog")
    model.path.mkdir(parents=True)
    log = EventLog(model.events)
    log.emit(Start(total_steps=4, epochs=1, steps_per_epoch=4, step=0))
    return root, log


def test_nothing_to_do_says_how_to_continue_and_keeps_the_last_chart(tmp_path):
    root, log = a_run(tmp_path)
    for step in range(1, 5):
        log.emit(Step(step, 0, loss=1.0, lr=1e-6, it_per_s=2.0, eta_s=0.0, memory_mb=1.0))
    log.emit(Done(4, "trained 4 steps"))
    log.clear()  # the next run
    log.emit(Start(total_steps=4, epochs=1, steps_per_epoch=4, step=4))
    log.emit(Done(4, "already trained to the last step; nothing to do"))
    st = jobs.status(root, "dog")
    line = views.status_line(st)
    assert "nothing to do" in line and "raise Training epochs" in line
    assert len(st.losses) == 4


def test_resume_from_lists_the_saves_and_reads_back_only_what_it_listed():
    from dreambooth.errors import UserError
    from dreambooth.ui.views import chosen_save, save_choices

    choices = save_choices([38, 36, 24])
    assert choices == ["the latest save, step 38", "the save at step 36", "the save at step 24"]
    assert [chosen_save(c) for c in choices] == [None, 36, 24] and chosen_save(None) is None
    for forged in ("the save at step 24; rm -rf", "step 5", "the save at step -1"):
        with pytest.raises(UserError, match="Resume from: choose one of the listed saves"):
            chosen_save(forged)


def test_fidelity_scores_newest_first_with_the_best_save_marked(tmp_path):
    from dreambooth.models import read_fidelity, write_fidelity

    model = DataRoot(tmp_path / "root").ensure().model("dog")
    model.path.mkdir(parents=True)
    assert read_fidelity(model) == {"best_step": None, "saves": []} and views.fidelity_table(read_fidelity(model)) == ""
    scores = {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.3, "copy": 0.7}
    write_fidelity(model, [{"step": 2, **scores}, {"step": 4, **scores, "dino": 0.61}], 4)
    table = views.fidelity_table(read_fidelity(model))
    assert table.index("<td>4 (best)</td><td>0.610</td>") < table.index("<td>2</td><td>0.500</td>")
    assert "best save: step 4" in table
    assert table.count("<polyline") == 4 and 'class="db-fidelity-best" x1="472.0"' in table  # the best: the last
    one = {"best_step": None, "saves": read_fidelity(model)["saves"][:1]}
    assert views.fidelity_chart(one) == "" and "<table" in views.fidelity_table(one)  # a chart from two saves on
    files = [tmp_path / "dog_2.safetensors", tmp_path / "dog_4.safetensors", tmp_path / "dog_40.safetensors"]
    for f in files:
        f.write_bytes(b"x")
    listed = views.checkpoint_list(files, best_step=4)
    assert listed.count("best save") == 1 and "dog_4.safetensors</code> <strong class=\"db-best\">" in listed
    for damaged in ('{"saves": [{"step": "<b>x</b>"}]}', '{"saves": [], "best_step": true}', "[1, 2", "\xff",
                    '{"saves": [{"step": 1, "dino": 0, "clip_i": 0, "clip_t": 0, "copy": 0, "saved": "no"}]}'):
        model.fidelity_scores.write_text(damaged, errors="surrogateescape")
        assert read_fidelity(model) == {"best_step": None, "saves": []}, damaged


def test_the_done_line_says_the_step_count_once_and_class_images_fill_the_bar(tmp_path):
    from dreambooth.events import ClassImages

    root, log = a_run(tmp_path)
    log.emit(ClassImages(3, 8, eta_s=10.0))
    st = jobs.status(root, "dog")
    st.state = "running"
    bar = views.progress_bar(st)
    assert 'style="width:37.5%"' in bar and "class images 3/8 ETA 0:10" in bar
    for step in range(1, 5):
        log.emit(Step(step, 0, loss=1.0, lr=1e-6, it_per_s=2.0, eta_s=0.0, memory_mb=1.0))
    log.emit(Done(4, "trained 4 steps"))
    st = jobs.status(root, "dog")
    line = views.status_line(st)
    assert line.count("trained 4 steps") == 1 and "this run trained 4 steps" in line
    assert "100% done" in views.progress_bar(st)
