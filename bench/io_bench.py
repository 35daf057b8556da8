"""Checkpoint I/O benchmark: import and export full-size random-weight SD1.5 and SDXL, seconds and peak RSS per step.

    .venv/bin/python bench/io_bench.py [--models sd15,sdxl] [--dir /tmp/dreambooth-io-bench] [--ckpt] [--keep]

Each step runs in its own process so its peak RSS (ru_maxrss from wait4) is its own. The random checkpoint is
fp16 in the original single-file layout (2.1 GB for SD1.5, 6.9 GB for SDXL) and is written to --dir, never to the
repository. Target: each import / export step peaks at no more than 1.5x the checkpoint file's size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from architectures import ARCHITECTURES, components  # noqa: E402
from dreambooth.checkpoint.convert import canonical_key, meta_model, plan_export  # noqa: E402
from dreambooth.checkpoint.export import modelspec, write_entries  # noqa: E402
from dreambooth.checkpoint.layout import render_yaml  # noqa: E402
from dreambooth.checkpoint.tensorio import TensorSource  # noqa: E402

MODELS = {name: (arch["family"], components(name)) for name, arch in ARCHITECTURES.items()}


class RandomSource(TensorSource):
    """Random fp16 tensors of a diffusers component, made one at a time on request."""

    def __init__(self, shapes: dict):
        self.shapes = shapes

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def dtype(self, key):
        return torch.float16

    def get(self, key):
        return (torch.randn(self.shapes[key]) * 0.02).half()


def step_write(model: str, folder: Path) -> None:
    family_name, configs = MODELS[model]
    configs = {c: dict(meta_model(c, cfg, family_name).config) if c in ("unet", "vae") else cfg
               for c, cfg in configs.items()}
    sources = {c: RandomSource({canonical_key(c, k): tuple(v.shape)
                                for k, v in meta_model(c, cfg, family_name).state_dict().items()})
               for c, cfg in configs.items()}
    entries = plan_export(family_name, configs, sources, extras=None, include_ema=False, half=True)
    yaml_text, needed = render_yaml(family_name, configs["unet"], configs["vae"])
    write_entries(folder / f"{model}.safetensors", entries, "safetensors", modelspec(family_name, model),
                  yaml_text if needed else None)


def step_create(model: str, folder: Path) -> None:
    from dreambooth.models import create_model
    from dreambooth.store import DataRoot

    create_model(DataRoot(folder / "root"), model, str(folder / f"{model}.safetensors"), overwrite=True)


def step_export(model: str, folder: Path, fmt: str = "safetensors") -> None:
    from dreambooth.models import export_model
    from dreambooth.store import DataRoot

    export_model(DataRoot(folder / "root"), model, fmt=fmt, half=fmt == "ckpt", out=folder / f"{model}_out.{fmt}")


STEPS = {"write": step_write, "create": step_create, "export": step_export,
         "export-ckpt": lambda m, f: step_export(m, f, "ckpt")}


def measure(step: str, model: str, folder: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one step run in a child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--run-step", step, "--models", model, "--dir", str(folder)])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} of {model} failed")
    return seconds, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--dir", default="/tmp/dreambooth-io-bench")
    parser.add_argument("--ckpt", action="store_true", help="also time a --half .ckpt export")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.run_step:
        STEPS[args.run_step](args.models, folder)
        return 0
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; files in {folder}")
    print(f"{'model':6} {'step':12} {'seconds':>8} {'peak RSS GiB':>13} {'file GiB':>9} {'RSS/file':>9}")
    for model in args.models.split(","):
        steps = ["write", "create", "export"] + (["export-ckpt"] if args.ckpt else [])
        for step in steps:
            seconds, rss = measure(step, model, folder)
            size = (folder / f"{model}.safetensors").stat().st_size / 2**30
            print(f"{model:6} {step:12} {seconds:8.1f} {rss:13.2f} {size:9.2f} {rss / size:9.2f}", flush=True)
        if not args.keep:
            for path in folder.glob(f"{model}*"):
                path.unlink()
            shutil.rmtree(folder / "root" / "models" / "dreambooth" / model, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
