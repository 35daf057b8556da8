"""modules/initialize_util.py: the credentials of --gradio-auth and --gradio-auth-path as (user, password) tuples.

Each comma-separated item of the flag, and of every line of the file, is split at its first ':'; empty items are
skipped."""


def _items(text):
    for item in text.split(","):
        item = item.strip()
        if item:
            yield tuple(item.split(":", 1))


def get_gradio_auth_creds():
    from modules import shared

    opts = shared.cmd_opts
    if opts.gradio_auth:
        yield from _items(opts.gradio_auth)
    if opts.gradio_auth_path:
        with open(opts.gradio_auth_path, "r", encoding="utf8") as file:
            for line in file.readlines():
                yield from _items(line.strip())
