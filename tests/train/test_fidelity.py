"""Fidelity scores at every save, with real transformers CLIP and DINO ViT models built tiny and random (the numbers
mean nothing then; the path is the one a real model takes): the events, the saved history, the best save, the
early stop, and a run that goes on without scores when the models are missing."""
import json
import threading

import pytest

from dreambooth.models import read_fidelity
from dreambooth.train import train_model
from dreambooth.train.fidelity import Scores, best_save, evaluation_prompts
from dreambooth.events import Controls
from dreambooth.ui.views import fidelity_table
from train_helpers import draw_images, make_model, read_events, wait_for


def write_scorers(folder, init_scale: float = 1.0):
    """A tiny CLIPModel (with an offline CLIP tokenizer) and a tiny ViT, saved as folders as a download would be.
    At the default initialisation every image embeds nearly alike; ten times larger weights tell colours apart."""
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from dreambooth.families import write_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                                vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8,
                                initializer_factor=init_scale))
    clip.save_pretrained(folder / "clip", safe_serialization=True)
    write_tokenizer(folder / "clip")
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8, initializer_range=0.02 * init_scale)).save_pretrained(
        folder / "dino", safe_serialization=True)
    return folder / "clip", folder / "dino"


@pytest.fixture(scope="session")
def scorers(tmp_path_factory):
    return write_scorers(tmp_path_factory.mktemp("scorers"))


def fidelity_model(tmp_path, tiny_source, scorers, **parameters):
    concepts = [{"instance_data_dir": str(draw_images(tmp_path / "instance", count=2)), "instance_token": "zwx",
                 "class_token": "disc", "num_samples": 0, "sample_prompt": "a zwx disc"}]
    settings = dict(fidelity_scores=True, fidelity_clip_model=str(scorers[0]), fidelity_dino_model=str(scorers[1]),
                    fidelity_images_per_prompt=1, fidelity_infer_steps=2, num_train_epochs=3, save_every_n_epochs=1)
    return make_model(tmp_path / "root", tiny_source, concepts=concepts, **{**settings, **parameters})


def fidelity_events(model) -> list[dict]:
    return [e for e in read_events(model) if e["kind"] == "fidelity"]


def test_every_save_is_scored_and_the_best_one_named(tmp_path, tiny_source, scorers, capsys):
    from dreambooth.cli import main

    # random scoring models find every image alike (copy ~0.99): no copy limit, so that a best save exists
    root, model = fidelity_model(tmp_path, tiny_source, scorers, fidelity_copy_limit=1.0, fidelity_prompt_margin=0.0)
    result = train_model(root, "m")
    assert result.ok, result.summary()
    events = fidelity_events(model)
    assert [e["step"] for e in events] == [2, 4, 6]  # every save, the last one too
    for e in events:
        assert all(-1.0 <= e[k] <= 1.0 for k in ("dino", "clip_i", "clip_t", "copy")) and e["copy"] >= e["dino"] - 1e-6
    history = read_fidelity(model)
    assert [s["step"] for s in history["saves"]] == [2, 4, 6] and history["best_step"] == events[-1]["best_step"]
    recorded = [(s["step"], Scores(s["dino"], s["clip_i"], s["clip_t"], s["copy"])) for s in history["saves"]]
    assert history["best_step"] == best_save(recorded, prompt_margin=0.0, copy_limit=1.0)  # the run's own rule
    summary = json.loads(model.training_summary.read_text())
    assert summary["fidelity"]["best_step"] == history["best_step"] and set(summary["fidelity"]) >= {"dino", "clip_t"}
    capsys.readouterr()
    assert main(["--root", str(root.root), "scores", "m"]) == 0
    printed = capsys.readouterr().out
    best = history["best_step"]
    assert result.best_step == best and f"best save by fidelity: step {best}" in result.summary()
    assert best in (2, 4, 6) and printed.count("best") == 2 and f"best save: step {best} (" in printed and f"m_{best}.safetensors" in printed


def test_a_model_that_does_not_learn_scores_the_same_at_every_save(tmp_path, tiny_source, scorers):
    root, model = fidelity_model(tmp_path, tiny_source, scorers, learning_rate=0.0, text_encoder_learning_rate=0.0,
                                 fidelity_images_per_prompt=2)  # a prompt's images made in one batch
    assert train_model(root, "m").ok
    scores = [tuple(e[k] for k in ("dino", "clip_i", "clip_t", "copy")) for e in fidelity_events(model)]
    assert len(scores) == 3 and len(set(scores)) == 1  # nothing learnt: the same images, the same scores
    learning_root, learning = fidelity_model(tmp_path / "learns", tiny_source, scorers, learning_rate=5e-3)
    assert train_model(learning_root, "m").ok
    moved = [tuple(e[k] for k in ("dino", "clip_i", "clip_t", "copy")) for e in fidelity_events(learning)]
    # a model that trains is judged differently at each save (random scoring models find its images nearly alike,
    # so one score alone may repeat at four decimals; the four together do not)
    assert len(set(moved)) == 3, moved


