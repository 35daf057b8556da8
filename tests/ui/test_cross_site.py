"""Calls from another site's page, and through a name rebound to this machine, change nothing: the tab served inside
the webui stand-in (tests/ui/webui_stub/webui.py: the webui 1.10 start) and standalone, on gradio 3.41 (A1111 1.10),
4.40 (Forge) and the newest; the ways in are the ones a page has: /run/predict without a Content-Type (a no-cors
fetch), the queue (a WebSocket on 3.41, POST /queue/join on 4 and newer), a `request` object forged into the body,
and a DNS-rebound Host. The same calls from the page's own origin, or from no browser at all, still work."""
import json
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import STACKS, _stack_python, free_port, wait_until_serving
from gradio_calls import GradioApp
from webui_helpers import copy_extension

STUB = Path(__file__).with_name("webui_stub")
FOREIGN = {"Origin": "http://evil.example"}
VERSIONS = ["3.41", "4.40", "6"]


def python_for(version: str) -> str:
    return sys.executable if version not in STACKS else _stack_python(version)


class WebuiStandIn:
    """The webui stand-in serving the extension (a copy in `home`/extensions) as a real server process."""

    def __init__(self, python: str, home: Path, args=()):
        self.home, self.port = home, free_port()
        self.log = home / "webui.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUB_WEBUI_DIR": str(home)}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, str(STUB / "webui.py"), "--port", str(self.port), *args],
                                     cwd=home, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_serving(self.proc, self.url + "/config", self.log, "the webui stand-in")

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def webui_home(tmp_path):
    """A webui folder with the extension installed and two DreamBooth models, dog and cat."""
    from dreambooth.config import Config
    from dreambooth.store import DataRoot

    home = tmp_path / "webui"
    copy_extension(home / "extensions" / "dreambooth ext")
    root = DataRoot(home).ensure()
    for name in ("dog", "cat"):
        model = root.model(name)
        model.path.mkdir(parents=True)
        Config().save(model.config_path)
    return home, root


