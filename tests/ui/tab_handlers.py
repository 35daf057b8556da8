"""The tab's handlers called as a page would call them, without gradio: a form holds what the page shows (every
setting widget at its value for a config), and each call gives the handler the values its event sends."""
from dreambooth.config import Config
from dreambooth.host import standalone_host
from dreambooth.ui import handlers
from dreambooth.ui.fields import setting_values
from dreambooth.ui.handlers import START_FROM, Page

PAGE_DEFAULTS = {"db_model_select": None, "db_start_from": START_FROM[0], "db_resume_from": None, "last_plan": None,
                 "shown": None, "db_vram": "", "db_preset": None, "db_export_name": "", "db_export_overwrite": False,
                 "db_extract_rank": 32, "db_extract_te_rank": "", "db_delete_confirm": False, "db_new_name": "",
                 "db_checkpoint": None, "db_source": "", "db_family": "auto", "db_overwrite": False,
                 "db_concepts_path": ""}


class Tab:
    """One page of the tab on a data root: `form` is what it shows; `tab.train(db_model_select="dog")` calls the
    handler with the form changed so, and returns its updates keyed by elem_id."""

    def __init__(self, root):
        self.root = root
        self.page = Page(standalone_host(root))
        self.form = {**PAGE_DEFAULTS, **setting_values(Config())}

    def show(self, config: Config) -> None:
        """The page after it loaded `config` into its widgets."""
        self.form.update(setting_values(config))

    def __getattr__(self, name):
        fn = getattr(handlers, name)

        def call(**changes):
            self.form.update(changes)
            return fn(self.page, dict(self.form))

        return call
