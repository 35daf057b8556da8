"""Run by the webui (with its own python and `launch` importable) when the extension loads.

Installs only what is missing or older than the extension needs, from pyproject.toml's dependencies (plus
bitsandbytes, which the default 8-bit AdamW optimizer uses). A package with a preferred version (PREFERRED) is asked
for at that version first; when the webui's packages do not allow it, at any version, and install.py says which
version it settled for and what that means. Every package already installed is pinned at its
installed version for every pip call, so pip only adds packages: it picks versions of the new ones that fit what the
webui has (or fails with a message) and never upgrades or downgrades the webui's own — torch, torchvision and xformers
are never touched at all. A package the webui pins is only upgraded where its version is below our minimum (none is,
with A1111 1.10). A second start finds everything installed and runs no pip at all.
"""
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEVER_TOUCH = ("torch", "torchvision", "xformers")
EXTRAS = ("bitsandbytes", "optimizers")  # optional-dependency groups the webui install gets too
PROVIDED_BY_THE_WEBUI = ("gradio",)  # the webui brings its own; we never replace it
# Versions worth asking for first, and what an older one means. bitsandbytes runs its 8-bit AdamW on a CPU only from
# 0.50 on (which needs torch 2.4): with an older torch pip settles for an older bitsandbytes, which is fine on a GPU.
PREFERRED = {
    "bitsandbytes": ("0.50", "its 8-bit AdamW runs on CUDA GPUs only; on a CPU choose the adamw optimizer"),
}


def _strings(block: str) -> list:
    return re.findall(r'"([^"]+)"', block)


def requirements(pyproject: Path = HERE / "pyproject.toml") -> list:
    """The dependency strings of pyproject.toml (read with a regex: tomllib is Python 3.11+)."""
    text = pyproject.read_text(encoding="utf-8")
    found = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    reqs = _strings(found.group(1)) if found else []
    for extra in EXTRAS:
        group = re.search(rf"^{extra}\s*=\s*\[(.*?)\]", text, re.M)
        reqs += _strings(group.group(1)) if group else []
    return reqs


def _split(req: str):
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    minimum = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", req)
    return name, (minimum.group(1) if minimum else None)


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group(0)))
    return tuple(parts)


def installed_version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# diffusers does not declare which transformers it needs, so pip cannot choose for us: diffusers 0.31 and newer import
# classes that transformers only has from 4.48 on. Measured: diffusers 0.30.3 trains and exports with webui 1.10's
# transformers 4.30.2 (CI runs the trainer's tests on that stack); 0.31 - 0.37 fail to import there.
# peft 0.14 and newer need transformers 4.36 (and a newer accelerate); 0.13.2 runs LoRA training on the webui 1.10
# stack (transformers 4.30.2, accelerate 0.21), measured the same way.
OLD_TRANSFORMERS = (4, 48)
FOR_OLD_TRANSFORMERS = {"diffusers": "<0.31", "peft": "<0.14"}


def plan(reqs=None) -> list:
    """The requirement strings pip must install: missing ones, and ones older than our minimum."""
    todo = []
    transformers = installed_version("transformers")
    for req in requirements() if reqs is None else reqs:
        name, minimum = _split(req)
        if name.lower() in NEVER_TOUCH or name.lower() in PROVIDED_BY_THE_WEBUI:
            continue
        have = installed_version(name)
        if have is None or (minimum and _version_tuple(have) < _version_tuple(minimum)):
            ceiling = FOR_OLD_TRANSFORMERS.get(name.lower())
            if ceiling and transformers and _version_tuple(transformers) < OLD_TRANSFORMERS:
                req += ("," if minimum else "") + ceiling
            todo.append(req)
    return todo


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_constraints(upgrading=()) -> str:
    """pip constraints that keep every installed package exactly as it is, except those we must upgrade."""
    skip = {_canonical(_split(req)[0]) for req in upgrading} - {_canonical(n) for n in NEVER_TOUCH}
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in skip:
            pins[_canonical(name)] = f"{name}=={dist.version}"
    return "\n".join(sorted(pins.values())) + "\n"


def _install(launch, req: str, constraints: str) -> None:
    """pip install `req`; a preferred version first, else any version, saying what it settled for."""
    name, minimum = _split(req)
    preferred, meaning = PREFERRED.get(name.lower(), (None, ""))
    if preferred and not minimum:
        wanted = f"{name}>={preferred}{req[len(name):]}"
        try:
            launch.run_pip(f'install "{wanted}" -c "{constraints}"', f"DreamBooth requirement: {wanted}")
            return
        except RuntimeError:  # the webui's run_pip raises when pip fails (here: no such version fits its packages)
            print(f"DreamBooth: {wanted} does not fit the webui's packages; installing another {name}")
    launch.run_pip(f'install "{req}" -c "{constraints}"', f"DreamBooth requirement: {req}")
    settled = installed_version(name)
    if preferred and settled and _version_tuple(settled) < _version_tuple(preferred):
        print(f"DreamBooth: settled for {name} {settled}, older than the {preferred} it asked for: {meaning}")


def main() -> None:
    import launch  # the webui's; only importable when the webui runs this file

    todo = plan()
    if not todo:
        return
    fd, constraints = tempfile.mkstemp(prefix="dreambooth-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(pinned_constraints(todo))
    try:
        for req in todo:
            _install(launch, req, constraints)
    finally:
        os.unlink(constraints)


if __name__ == "__main__":
    main()
