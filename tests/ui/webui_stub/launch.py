"""launch.py (launch_utils): is_installed and run_pip, as install.py sees them.

run_pip does not reach a registry: it records the command in $STUB_PIP_LOG (one line each) and "installs" the
requirement by writing its dist-info into $STUB_SITE, so importlib.metadata finds it on the next start.
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


def run_pip(command, desc=None, live=False):
    with open(os.environ["STUB_PIP_LOG"], "a", encoding="utf-8") as log:
        log.write(command + "\n")
    req = re.match(r'install "([^"]+)"', command).group(1)
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    version = (re.search(r">=\s*([0-9][0-9.]*)", req) or re.search("()", "")).group(1) or "99.0"
    info = os.path.join(os.environ["STUB_SITE"], f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return ""
