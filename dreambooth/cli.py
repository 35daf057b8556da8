"""`python -m dreambooth VERB`: the headless face of the product.

Exit 0 on success; bad input prints one line `error: ...` naming the bad value and exits 2 (the cause, where there
is one, follows with DREAMBOOTH_DEBUG=1). `--report FILE` also writes the outcome as one event (events.Done with what
was printed, or events.Error with the reason): how the UI learns the result of a verb it runs in a child process.
Heavy imports (torch, diffusers, gradio) happen inside the verbs, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from .errors import UserError
from .events import Done, Error, EventLog
from .families import FAMILIES
from .store import DataRoot, default_root

log = logging.getLogger("dreambooth")


def _root(args) -> DataRoot:
    return DataRoot(Path(args.root).expanduser() if args.root else default_root())


def cmd_tiny_checkpoint(args) -> int:
    from .checkpoint.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.family, Path(args.out), seed=args.seed, full_text_encoder=args.full_text_encoder)
    print(f"wrote {path}")
    return 0


def _reclaim(root: DataRoot, name: str | None = None) -> None:
    """Remove what interrupted runs left on this data root (and model) and say how much that was."""
    from .store import reclaim_leftovers

    reclaimed = reclaim_leftovers(root, root.model(name) if name else None)
    if reclaimed:
        print(reclaimed.sentence())


def cmd_create(args) -> int:
    from .models import create_model

    _reclaim(_root(args))
    model = create_model(_root(args), args.name, args.source, family=args.family, overwrite=args.overwrite,
                         allow_pickle=args.allow_pickle_weights)
    print(f"created {model.path}")
    print(f"next: `python -m dreambooth concept add {args.name} --instance-dir PHOTOS --instance-token zwx "
          f"--class-token dog`, then `python -m dreambooth train {args.name}`")
    return 0


def cmd_export(args) -> int:
    from .models import export_model, load_config

    root = _root(args)
    _reclaim(root, args.name)
    params = load_config(root.model(args.name)).parameters if root.model(args.name).exists() else None
    saved = {  # what the model's own settings write (its checkpoint files): the default of each option
        "format": params.checkpoint_format if params else "safetensors",
        "half": params.save_half if params else False,
        "ema": bool(params and params.use_ema and params.save_ema_weights)}
    chosen = {key: saved[key] if getattr(args, key) is None else getattr(args, key) for key in saved}
    path = export_model(root, args.name, fmt=chosen["format"], half=chosen["half"], ema=chosen["ema"],
                        out=Path(args.out) if args.out else None, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_extract_lora(args) -> int:
    from .lora.extract import extract_model_lora

    _reclaim(_root(args), args.name)
    path, extraction = extract_model_lora(_root(args), args.name, args.rank, args.te_rank,
                                          out=Path(args.out) if args.out else None, half=not args.full_precision,
                                          overwrite=args.overwrite)
    print(extraction.report())
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .config import parse_overrides
    from .train import train_model

    root = _root(args)
    model = root.model(args.name)
    overrides = parse_overrides(args.set or [])
    events = EventLog(model.events)
    # One writer per model: a second training, or a create/export/delete of this model, is refused while it runs.
    # Under `accelerate launch` the main process holds it for all.
    if args.start_over:
        from .actions import back_to_source

        if args.from_step is not None:
            raise UserError("--start-over and --from-step: choose one")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the other processes would load the weights meanwhile
            raise UserError("--start-over: run it once in a single process, then launch the training")
        print(back_to_source(root, args.name))
    lock = model.lock("training") if model.exists() and _is_main_process() else contextlib.nullcontext()
    try:
        with lock:
            if args.from_step is not None and model.exists() and _is_main_process():
                from .train.saves import go_back

                print(go_back(model.state, model.saves, args.from_step))
            result = train_model(root, args.name, max_steps=args.max_steps, overrides=overrides)
    except UserError as e:
        if model.exists() and _is_main_process() and not _ended(events):  # refused before the run began
            events.emit(Error(str(e)))
        raise
    print(result.summary())
    return 0 if result.ok else 1


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _ended(events: EventLog) -> bool:
    """True when the log's last event ends a run (the trainer already said how it ended)."""
    past, _ = events.read()
    return bool(past) and past[-1].kind in ("done", "cancelled", "error")


def cmd_concept(args) -> int:
    from . import actions
    from .config import CONCEPT_SETTINGS, parse_overrides

    root = _root(args)
    values = parse_overrides(getattr(args, "set", None) or [], CONCEPT_SETTINGS, "concept")
    if args.action == "add":
        named = {"instance_data_dir": args.instance_dir, "instance_token": args.instance_token,
                 "class_token": args.class_token, "instance_prompt": args.instance_prompt,
                 "class_prompt": args.class_prompt, "sample_prompt": args.sample_prompt}
        number = actions.add_concept(root, args.name, {**{k: v for k, v in named.items() if v is not None}, **values})
        print(f"added concept {number} to {args.name}")
    elif args.action == "set":
        actions.set_concept(root, args.name, args.number, values)
        print(f"changed concept {args.number} of {args.name}: {', '.join(values) or 'nothing'}")
    elif args.action == "remove":
        actions.remove_concept(root, args.name, args.number)
        print(f"removed concept {args.number} of {args.name}")
    listed = actions.concepts(root, args.name)
    if not listed:
        print(f"{args.name} has no concept: add one with `python -m dreambooth concept add {args.name} "
              "--instance-dir PHOTOS --instance-token zwx --class-token dog`")
    for number, c in enumerate(listed, 1):
        print(f"{number}: {c['instance_data_dir'] or '(no instance folder)'} ({c['images']} images) · instance "
              f"prompt {c['instance_prompt']!r} · token {c['instance_token']!r} · class {c['class_token']!r}")
    return 0


