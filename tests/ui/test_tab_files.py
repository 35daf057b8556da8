"""The tab's "Save concepts" / "Load concepts": only files in the data root's concepts folder (and, for loading, under
models/dreambooth) are written or read, whatever the page sends, and no error quotes what a file holds."""
import json
import os

import pytest

from dreambooth.config import MAX_CONFIG_BYTES, Concept, Config
from dreambooth.errors import UserError
from dreambooth.store import DataRoot
from dreambooth.ui.concepts_files import concepts_folder, load_concepts, save_concepts

SECRET = "s3cr3t-TOKEN"


@pytest.fixture
def root(tmp_path):
    return DataRoot(tmp_path / "root").ensure()


def tree(path):
    return sorted(str(p) for p in path.rglob("*"))


def concepts_config(prompt="a photo of zwx dog"):
    return Config(concepts=(Concept(instance_data_dir="/data/dog", instance_prompt=prompt),))


def test_save_and_load_round_trip(root):
    path = save_concepts(root, "dogs", concepts_config())
    assert path == concepts_folder(root) / "dogs.json" and path.parent.parent == root.dreambooth
    assert json.loads(path.read_text())[0]["instance_prompt"] == "a photo of zwx dog"
    assert save_concepts(root, " dogs.json ", concepts_config("again")) == path  # overwriting its own file is fine
    for name in ("dogs", "dogs.json", str(path)):
        config, loaded = load_concepts(root, name)
        assert loaded == path.resolve() and config.concepts[0].instance_prompt == "again"
    assert root.model_names() == []  # the concepts folder is never taken for a model


def test_load_a_models_config_by_name(root):
    model = root.model("cat")
    model.path.mkdir(parents=True)
    concepts_config("a zwx cat").save(model.config_path)
    config, path = load_concepts(root, "cat")
    assert path == model.config_path.resolve() and config.concepts[0].instance_prompt == "a zwx cat"


HOSTILE_SAVE_NAMES = ["/tmp/evil.json", "../evil", "../../evil.json", "..\\evil", "a/b", "~/evil.json", ".hidden",
                      "-rf", "x" * 200, "", "   ", "evil\n.json", "nul\x00.json", "con..json"]


@pytest.mark.parametrize("name", HOSTILE_SAVE_NAMES)
def test_save_writes_nothing_outside_the_concepts_folder(root, tmp_path, name):
    before = tree(tmp_path)
    with pytest.raises(UserError, match="concepts file"):
        save_concepts(root, name, concepts_config())
    assert tree(tmp_path) == before


def test_save_refuses_a_concepts_folder_that_leads_outside(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    concepts_folder(root).symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="leads outside"):
        save_concepts(root, "dogs", concepts_config())
    assert list(outside.iterdir()) == []


def test_save_replaces_a_symlink_not_its_target(root, tmp_path):
    target = tmp_path / "victim.json"
    target.write_text("keep me")
    concepts_folder(root).mkdir()
    (concepts_folder(root) / "dogs.json").symlink_to(target)
    save_concepts(root, "dogs", concepts_config())
    assert target.read_text() == "keep me"
    assert not (concepts_folder(root) / "dogs.json").is_symlink()


@pytest.fixture
def outside_secret(tmp_path):
    path = tmp_path / "private.json"
    path.write_text(json.dumps({"concepts": [{"instance_prompt": SECRET}], SECRET: SECRET}))
    return path


def test_load_reads_nothing_outside(root, tmp_path, outside_secret):
    concepts_folder(root).mkdir()
    (concepts_folder(root) / "link.json").symlink_to(outside_secret)
    (root.dreambooth / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    for text in (str(outside_secret), "../../../private.json", "../../../../private", "/etc/passwd", "/etc/hostname",
                 "link.json", str(root.dreambooth / "linked_dir" / "private.json"), "~/.bashrc", "/dev/zero",
                 "/proc/self/environ"):
        with pytest.raises(UserError) as e:
            load_concepts(root, text)
        assert SECRET not in str(e.value) and "\n" not in str(e.value)
        assert "only files under" in str(e.value) or "not found" in str(e.value)


BAD_FILES = {  # content -> words of the one-line error
    "not JSON": (f'{{"{SECRET}": '.encode(), "not valid JSON"),
    "invalid UTF-8": (b'["\xff' + SECRET.encode() + b'"]', "UTF-8"),
    "NaN": (f'[{{"instance_prompt": "{SECRET}", "num_samples": NaN}}]'.encode(), "NaN"),
    "nested": (b"[" * 40 + b"]" * 40, "nested"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nested"),
    "unknown keys": (json.dumps([{SECRET: SECRET}]).encode(), "do not fit"),
    "bad values": (json.dumps([{"instance_prompt": ["x"], "num_samples": SECRET}]).encode(), "do not fit"),
    "an object": (json.dumps({SECRET: [1, 2]}).encode(), "not a concepts file"),
    "a number": (b"12345", "not a concepts file"),
    "too many": (json.dumps([{"instance_prompt": f"p{i}"} for i in range(5)]).encode(), "5 concepts"),
    "too large": (b"[" + b" " * MAX_CONFIG_BYTES + b"]", "larger than"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_one_line_that_quotes_nothing(root, case):
    content, words = BAD_FILES[case]
    concepts_folder(root).mkdir()
    (concepts_folder(root) / "bad.json").write_bytes(content)
    with pytest.raises(UserError) as e:
        load_concepts(root, "bad")
    message = str(e.value)
    assert words in message and SECRET not in message and "\n" not in message and len(message) < 400


def test_an_unreadable_file_is_one_line(root, monkeypatch):
    concepts_folder(root).mkdir()
    path = concepts_folder(root) / "locked.json"
    path.write_text("[]")
    from pathlib import Path

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match="cannot be read \\(Permission denied\\)"):
        load_concepts(root, "locked")
    assert os.path.exists(path)
