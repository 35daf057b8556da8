"""The extension as the webui finds it: a copy of its files in a webui's extensions folder."""
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_extension(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target.mkdir(parents=True)
    for item in ("scripts", "dreambooth", "javascript"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, target / item, ignore=ignore)
    for item in ("install.py", "preload.py", "style.css", "pyproject.toml"):
        shutil.copy2(REPO / item, target / item)
    return target