def cmd_scores(args) -> int:
    from .actions import fidelity_scores, model_files
    from .outputs import step_of

    root = _root(args)
    if not root.model(args.name).exists():
        raise UserError(f"model {args.name!r}: not found in {root.dreambooth}")
    scores = fidelity_scores(root, args.name)
    best = scores["best_step"]
    if not scores["saves"]:
        print(f"{args.name}: no save was scored yet (train with --set fidelity_scores=true)")
        return 0
    print("  step    DINO  CLIP-I  CLIP-T    copy")
    for save in scores["saves"]:
        values = "".join(f"  {save[k]:6.3f}" for k in ("dino", "clip_i", "clip_t", "copy"))
        if not save["saved"]:
            mark = "  (Sample now, not saved)"
        else:
            mark = "  best" if save["step"] == best else ""
        print(f"{save['step']:>6}{values}{mark}")
    if best is None:
        print("no save qualifies as the best yet (see fidelity_prompt_margin and fidelity_copy_limit)")
        return 0
    files = [str(p) for p in model_files(root, args.name) if step_of(p) == best]
    print(f"best save: step {best}" + (f" ({', '.join(files)})" if files else ""))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(_root(args))


def cmd_ui(args) -> int:
    from .ui.app import launch

    launch(_root(args), host=args.host, port=args.port, auth=args.auth, allow_origins=args.allow_origin)
    return 0


def cmd_plan(args) -> int:
    from .config import Config
    from .train.memory import plan_cli, plan_report

    params = Config.load(Path(args.config)).parameters if args.config else None
    if args.json:
        text, fits = plan_report(_root(args), args.name, args.vram, params)
        print(json.dumps({"text": text, "fits": fits}))
    else:
        print(plan_cli(_root(args), args.name, vram_gb=args.vram, preset_gb=args.preset, params=params))
    return 0


def cmd_preset(args) -> int:
    from .train.memory import apply_preset

    print(apply_preset(_root(args), args.name, args.vram))
    return 0


ROOT_HELP = "data root (default: $DREAMBOOTH_ROOT or ./data); before or after the verb"


def _verb(verbs, name: str, **kwargs) -> argparse.ArgumentParser:
    """A verb that also takes --root after its name (where it is not given, the one before the verb counts)."""
    parser = verbs.add_parser(name, **kwargs)
    parser.add_argument("--root", default=argparse.SUPPRESS, help=ROOT_HELP)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help=ROOT_HELP)
    parser.add_argument("--report", help=argparse.SUPPRESS)  # FILE: the outcome as one event (for the UI)
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_model_verbs(verbs)
    add_training_verbs(verbs)
    return parser


