"""launch.py (launch_utils): is_installed and run_pip, as install.py sees them.

run_pip does not reach a registry: it records the command in $STUB_PIP_LOG (one line each) and "installs" the
requirement by writing its dist-info into $STUB_SITE, so importlib.metadata finds it on the next start. Like the
webui's, a failing pip raises RuntimeError: $STUB_PIP_REFUSE names requirements (comma-separated, exactly as asked)
that pip cannot install beside the webui's packages. The version installed is the requirement's minimum, else the one
$STUB_PIP_VERSIONS gives (name=version, comma-separated), else 99.0.
"""
import importlib.metadata
import importlib.util
import os
import re


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def _listed(variable):
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def run_pip(command, desc=None, live=False):
    with open(os.environ["STUB_PIP_LOG"], "a", encoding="utf-8") as log:
        log.write(command + "\n")
    req = re.match(r'install "([^"]+)"', command).group(1)
    if req in _listed("STUB_PIP_REFUSE"):
        raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}\nError code: 1")
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    versions = dict(item.split("=", 1) for item in _listed("STUB_PIP_VERSIONS"))
    minimum = re.search(r">=\s*([0-9][0-9.]*)", req)
    version = minimum.group(1) if minimum else versions.get(name, "99.0")
    info = os.path.join(os.environ["STUB_SITE"], f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return ""
