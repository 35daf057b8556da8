"""A faithful stand-in for the webui's modules/safe.py (1.10): the zip-name allowlist and a restricted unpickler
that only rebuilds plain tensors and OrderedDicts. Written from its documented behaviour."""
from __future__ import annotations

import collections
import pickle
import re
import zipfile

import torch

ALLOWED_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
STORAGE_TYPES = {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                 "BFloat16Storage", "BoolStorage"}


class RestrictedUnpickler(pickle.Unpickler):
    extra_handler = None

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        try:
            return torch.storage.TypedStorage(_internal=True)
        except TypeError:
            return torch.storage.TypedStorage()

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return getattr(collections, name)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"):
            return getattr(torch._utils, name)
        if module == "torch" and name in STORAGE_TYPES:
            return getattr(torch, name)
        if module == "torch.nn.modules.container" and name == "ParameterDict":
            return torch.nn.modules.container.ParameterDict
        if module == "numpy.core.multiarray" and name in ("scalar", "_reconstruct"):
            import numpy.core.multiarray
            return getattr(numpy.core.multiarray, name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            import numpy
            return getattr(numpy, name)
        if module == "_codecs" and name == "encode":
            import _codecs
            return _codecs.encode
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_zip_filenames(filename, names):
    for name in names:
        if not ALLOWED_ZIP_NAMES.match(name):
            raise Exception(f"bad file inside {filename}: {name}")


def restricted_load(path):
    """Check the archive the way the webui does, unpickle data.pkl with the restricted unpickler (which must not
    refuse anything), then load the tensors."""
    with zipfile.ZipFile(path) as z:
        check_zip_filenames(path, z.namelist())
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkl) == 1
        with z.open(pkl[0]) as f:
            RestrictedUnpickler(f).load()
    return torch.load(str(path), map_location="cpu", weights_only=True)
