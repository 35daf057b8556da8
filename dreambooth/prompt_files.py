"""Sample prompt files: a user's text file of prompts, one per line, read with bounds (a setting's rule checks it
before training; the trainer reads it once)."""
from __future__ import annotations

from pathlib import Path

MAX_PROMPT_FILE_BYTES = 64 * 1024
MAX_PROMPT_FILE_PROMPTS = 64
MAX_PROMPT_CHARS = 2000  # as for a prompt typed into the tab (config.MAX_TEXT)


class PromptFileError(ValueError):
    """A sample prompt file that cannot be used; the message says why in the user's words, never quoting the file."""


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a sample prompt file: UTF-8 text, one prompt per line, blank lines and lines starting with #
    skipped. Reads at most MAX_PROMPT_FILE_BYTES + 1 bytes; raises PromptFileError (naming the file, not its content)
    for a missing file, a folder, binary or non-UTF-8 data, a file too large, too many prompts or none at all."""
    path = Path(path).expanduser()
    shown = repr(str(path)) if len(str(path)) <= 200 else repr(str(path)[:197] + "...")
    if path.is_dir():
        raise PromptFileError(f"{shown} is a folder; choose a text file with one prompt per line")
    if not path.exists():
        raise PromptFileError(f"{shown}: no such file")
    if not path.is_file():  # a device or a pipe: reading it could block or never end
        raise PromptFileError(f"{shown} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PromptFileError(f"{shown}: no such file") from None
    except OSError as e:
        raise PromptFileError(f"{shown} cannot be read ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"{shown} is too large (at most {MAX_PROMPT_FILE_BYTES // 1024} KiB of prompts)")
    if b"\x00" in raw:
        raise PromptFileError(f"{shown} is not a text file (it holds binary data)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PromptFileError(f"{shown} is not UTF-8 text; save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = " ".join(line.split())
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{shown}: line {number} is too long ({len(line)} characters; at most "
                                  f"{MAX_PROMPT_CHARS})")
        prompts.append(line)
        if len(prompts) > MAX_PROMPT_FILE_PROMPTS:
            raise PromptFileError(f"{shown} has more than {MAX_PROMPT_FILE_PROMPTS} prompts")
    if not prompts:
        raise PromptFileError(f"{shown} has no prompt (blank lines and lines starting with # are skipped)")
    return prompts


def prompt_file_problem(path: str) -> str | None:
    """Why a sample prompt file cannot be used, or None when it can (config.py's rule for the setting)."""
    try:
        read_prompt_file(path)
    except PromptFileError as e:
        return str(e)
    return None
