"""No path of the product replaces a file it did not write (dreambooth.outputs): the trainer's checkpoint never lands
on the model's own source or on another's file, an export's automatic name moves on to a free one, a name the user
typed replaces a file only with Overwrite, and a model's list holds its own files only."""
import shutil

import pytest

from dreambooth import actions
from dreambooth.errors import UserError
from dreambooth.models import export_model
from dreambooth.train import train_model
from train_helpers import make_model


def digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_named_after_its_source_file_never_trains_over_it(tmp_path, tiny_source):
    """Model `src` from models/Stable-diffusion/src_2.safetensors saves its step-2 checkpoint beside it, not on it."""
    checkpoints = tmp_path / "root" / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    source = checkpoints / "src_2.safetensors"
    shutil.copy(tiny_source, source)
    before = digest(source)
    root, model = make_model(tmp_path / "root", source, name="src", max_train_steps=2,
                             sample_every_n_epochs=0)
    result = train_model(root, "src")
    assert digest(source) == before  # the user's base model is intact
    written = [p.name for p in result.checkpoints]
    assert written == ["src_2-2.safetensors"], written
    listed = [p.name for p in actions.model_files(root, "src")]
    assert listed == ["src_2-2.safetensors"]  # the source is not the model's file


@pytest.fixture
def exported(tmp_path, tiny_source):
    root, model = make_model(tmp_path / "root", tiny_source, name="dog")
    return root, model


def test_an_export_without_a_name_never_replaces_a_file_it_did_not_write(exported):
    root, model = exported
    theirs = root.checkpoints / "dog_0.safetensors"
    theirs.write_bytes(b"someone else's checkpoint")
    path = export_model(root, "dog")
    assert path.name == "dog_0-2.safetensors" and theirs.read_bytes() == b"someone else's checkpoint"
    again = export_model(root, "dog")  # its own file is not replaced silently either (another format, fp16 ...)
    assert again.name == "dog_0-3.safetensors" and path.is_file()


def test_a_named_export_replaces_only_with_overwrite_and_never_the_source(exported, tiny_source):
    root, model = exported
    target = root.checkpoints / "mine.safetensors"
    target.write_bytes(b"a file of the user's")
    with pytest.raises(UserError, match="mine.safetensors exists .*Overwrite"):
        export_model(root, "dog", out=target)
    assert target.read_bytes() == b"a file of the user's"
    assert export_model(root, "dog", out=target, overwrite=True) == target and target.stat().st_size > 1000
    with pytest.raises(UserError, match="is the checkpoint model 'dog' was created from"):
        export_model(root, "dog", out=tiny_source, overwrite=True)


def test_a_checkpoints_yaml_counts_as_part_of_its_name(exported):
    """Exporting `foo` as safetensors must not replace the foo.yaml that belongs to an existing foo.ckpt."""
    from dreambooth.outputs import automatic, chosen

    root, model = exported
    (root.checkpoints / "foo.ckpt").write_bytes(b"ckpt")
    (root.checkpoints / "foo.yaml").write_text("the ckpt's config")
    with pytest.raises(UserError, match="foo.yaml exists"):
        chosen(model, root.checkpoints / "foo.safetensors", overwrite=False)
    assert automatic(model, root.checkpoints / "foo.safetensors").name == "foo-2.safetensors"


def test_a_models_list_holds_its_own_files_only(exported, tiny_source):
    root, model = exported
    other = make_model(root.root, tiny_source, name="dog_1")[1]
    assert other.exists()
    for name in ("dog_1_5.safetensors", "dog_12.safetensors", "dog_3_extract_r8.safetensors", "dogma_3.safetensors"):
        (root.checkpoints if "extract" not in name else root.lora).joinpath(name).write_bytes(b"x")
    assert sorted(p.name for p in actions.model_files(root, "dog")) == ["dog_12.safetensors",
                                                                             "dog_3_extract_r8.safetensors"]
    assert [p.name for p in actions.model_files(root, "dog_1")] == ["dog_1_5.safetensors"]
