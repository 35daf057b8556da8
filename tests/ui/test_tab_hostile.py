"""The tab against damaged or unusual state, through its handlers (tab_handlers.Tab): nothing of the user's is lost,
and what it renders from disk is text, never markup."""
import pytest

from dreambooth.config import Concept, Config
from dreambooth.store import DataRoot
from tab_handlers import Tab


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    return Tab(DataRoot(tmp_path_factory.mktemp("tab") / "root").ensure())


def test_saving_keeps_the_concepts_the_tab_does_not_show(tab, tmp_path):
    root = tab.root
    model = root.model("many")
    model.path.mkdir(parents=True, exist_ok=True)
    concepts = tuple(Concept(instance_data_dir=str(tmp_path / f"c{i}"), instance_token=f"tok{i}") for i in range(6))
    Config(concepts=concepts).save(model.config_path)
    tab.show(Config.load(model.config_path))  # what the page holds after selecting the model
    assert "Saved" in tab.save_settings(db_model_select="many")["db_settings_message"]
    assert [c.instance_token for c in Config.load(model.config_path).concepts] == [f"tok{i}" for i in range(6)]