def test_sample_now_scores_the_working_weights_without_making_them_the_best_save(tmp_path, tiny_source, scorers,
                                                                               capsys):
    from dreambooth.cli import main

    root, model = fidelity_model(tmp_path, tiny_source, scorers, num_train_epochs=200, fidelity_copy_limit=1.0,
                                 fidelity_prompt_margin=1.0)
    controls = Controls(model.control)

    def drive():
        wait_for(model, "fidelity")  # the first save, scored
        controls.request("sample")
        wait_for(model, "fidelity", saved=False)
        controls.request("cancel")

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    result = train_model(root, "m")
    driver.join(5)
    assert result.status == "cancelled"
    events = fidelity_events(model)
    sampled = [e for e in events if not e["saved"]]
    saved_steps = [e["step"] for e in events if e["saved"]]
    # no margin, no copy limit: some save is always the best, and Sample now's scores never are
    assert len(sampled) == 1 and sampled[0]["step"] > 2 and sampled[0]["best_step"] in saved_steps
    history = read_fidelity(model)
    best = history["best_step"]
    assert best in saved_steps and [s["saved"] for s in history["saves"]].count(False) == 1
    table = fidelity_table(history)
    assert f"<td>{sampled[0]['step']} (Sample now)</td>" in table and f"<td>{best} (best)</td>" in table
    capsys.readouterr()
    assert main(["--root", str(root.root), "scores", "m"]) == 0
    printed = capsys.readouterr().out
    assert "(Sample now, not saved)" in printed and f"best save: step {best}" in printed


def test_patience_stops_a_run_that_stopped_getting_better(tmp_path, tiny_source, scorers):
    root, model = fidelity_model(tmp_path, tiny_source, scorers, num_train_epochs=6, fidelity_patience=1,
                                 fidelity_copy_limit=0.0)  # no save can qualify: the first one without is enough
    result = train_model(root, "m")
    assert result.ok and result.step == 2, result.summary()
    assert "stopped early: 1 scored saves without a better one (no save qualified)" in result.message


def test_missing_scoring_models_are_one_line_and_the_run_goes_on(tmp_path, tiny_source, scorers):
    root, model = fidelity_model(tmp_path, tiny_source, scorers, fidelity_clip_model=str(tmp_path / "no-clip"))
    with pytest.warns(UserWarning, match=r"fidelity scores: cannot load the CLIP model .*no-clip.*training goes on "
                                         r"without scores"):
        result = train_model(root, "m")
    assert result.ok and fidelity_events(model) == [] and read_fidelity(model)["saves"] == []


def test_the_best_save_rule():
    def s(dino, clip_t, copy=0.5):
        return Scores(dino=dino, clip_i=0.0, clip_t=clip_t, copy=copy)

    history = [(2, s(0.2, 0.30)), (4, s(0.5, 0.29)), (6, s(0.7, 0.20)), (8, s(0.9, 0.30, copy=0.99))]
    assert best_save(history, prompt_margin=0.02, copy_limit=0.95) == 4  # 6 forgot the prompt, 8 copies its photos
    assert best_save(history, prompt_margin=0.2, copy_limit=1.0) == 8
    assert best_save([], 0.02, 0.95) is None and best_save(history[:1], 0.0, 0.1) is None
    assert evaluation_prompts(["a zwx dog"], "zwx", "dog")[:2] == ["a zwx dog", "a photo of zwx dog on the beach"]
    assert evaluation_prompts(["a zwx dog"], "", "") == ["a zwx dog"]


def test_the_scores_rank_the_subject_above_other_images(tmp_path):
    """With scoring models that tell colours apart, the four numbers order images as the paper reads them: copies of
    the photos above new images of the same subject, and those above other subjects and noise; the copy score is 1
    for exact copies. (Whether a trained model's scores rise over its saves needs a model that can draw its
    subject: the tiny random one cannot, so that is measured with real weights, not here.)"""
    from PIL import Image, ImageDraw

    from dreambooth.train.fidelity import Scorers

    def disc(i, background=(20, 40, 200), colour=(230, 40, 30)):
        image = Image.new("RGB", (64, 64), background)
        ImageDraw.Draw(image).ellipse([6 + 3 * i, 8 + 2 * i, 52 - 2 * i, 56 - 3 * i], fill=colour)
        return image

    clip, dino = write_scorers(tmp_path, init_scale=10.0)
    scorers = Scorers.load(str(clip), str(dino), "cpu")
    photos = [disc(i) for i in range(3)]
    real = scorers.real(0, lambda: photos)
    prompts = ["a photo of a zwx disc"] * 2
    copies = scorers.score(photos[:2], prompts, real)
    subject = scorers.score([disc(4), disc(5)], prompts, real)
    other = scorers.score([disc(4, (200, 200, 30), (20, 160, 40)), disc(5, (240, 240, 240), (10, 10, 10))], prompts,
                          real)
    noise = scorers.score([Image.effect_noise((64, 64), 80).convert("RGB") for _ in range(2)], prompts, real)
    assert copies.copy == pytest.approx(1.0, abs=1e-5) and copies.copy > subject.copy > max(other.copy, noise.copy)
    for score in ("dino", "clip_i"):
        assert getattr(copies, score) > getattr(subject, score) > max(getattr(other, score), getattr(noise, score))
