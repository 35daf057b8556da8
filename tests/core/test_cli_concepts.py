"""The CLI edits a model's concepts as the tab's Concepts panel does, and takes --root before or after the verb."""
import pytest

from dreambooth.cli import main
from dreambooth.config import Config


@pytest.fixture
def root(settings_only_model):
    return settings_only_model[0]


def concepts(root):
    return Config.load(root.model("dog").config_path).concepts


def test_concepts_are_added_listed_changed_and_removed(root, tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(photos / f"{i}.png")
    at = ["--root", str(root.root)]
    assert main(["concept", "add", "dog", "--instance-dir", str(photos), "--instance-token", "zwx", "--class-token",
                 "dog", "--set", "num_class_images_per_image=2", *at]) == 0
    printed = capsys.readouterr().out
    assert "added concept 1 to dog" in printed and f"1: {photos} (3 images)" in printed and "token 'zwx'" in printed
    assert concepts(root)[0].num_class_images_per_image == 2 and concepts(root)[0].class_token == "dog"
    assert main([*at, "concept", "add", "dog", "--instance-dir", str(tmp_path / "other")]) == 0
    assert main([*at, "concept", "set", "dog", "2", "instance_token=sks", "sample_prompt=a sks cat"]) == 0
    assert "changed concept 2 of dog: instance_token, sample_prompt" in capsys.readouterr().out
    assert [c.instance_token for c in concepts(root)] == ["zwx", "sks"]
    assert main([*at, "concept", "remove", "dog", "1"]) == 0
    assert [c.instance_token for c in concepts(root)] == ["sks"]
    assert main([*at, "concept", "list", "dog"]) == 0
    assert "1: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["concept", "set", "dog", "3", "instance_token=x"], "concept 3: the model has 0 concept(s), numbered from 1"),
    (["concept", "add", "dog", "--instance-dir", "/x", "--set", "colour=red"], "concept.colour: unknown setting"),
    (["concept", "add", "dog", "--instance-dir", "/x", "--set", "num_samples=many"], "num_samples: enter a whole"),
    (["concept", "set", "dog", "1", "nonsense"], "'nonsense': expected NAME=VALUE"),
    (["concept", "list", "cat"], "model 'cat': not found"),
])
def test_bad_concept_edits_are_one_line_and_change_nothing(root, capsys, argv, said):
    before = root.model("dog").config_path.read_bytes()
    assert main([*argv, "--root", str(root.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
    assert root.model("dog").config_path.read_bytes() == before


def test_root_after_the_verb_wins_over_the_one_before(root, tmp_path, capsys):
    assert main(["--root", str(tmp_path / "elsewhere"), "concept", "list", "dog", "--root", str(root.root)]) == 0
    assert "dog has no concept" in capsys.readouterr().out
    assert main(["--root", str(tmp_path / "elsewhere"), "concept", "list", "dog"]) == 2
