"""`python -m dreambooth VERB`: the headless face of the product.

Exit 0 on success; bad input prints one line `error: ...` naming the bad value and exits 2.
Heavy imports (torch, diffusers, gradio) happen inside the verbs, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import FAMILIES
from .errors import UserError
from .store import DataRoot, default_root


def _root(args) -> DataRoot:
    return DataRoot(Path(args.root).expanduser() if args.root else default_root())


def cmd_tiny_checkpoint(args) -> int:
    from .checkpoint.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.family, Path(args.out), seed=args.seed, full_text_encoder=args.full_text_encoder)
    print(f"wrote {path}")
    return 0


def cmd_create(args) -> int:
    from .models import create_model

    model = create_model(_root(args), args.name, args.source, family=args.family, overwrite=args.overwrite)
    print(f"created {model.path}")
    return 0


def cmd_export(args) -> int:
    from .models import export_model

    path = export_model(_root(args), args.name, fmt=args.format, half=args.half, ema=args.ema,
                        out=Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .train import train_model

    result = train_model(_root(args), args.name, max_steps=args.max_steps)
    print(result.summary())
    return 0 if result.ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(_root(args) if args.root else None)


def cmd_ui(args) -> int:
    from .ui.app import launch

    launch(_root(args), host=args.host, port=args.port)
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="data root (default: $DREAMBOOTH_ROOT or ./data)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("tiny-checkpoint", help="write a tiny random model in a family's original single-file layout")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="output .safetensors or .ckpt path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-text-encoder", action="store_true", help="keep the real text-encoder widths")
    p.set_defaults(run=cmd_tiny_checkpoint)

    p = verbs.add_parser("create", help="create a DreamBooth model from a checkpoint, diffusers folder or hub id")
    p.add_argument("name")
    p.add_argument("--source", required=True)
    p.add_argument("--family", default="auto", choices=("auto",) + FAMILIES)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_create)

    p = verbs.add_parser("export", help="write the model as one checkpoint file")
    p.add_argument("name")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"))
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.add_argument("--ema", action="store_true", help="export the EMA UNet weights")
    p.add_argument("--out", help="output path (default: <root>/models/Stable-diffusion/NAME_<step>.<format>)")
    p.set_defaults(run=cmd_export)

    p = verbs.add_parser("train", help="train a model from its config (resumes where it stopped)")
    p.add_argument("name")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides the config)")
    p.set_defaults(run=cmd_train)

    p = verbs.add_parser("demo", help="the whole flow on a built-in tiny model, a few minutes on a CPU")
    p.set_defaults(run=cmd_demo)

    p = verbs.add_parser("ui", help="the DreamBooth tab as a standalone app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7861)
    p.set_defaults(run=cmd_ui)

    p = verbs.add_parser("bench", help="time the training step against a diffusers-style reference loop")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_bench)
    return parser


def _split_bench_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """argparse's REMAINDER drops a leading option (`bench --case X`), so bench's own arguments are split off first."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--root" else 1
    if i < len(argv) and argv[i] == "bench":
        return argv[: i + 1], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, bench_args = _split_bench_args(argv)
    args = build_parser().parse_args(argv)
    if args.verb == "bench":
        args.bench_args = bench_args
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
