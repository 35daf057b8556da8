"""The tab's handlers called as gradio calls them, without a browser: build the Blocks, find a handler by its name
and call the function behind the access check with the values a page would send."""
from dreambooth.host import standalone_host
from dreambooth.ui.tab import build


class Tab:
    def __init__(self, root):
        self.root = root
        self.blocks = build(standalone_host(root))
        fns = self.blocks.fns.values() if isinstance(self.blocks.fns, dict) else self.blocks.fns
        self.handlers = {f.fn.access_checked.__name__: f.fn.access_checked for f in fns if f.fn is not None}

    def __getattr__(self, name):
        return self.handlers[name]
