"""What a process of the product prints: its own lines, not its libraries' chatter.

`python -m dreambooth` and the `dreambooth` command (the trainer in the tab's log, the CLI in a terminal) run `main`,
which calls `quiet_libraries()` before any library is imported. Left out: the warnings and loading bars of
diffusers, transformers, huggingface_hub, accelerate, peft, bitsandbytes and torch (diffusers' "should be kept in
float32: []" on every load, transformers' notices about torchvision, bitsandbytes' missing optional kernels); their
errors still show. The product's own warnings print as one line, `warning: ...`, without the source line Python adds.
"""
from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "bitsandbytes", "torch",
             "torchvision", "safetensors", "timm")


def quiet_libraries() -> None:
    for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(variable, value)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    warnings.formatwarning = one_line


def one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> int:
    """`python -m dreambooth` and the `dreambooth` command: quiet libraries first, then the CLI."""
    quiet_libraries()
    from .cli import main as cli

    return cli()
