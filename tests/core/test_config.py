import json
import re

import pytest

from dreambooth.config import (
    CONCEPT_SETTINGS, MODEL_SETTINGS, PARAMETER_SETTINGS, Config, ConfigError, Concept, Parameters,
    validate_for_training,
)


def test_every_declaration_is_complete_and_its_default_valid():
    for setting in MODEL_SETTINGS + CONCEPT_SETTINGS + PARAMETER_SETTINGS:
        assert setting.label and setting.tooltip, setting.name
        value, error = setting.check(setting.default)
        assert error is None, error
        assert value == setting.default


def test_names_are_unique_within_each_section():
    for section in (MODEL_SETTINGS, CONCEPT_SETTINGS, PARAMETER_SETTINGS):
        names = [s.name for s in section]
        assert len(names) == len(set(names))


def test_round_trip_through_json(tmp_path):
    config = Config(concepts=(Concept(instance_data_dir="/x", instance_token="zwx", class_token="dog"),),
                    parameters=Parameters(learning_rate=1e-5, optimizer="adamw"))
    path = tmp_path / "config.json"
    config.save(path)
    assert Config.load(path) == config
    assert json.loads(path.read_text())["parameters"]["learning_rate"] == 1e-5


def test_every_bad_field_is_named():
    data = {
        "model": {"family": "v3"},
        "concepts": [{"num_class_images_per_image": -1, "colour": "red"}],
        "parameters": {"learning_rate": "fast", "optimizer": "sgd", "train_batch_size": 1.5, "use_ema": 1,
                       "mystery": 3},
        "extra": {},
    }
    with pytest.raises(ConfigError) as e:
        Config.from_dict(data)
    message = str(e.value)
    for fragment in ("model.family", "concepts[0].num_class_images_per_image", "concepts[0].colour: unknown",
                     "parameters.learning_rate", "parameters.optimizer", "parameters.train_batch_size",
                     "parameters.use_ema", "parameters.mystery: unknown", "extra: unknown section"):
        assert fragment in message, fragment


def test_whole_floats_are_accepted_as_ints_and_ints_as_floats():
    config = Config.from_dict({"parameters": {"train_batch_size": 2.0, "learning_rate": 1}})
    assert config.parameters.train_batch_size == 2 and isinstance(config.parameters.train_batch_size, int)
    assert config.parameters.learning_rate == 1.0 and isinstance(config.parameters.learning_rate, float)


def test_bad_json_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(path)
    with pytest.raises(ConfigError, match="no such config file"):
        Config.load(tmp_path / "missing.json")


def test_training_needs_an_existing_instance_folder(tmp_path):
    with pytest.raises(ConfigError, match="no concept"):
        validate_for_training(Config(concepts=(Concept(),)))
    with pytest.raises(ConfigError, match=r"concepts\[0\].instance_data_dir"):
        validate_for_training(Config(concepts=(Concept(instance_data_dir=str(tmp_path / "nope")),)))
    validate_for_training(Config(concepts=(Concept(instance_data_dir=str(tmp_path)),)))


def test_empty_concept_slots_are_ignored():
    config = Config(concepts=(Concept(), Concept(instance_data_dir="/a"), Concept(instance_data_dir="  ")))
    assert [c.instance_data_dir for c in config.active_concepts] == ["/a"]


def test_class_folder_rule_applies_only_when_class_images_are_used(tmp_path):
    instance = str(tmp_path)
    missing = str(tmp_path / "no-such-folder")
    # prior preservation off: a leftover class folder path is not read, so it does not matter
    validate_for_training(Config(concepts=(Concept(instance_data_dir=instance, class_data_dir=missing),)))
    # on, with a folder that is not there: named
    with pytest.raises(ConfigError, match=r"concepts\[0\].class_data_dir: .* is not a folder"):
        validate_for_training(Config(concepts=(Concept(instance_data_dir=instance, class_data_dir=missing,
                                                       num_class_images_per_image=2),)))
    # on, with a real folder, or with none (generated): fine
    validate_for_training(Config(concepts=(Concept(instance_data_dir=instance, class_data_dir=instance,
                                                   num_class_images_per_image=2),)))
    validate_for_training(Config(concepts=(Concept(instance_data_dir=instance, num_class_images_per_image=2),)))


