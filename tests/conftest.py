"""Suite-wide: no test may reach a model hub, and every test gets its own data root."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    from dreambooth.store import ROOT_ENV, DataRoot

    root = tmp_path / "root"
    monkeypatch.setenv(ROOT_ENV, str(root))
    return DataRoot(root).ensure()


@pytest.fixture
def settings_only_model(data_root):
    """(data root, model "dog") holding only a default config.json: enough for what reads or edits settings."""
    from dreambooth.config import Config

    model = data_root.model("dog")
    model.path.mkdir(parents=True)
    Config().save(model.config_path)
    return data_root, model
