"""modules/paths.py: where the webui lives. The test points models_path at its temporary webui folder."""
import os

script_path = os.environ.get("STUB_WEBUI_DIR", os.getcwd())
data_path = script_path
models_path = os.path.join(data_path, "models")