SECRET = "s3cr3t-prompt"


def hostile_prompt_files(tmp_path):
    """(path, words of the error) for each sample prompt file that cannot be used."""
    files = {"folder": (tmp_path, "is a folder"), "missing": (tmp_path / "gone.txt", "no such file")}
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(f"caf\xe9 {SECRET}\n".encode("latin-1"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(SECRET.encode() + b"\x00\x01\x02\n")
    big = tmp_path / "big.txt"
    big.write_text((SECRET + "\n") * (64 * 1024 // len(SECRET)), encoding="utf-8")
    many = tmp_path / "many.txt"
    many.write_text("".join(f"{SECRET} {i}\n" for i in range(65)), encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text(f"# {SECRET}\n\n   \n#another comment\n", encoding="utf-8")
    long_line = tmp_path / "long.txt"
    long_line.write_text("ok\n" + SECRET * 200 + "\n", encoding="utf-8")
    files.update({"not UTF-8": (latin1, "is not UTF-8 text"), "binary": (binary, "binary data"),
                  "over 64 KiB": (big, "too large .*64 KiB"), "65 prompts": (many, "more than 64 prompts"),
                  "no prompt": (empty, "has no prompt"), "long line": (long_line, "line 2 is too long"),
                  "device": ("/dev/zero", "not a regular file")})
    return files


def test_a_sample_prompt_file_that_cannot_be_used_is_one_line_naming_the_setting(tmp_path):
    from dreambooth.prompt_files import read_prompt_file

    instance = tmp_path / "instance"
    instance.mkdir()
    for case, (path, words) in hostile_prompt_files(tmp_path).items():
        config = Config(concepts=(Concept(instance_data_dir=str(instance), sample_prompt_file=str(path)),))
        Config.from_dict(config.to_dict())  # a config being edited may name a file not written yet
        with pytest.raises(ConfigError) as bad:
            validate_for_training(config)
        message = str(bad.value)
        assert re.match(rf"concepts\[0\]\.sample_prompt_file: '[^']*'.*{words}", message), (case, message)
        assert "\n" not in message and SECRET not in message.replace(str(tmp_path), ""), case
    good = tmp_path / "good.txt"
    good.write_text("\ufeff# previews\n\na zwx dog on the moon\n  [filewords],   in the snow  \n", encoding="utf-8")
    assert read_prompt_file(good) == ["a zwx dog on the moon", "[filewords], in the snow"]
    validate_for_training(Config(concepts=(Concept(instance_data_dir=str(instance), sample_prompt_file=str(good)),)))
    # an empty slot's file is never read; an empty setting is the sample prompt as before
    validate_for_training(Config(concepts=(Concept(instance_data_dir=str(instance)),
                                           Concept(sample_prompt_file=str(tmp_path / "gone.txt")))))


@pytest.mark.parametrize("value, words", [
    (float("nan"), "finite"), (float("inf"), "finite"), (10 ** 400, "far too large"), ("1e-6", "enter a number"),
    (None, "enter a number"), (True, "enter a number"),
])
def test_numbers_that_are_not_numbers_are_named(value, words):
    with pytest.raises(ConfigError, match=f"parameters.learning_rate: .*{words}"):
        Config.from_dict({"parameters": {"learning_rate": value}})


def test_text_settings_are_bounded():
    with pytest.raises(ConfigError, match=r"concepts\[0\].instance_prompt: too long"):
        Config.from_dict({"concepts": [{"instance_prompt": "a" * 50_000_000}]})
    with pytest.raises(ConfigError, match="NUL"):
        Config.from_dict({"concepts": [{"instance_token": "zw\x00x"}]})
    with pytest.raises(ConfigError, match="at most 100"):
        Config.from_dict({"concepts": [{}] * 101})


def test_a_bad_value_is_never_echoed_at_length():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"parameters": {"optimizer": "secret-" * 1000, "k" * 500: 1}})
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe{}", "not UTF-8"), (b'{"parameters": {"learning_rate": NaN}}', "NaN is not a number"),
    (b'{"parameters": {"learning_rate": Infinity}}', "Infinity is not a number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b'{"a": [[[[[[[[[[1]]]]]]]]]]}', "nested too deeply"),
    (b"{" + b" " * (2 << 20) + b"}", "too large"), (b'{"secret": "hunter2"', "not valid JSON"),
])
def test_config_files_are_parsed_within_bounds(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as e:
        Config.load(path)
    assert "hunter2" not in str(e.value)


def test_set_overrides_are_parsed_by_each_settings_type():
    from dreambooth.config import parse_overrides

    assert parse_overrides(["learning_rate=1e-5", "train_batch_size=2", "use_ema=yes", "optimizer=adamw"]) == {
        "learning_rate": 1e-5, "train_batch_size": 2, "use_ema": True, "optimizer": "adamw"}
    for bad, words in (("learnin_rate=1", "learnin_rate: unknown setting"), ("learning_rate", "NAME=VALUE"),
                       ("train_batch_size=1.5", "whole number"), ("use_ema=maybe", "true or false"),
                       ("optimizer=sgd", "not one of"), ("learning_rate=nan", "finite")):
        with pytest.raises(ConfigError, match=words):
            parse_overrides([bad])


def test_sections_are_typed_dataclasses_and_code_reads_only_declared_settings():
    """A misspelt setting name fails at once: every `params.X` / `p.X` / `.parameters.X` / `concept.X` read in the
    product names a declared setting (the sections are plain dataclasses, so a type checker sees them too)."""
    import re
    from dataclasses import fields as dc_fields
    from pathlib import Path

    import dreambooth

    assert [f.name for f in dc_fields(Parameters)] == [s.name for s in PARAMETER_SETTINGS]
    with pytest.raises(AttributeError):
        Parameters().learnin_rate  # noqa: B018
    declared = {s.name for s in PARAMETER_SETTINGS}
    concept_declared = {s.name for s in CONCEPT_SETTINGS}
    read = re.compile(r"\b(?:params|self\.p|\.parameters|self\.params)\.([a-z_][a-z0-9_]*)\b")
    concept_read = re.compile(r"\bconcept\.([a-z_][a-z0-9_]*)\b")
    package = Path(dreambooth.__file__).parent
    unknown = set()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        unknown |= {(path.name, n) for n in read.findall(text) if n not in declared and not hasattr(dict, n)}
        unknown |= {(path.name, n) for n in concept_read.findall(text) if n not in concept_declared
                    and not hasattr(dict, n)}
    assert not unknown


def test_the_model_section_is_fixed_by_create(tmp_path):
    from dreambooth.models import load_config, save_config
    from dreambooth.store import DataRoot

    model = DataRoot(tmp_path).model("dog")
    model.path.mkdir(parents=True)
    Config.from_dict({"model": {"source": "/x.safetensors", "family": "v1"}}).save(model.config_path)
    (model.working).mkdir()
    (model.working / "model_index.json").write_text("{}")
    (model.working / "dreambooth_model.json").write_text('{"family": "v1"}')
    with pytest.raises(ConfigError, match="model.family: is set when the model is created"):
        save_config(model, {"model": {"source": "/x.safetensors", "family": "sdxl"}})
    saved = save_config(model, {"parameters": {"learning_rate": 1e-5}})  # no model section: the model's own
    assert saved.model.family == "v1" and load_config(model).parameters.learning_rate == 1e-5
    # edited by hand behind our back: refused before any training, in words
    data = json.loads(model.config_path.read_text())
    data["model"]["family"] = "sdxl"
    model.config_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError.__mro__[1], match="is a v1 model; the family is set when a model is created"):
        load_config(model)


def test_the_cli_says_one_line_and_keeps_the_cause_for_debugging(tmp_path, capsys, monkeypatch):
    from dreambooth.cli import main
    from dreambooth.store import DataRoot

    model = DataRoot(tmp_path).model("dog")
    model.path.mkdir(parents=True)
    model.config_path.write_bytes(b"\xff not utf-8")
    assert main(["--root", str(tmp_path), "train", "dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {model.config_path}: not UTF-8 text"]
    monkeypatch.setenv("DREAMBOOTH_DEBUG", "1")
    assert main(["--root", str(tmp_path), "train", "dog"]) == 2
    assert "UnicodeDecodeError" in capsys.readouterr().err