@pytest.fixture
def start_webui():
    servers = []

    def start(python, home, args=()):
        servers.append(WebuiStandIn(python, home, args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def refused_everything(app: GradioApp, root, headers: dict, forged: bool = True) -> list[str]:
    """Delete dog and start a training of dog every way a page can; what came back (nothing may have happened)."""
    from dreambooth import jobs

    delete, _ = app.handler("db_delete")
    train, train_dep = app.handler("db_train")
    train_data = app.inputs(train_dep, db_model_select="dog")
    answers = [app.predict(delete, ["dog", True], headers)[1], app.queue(delete, ["dog", True], headers),
               app.predict(train, train_data, headers)[1], app.queue(train, train_data, headers)]
    if forged:  # a page claiming, inside the body, to be the page itself
        claim = {"headers": {"host": app.address, "origin": app.url}, "client": {"host": "127.0.0.1", "port": 1},
                 "url": app.url + "/", "query_params": {}, "path_params": {}}
        answers.append(app.predict(delete, ["dog", True], headers, forged_request=claim)[1])
    assert root.model("dog").exists(), answers
    assert jobs.last_job(root) is None, answers
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_the_tab_in_the_webui_refuses_other_sites(version, webui_home, start_webui):
    home, root = webui_home
    server = start_webui(python_for(version), home)
    app = GradioApp(server.url)
    assert ".".join(map(str, app.version)).startswith(version)

    answers = refused_everything(app, root, FOREIGN)
    said = [a for a in answers if "refused a request from the page at http://evil.example" in a]
    assert said, answers  # the tab's message says why
    assert all("Deleted" not in a for a in answers)
    rebound = f"evil.example:{server.port}"
    answers = refused_everything(app, root, {"Host": rebound, "Origin": f"http://{rebound}"}, forged=False)
    assert any("not this machine" in a for a in answers), answers

    delete, _ = app.handler("db_delete")
    own = app.queue(delete, ["cat", True], {"Origin": server.url})
    assert "Deleted cat." in own and not root.model("cat").exists(), own
    status, text = app.predict(delete, ["dog", True], {})  # no Origin: not a browser page (a script, --api)
    assert status == 200 and "Deleted dog." in text and not root.model("dog").exists(), text


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_the_standalone_app_refuses_other_sites(version, webui_home, start_app):
    home, root = webui_home
    server = start_app(python=python_for(version), root=home)
    app = GradioApp(server.url)
    refused_everything(app, root, FOREIGN)
    rebound = f"evil.example:{server.port}"
    refused_everything(app, root, {"Host": rebound, "Origin": f"http://{rebound}"}, forged=False)
    for path in ("/", "/config", "/dreambooth/models"):  # nothing is served to a rebound name
        response = app._request("GET", path, None, {"Host": rebound})
        assert response.status == 403 and "not this machine's address" in json.loads(response.read())["detail"]

    delete, _ = app.handler("db_delete")
    assert "Deleted cat." in app.queue(delete, ["cat", True], {"Origin": server.url.rstrip("/")})
    assert not root.model("cat").exists()


ATTACK_PAGE = """<!doctype html><title>cute cats</title><script>
const app = "APP", ws_app = app.replace("http", "ws"), fn = FN;
const body = (name, session) => JSON.stringify({fn_index: fn, data: [name, true], session_hash: session});
fetch(app + "/run/predict", {method: "POST", mode: "no-cors", body: new Blob([body("dog", "x1")])})
  .then(() => { document.title += " fetched"; }, () => { document.title += " fetched"; });
const ws = new WebSocket(ws_app + "/queue/join");
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.msg === "send_hash") ws.send(JSON.stringify({fn_index: fn, session_hash: "x2"}));
  if (m.msg === "send_data") ws.send(body("cat", "x2"));
  if (m.msg === "process_completed") document.title += " queued";
};
ws.onerror = ws.onclose = () => { document.title += " closed"; };
</script>"""


@pytest.mark.slow
def test_a_page_of_another_site_in_chromium(webui_home, start_webui, page, tmp_path):
    """A page from a second origin tries both ways in, in a real browser; the models survive and the tab in its own
    origin still works."""
    home, root = webui_home
    server = start_webui(_stack_python("3.41"), home)
    delete, _ = GradioApp(server.url).handler("db_delete")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(ATTACK_PAGE.replace("APP", server.url).replace("FN", str(delete)))
    other = ThreadingHTTPServer(("127.0.0.1", free_port()), partial(SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/index.html")
        page.wait_for_function("document.title.includes('fetched') && document.title.includes('queued')",
                               timeout=60_000)
    finally:
        other.shutdown()
    assert root.model("dog").exists() and root.model("cat").exists()

    page.goto(server.url)
    page.wait_for_selector("#db_model_select", timeout=120_000)
    page.click("#db_delete_box")
    page.check("#db_delete_confirm input")
    page.click("#db_delete")  # the page selects the first model, cat
    page.wait_for_function("document.querySelector('#db_delete_message')?.innerText.includes('Deleted cat.')",
                           timeout=60_000)
    assert not root.model("cat").exists() and root.model("dog").exists()


def test_every_handler_of_the_tab_goes_through_the_access_check(tmp_path):
    """Wiring a new handler without the check fails here: every function the tab's events run is `checked`."""
    from dreambooth.host import standalone_host
    from dreambooth.store import DataRoot
    from dreambooth.ui.tab import build

    tab = build(standalone_host(DataRoot(tmp_path / "root").ensure()))
    fns = tab.fns.values() if isinstance(tab.fns, dict) else tab.fns
    handlers = [f.fn for f in fns if f.fn is not None]
    assert len(handlers) >= 20
    unchecked = [getattr(fn, "__name__", fn) for fn in handlers if not hasattr(fn, "access_checked")]
    assert unchecked == []


def test_the_check_refuses_in_the_tabs_words(tmp_path):
    """A refused handler changes nothing and puts one line into its message box; an allowed one runs."""
    from types import SimpleNamespace

    from dreambooth.access import Access
    from dreambooth.ui.tab import checked

    calls = []
    outputs = ["model_select", "confirm", "message"]
    handler = checked(Access(), lambda *v: calls.append(v) or ["a", "b", "c"], outputs, "message")
    foreign = SimpleNamespace(headers={"Host": "127.0.0.1:7860", "Origin": "http://evil.example"})
    result = handler(foreign, "dog", True)
    assert calls == [] and result[0] == result[1] and "refused a request from the page at http://evil.example" in result[2]
    assert "<" not in result[2].split(">", 1)[1].rsplit("<", 1)[0]  # one line of text in the message element
    own = SimpleNamespace(headers={"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"})
    assert handler(own, "dog", True) == ["a", "b", "c"] and calls == [("dog", True)]
