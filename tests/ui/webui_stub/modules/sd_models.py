"""modules/sd_models.py: the checkpoint list (models/Stable-diffusion) and loading/unloading the model's weights.

Loading weights is recorded in `calls` instead of done; everything else behaves like the webui's.
"""
import os

from modules import paths

checkpoints_list = {}
checkpoint_aliases = {}
calls = []  # what the extension asked for, in order: "unload", "reload", "list_models"


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        model_path = os.path.join(paths.models_path, "Stable-diffusion")
        name = os.path.relpath(abspath, model_path) if abspath.startswith(os.path.abspath(model_path)) else os.path.basename(filename)
        self.name = name.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra

    def register(self):
        checkpoints_list[self.title] = self
        for alias in (self.title, self.model_name, self.name, self.name_for_extra):
            checkpoint_aliases[alias] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    calls.append("list_models")
    model_path = os.path.join(paths.models_path, "Stable-diffusion")
    found = []
    for dirpath, _, files in os.walk(model_path):
        found += [os.path.join(dirpath, f) for f in files if f.endswith((".ckpt", ".safetensors"))]
    for filename in sorted(found, key=str.lower):
        CheckpointInfo(filename).register()


class ModelData:
    def __init__(self):
        self.sd_model = "loaded"


model_data = ModelData()


def unload_model_weights(sd_model=None, info=None):
    calls.append("unload")
    model_data.sd_model = None
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    calls.append("reload")
    model_data.sd_model = "loaded"
    return model_data.sd_model
