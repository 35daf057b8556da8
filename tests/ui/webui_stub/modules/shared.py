"""modules/shared.py: command-line options, settings (opts) and refresh_checkpoints."""
import argparse

from modules import sd_models

parser = argparse.ArgumentParser()
# the access flags of modules/cmd_args.py
parser.add_argument("--api", action="store_true", help="use api=True to launch the API together with the webui")
parser.add_argument("--api-auth", type=str, default=None, help='Set authentication for API like "username:password"')
parser.add_argument("--nowebui", action="store_true", help="use api=True to launch the API instead of the webui")
parser.add_argument("--gradio-auth", type=str, default=None, help='set gradio authentication like "username:password"')
parser.add_argument("--gradio-auth-path", type=str, default=None, help="set gradio authentication file path")
# the network flags of modules/cmd_args.py
parser.add_argument("--listen", action="store_true", help="launch gradio with 0.0.0.0 as server name, allowing to respond to network requests")
parser.add_argument("--share", action="store_true", help="use share=True for gradio and make the UI accessible through their site")
parser.add_argument("--ngrok", type=str, help="ngrok authtoken, alternative to gradio --share", default=None)
parser.add_argument("--cors-allow-origins", type=str, help="Allowed CORS origin(s) in the form of a comma-separated list (no spaces)", default=None)
parser.add_argument("--cors-allow-origins-regex", type=str, help="Allowed CORS origin(s) in the form of a single regular expression", default=None)
parser.add_argument("--server-name", type=str, help="Sets hostname of server", default=None)
cmd_opts = parser.parse_args([])  # the test re-parses after preload() added the extension's flags


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        v.section = section_identifier
    return options_dict


options_templates = {}


class Options:
    def __init__(self, data_labels):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in data_labels.items()}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not getattr(info, "do_not_save", False):
            self.data[key] = info.default

    def __getattr__(self, item):
        if item in ("data", "data_labels"):
            raise AttributeError(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


opts = Options(options_templates)


def refresh_checkpoints():
    sd_models.list_models()
