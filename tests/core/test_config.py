import json

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