def add_model_verbs(verbs) -> None:
    """Verbs that make, write out or extract from a model."""
    p = _verb(verbs, "tiny-checkpoint", help="write a tiny random model in a family's original single-file layout")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="output .safetensors or .ckpt path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-text-encoder", action="store_true", help="keep the real text-encoder widths")
    p.set_defaults(run=cmd_tiny_checkpoint)

    p = _verb(verbs, "create", help="create a DreamBooth model from a checkpoint, diffusers folder or hub id")
    p.add_argument("name")
    p.add_argument("--source", required=True)
    p.add_argument("--family", default="auto", choices=("auto",) + FAMILIES)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="also load .bin (pickle) weights of a diffusers folder or hub model; pickles can run code: "
                        "only for files you trust")
    p.set_defaults(run=cmd_create)

    add_concept_verbs(verbs)

    p = _verb(verbs, "export", help="write the model as one checkpoint file")
    p.add_argument("name")
    p.add_argument("--format", choices=("safetensors", "ckpt"), help="default: the model's checkpoint format")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 weights (--no-half: fp32); default: as the model's checkpoints are saved")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA UNet weights; default: when the model trains with EMA and saves its weights")
    p.add_argument("--out", help="output path (default: <root>/models/Stable-diffusion/NAME_<step>.<format>, or "
                                 "the next free NAME_<step>-N when that name is taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    p.set_defaults(run=cmd_export)

    p = _verb(verbs, "extract-lora", help="extract a LoRA from a trained model (low-rank SVD of trained - base)")
    p.add_argument("name")
    p.add_argument("--rank", type=int, required=True, help="UNet rank (capped per layer at the layer's width)")
    p.add_argument("--te-rank", type=int, default=None, help="text-encoder rank (default: --rank)")
    p.add_argument("--out", help="output path (default: <root>/models/Lora/NAME_<step>_extract_r<R>.safetensors, or "
                                 "the next free name when that one is taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    p.add_argument("--full-precision", action="store_true", help="write fp32 weights (default fp16)")
    p.set_defaults(run=cmd_extract_lora)


def add_concept_verbs(verbs) -> None:
    """`concept list|add|set|remove`: a model's concepts, as the tab's Concepts panel edits them."""
    from .config import CONCEPT_SETTINGS

    fields = "\n".join(f"  {s.name}: {s.tooltip}" for s in CONCEPT_SETTINGS)
    raw = argparse.RawDescriptionHelpFormatter
    concepts_verb = _verb(verbs, "concept", help="list, add, change or remove a model's concepts (its subjects)")
    actions = concepts_verb.add_subparsers(dest="action", required=True)
    p = _verb(actions, "list", help="the model's concepts")
    p.add_argument("name")
    p = _verb(actions, "add", help="add a concept: a folder of photos of one subject and its tokens",
                           epilog=f"Fields for --set:\n{fields}", formatter_class=raw)
    p.add_argument("name")
    p.add_argument("--instance-dir", required=True, help="the folder of photos of the subject")
    p.add_argument("--instance-token", help="the rare identifier, e.g. zwx")
    p.add_argument("--class-token", help="the class noun, e.g. dog")
    p.add_argument("--instance-prompt", help="default [filewords]: each image's caption (or file name)")
    p.add_argument("--class-prompt", help="default [filewords]")
    p.add_argument("--sample-prompt", help="the prompt of preview images")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any other field of the concept")
    p = _verb(actions, "set", help="change fields of concept N (numbered from 1, as in `concept list`)",
                           epilog=f"Fields:\n{fields}", formatter_class=raw)
    p.add_argument("name")
    p.add_argument("number", type=int)
    p.add_argument("set", nargs="+", metavar="FIELD=VALUE")
    p = _verb(actions, "remove", help="remove concept N")
    p.add_argument("name")
    p.add_argument("number", type=int)
    concepts_verb.set_defaults(run=cmd_concept)


def add_training_verbs(verbs) -> None:
    """Verbs that train, plan a training, or serve the tab."""
    p = _verb(verbs, "train", help="train a model from its config (resumes where it stopped)")
    p.add_argument("name")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides the config)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="change a parameter for this run only (repeatable), e.g. --set learning_rate=1e-6")
    p.add_argument("--from-step", type=int, default=None, metavar="S",
                   help="go back to the kept save of step S and go on from there (see keep_saves)")
    p.add_argument("--start-over", action="store_true",
                   help="start at step 0 from the source checkpoint's weights (settings and class images stay)")
    p.set_defaults(run=cmd_train)

    p = _verb(verbs, "scores", help="the fidelity scores of a model's saves and the best one")
    p.add_argument("name")
    p.set_defaults(run=cmd_scores)

    p = _verb(verbs, "demo", help="the whole flow on a built-in tiny model (about a minute on a CPU), in the data root")
    p.set_defaults(run=cmd_demo)

    p = _verb(verbs, "ui", help="the DreamBooth tab as a standalone app")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--auth", metavar="USER:PASS", help="login for the page and HTTP Basic auth for the REST routes "
                                                       "(several: u1:p1,u2:p2)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web address whose pages may use the app besides its own, e.g. https://sd.example.org "
                        "behind a proxy (repeatable); its host name is accepted too")
    p.set_defaults(run=cmd_ui)

    p = _verb(verbs, "plan", help="predict the peak GPU memory of a model's training settings (no GPU needed)")
    p.add_argument("name")
    p.add_argument("--vram", type=float, help="GPU memory in GiB: say whether the run fits and what to change if not")
    p.add_argument("--preset", type=float, help="plan with the VRAM preset for this many GiB instead of the settings")
    p.add_argument("--config", metavar="FILE", help="plan the parameters of this config file instead of the model's")
    p.add_argument("--json", action="store_true", help='print {"text": the plan, "fits": true/false/null} as JSON')
    p.set_defaults(run=cmd_plan)

    p = _verb(verbs, "preset", help="set a model's memory settings to the fastest ones that fit a GPU's memory")
    p.add_argument("name")
    p.add_argument("vram", type=float, help="GPU memory in GiB (6, 8, 12, 16, 24, 48, ...)")
    p.set_defaults(run=cmd_preset)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = EventLog(Path(args.report)) if args.report else None
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, printed)) if report else contextlib.nullcontext():
            code = args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.__cause__ is not None:  # kept for whoever debugs it; the user sees the one line above
            log.debug("cause of: %s", e, exc_info=e.__cause__)
            if os.environ.get("DREAMBOOTH_DEBUG"):
                traceback.print_exception(type(e.__cause__), e.__cause__, e.__cause__.__traceback__)
        if report:
            report.emit(Error(str(e)))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if report:
            report.emit(Error("interrupted"))
        return 130
    if report:
        report.emit(Done(0, printed.getvalue().strip()) if code == 0 else Error(f"exit code {code}"))
    return code


class _Tee(io.TextIOBase):
    """Writes to two streams: the console and the text a --report carries."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()
