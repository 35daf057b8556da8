"""The extension inside the webui: scripts/, preload.py and install.py against a faithful stand-in of the webui's
`modules` and `launch` (tests/ui/webui_stub), from a copy of the extension in a folder with an unusual name."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from webui_helpers import copy_extension

LOCAL = "http://127.0.0.1:7860"  # the address a browser on this machine uses (the test client's default name is refused)

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).with_name("webui_stub")
FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
OWNED_MODULES = ("modules", "dreambooth", "launch")


def load_file(path: Path, name: str):
    """How the webui loads an extension's script (modules/script_loading.load_module)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A webui folder with one checkpoint and the extension installed as 'extensions/my db ext (2)'."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in OWNED_MODULES}
    for k in saved:
        del sys.modules[k]
    saved_path = list(sys.path)
    home = tmp_path / "webui home"
    (home / "models" / "Stable-diffusion").mkdir(parents=True)
    (home / "models" / "Stable-diffusion" / "base.safetensors").write_bytes(b"stand-in for a checkpoint file")
    ext = copy_extension(home / "extensions" / "my db ext (2)")
    monkeypatch.setenv("STUB_WEBUI_DIR", str(home))
    sys.path.insert(0, str(STUB))
    from modules import paths, sd_models, shared

    paths.models_path = str(home / "models")
    sd_models.list_models()
    yield {"home": home, "ext": ext, "paths": paths, "shared": shared, "sd_models": sd_models}
    sys.path[:] = saved_path
    for k in [k for k in sys.modules if k.split(".")[0] in OWNED_MODULES]:
        del sys.modules[k]
    sys.modules.update(saved)


def start_webui(webui, argv, build_ui=True):
    """What webui.py does at start: preload flags, parse, load scripts, settings; then either the UI with its app
    (plus the REST API with --api) or, with --nowebui, only the API's app (no tabs, demo None). build_ui=False
    leaves the settings page and the tab (and with them the slow gradio import) out where a test is about the app."""
    shared = webui["shared"]
    preload = load_file(webui["ext"] / "preload.py", "preload")
    parser = shared.parser
    preload.preload(parser)
    shared.cmd_opts = parser.parse_args(argv)
    script = load_file(webui["ext"] / "scripts" / "dreambooth_tab.py", "dreambooth_tab.py")
    from fastapi import FastAPI
    from modules import script_callbacks
    from modules.api.api import Api

    if build_ui:
        script_callbacks.ui_settings_callback()
    app = FastAPI()
    if shared.cmd_opts.nowebui:
        Api(app)
        script_callbacks.app_started_callback(None, app)
        return script, [], app
    tabs = script_callbacks.ui_tabs_callback() if build_ui else []
    if shared.cmd_opts.api:
        Api(app)
    script_callbacks.app_started_callback(tabs[0][0] if tabs else None, app)
    return script, tabs, app


@pytest.mark.slow
def test_tab_settings_routes_and_host_hooks(webui, monkeypatch, wait_for):
    import gradio as gr
    from fastapi.testclient import TestClient

    home, sd_models, shared = webui["home"], webui["sd_models"], webui["shared"]
    script, tabs, app = start_webui(webui, ["--api", "--api-auth", "alice:secret"])

    # the package came from the extension's own (oddly named) folder
    import dreambooth
    assert Path(dreambooth.__file__).resolve().is_relative_to(webui["ext"].resolve())
    assert script.data_root().root == home  # so <root>/models/Stable-diffusion is the webui's folder

    # the tab
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("DreamBooth", "dreambooth")
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert {"From a checkpoint", "UNet learning rate", "Instance images folder", "Previews"} <= labels
    checkpoint = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "db_checkpoint")
    assert [c[0] if isinstance(c, (tuple, list)) else c for c in checkpoint.choices] == ["base.safetensors"]

    # the settings section: generated from the host settings' declarations, nothing else
    from dreambooth.config import HOST_SETTINGS

    ours = {key for key, info in shared.opts.data_labels.items() if info.section == ("dreambooth", "DreamBooth")}
    assert ours == {f"dreambooth_{s.name}" for s in HOST_SETTINGS} == {
        "dreambooth_data_dir", "dreambooth_fidelity_clip_model", "dreambooth_fidelity_dino_model"}
    assert shared.opts.dreambooth_data_dir == "" and shared.opts.dreambooth_fidelity_clip_model == ""

    # the routes, behind the webui's API auth
    client = TestClient(app, base_url=LOCAL)
    assert client.get("/dreambooth/models").status_code == 401
    assert client.get("/dreambooth/models", auth=("alice", "wrong")).status_code == 401
    auth = ("alice", "secret")
    assert client.get("/dreambooth/models", auth=auth).json() == {"models": [], "running": None}

    # a model (made by hand: creating one is the CLI's job, tested with the real checkpoint code elsewhere)
    from dreambooth import jobs
    from dreambooth.config import Concept, Config
    from dreambooth.store import DataRoot

    assert Path(jobs.__file__).resolve().is_relative_to(webui["ext"].resolve())
    root = DataRoot(home)
    model = root.model("dog")
    model.path.mkdir(parents=True)
    Config().save(model.config_path)
    assert client.get("/dreambooth/models", auth=auth).json()["models"] == ["dog"]
    assert client.get("/dreambooth/config/nope", auth=auth).status_code == 404

    # bad config: 400 naming the field, nothing written
    bad = client.post("/dreambooth/config/dog", auth=auth, json={"parameters": {"learning_rate": "fast"}})
    assert bad.status_code == 400 and "learning_rate" in bad.json()["detail"]
    assert client.get("/dreambooth/config/dog", auth=auth).json() == Config().to_dict()
    # folders are chosen in the tab or the CLI: a route cannot point the trainer at other files
    moved = client.post("/dreambooth/config/dog", auth=auth,
                        json={"concepts": [{"instance_data_dir": str(home / "no such folder")}]})
    assert moved.status_code == 400 and "REST routes keep them" in moved.json()["detail"]
    Config(concepts=(Concept(instance_data_dir=str(home / "no such folder")),)).save(model.config_path)  # the tab
    refused = client.post("/dreambooth/start/dog", auth=auth, json={})
    assert refused.status_code == 400 and "no such folder" in refused.json()["detail"]
    assert "unload" not in sd_models.calls

    images = home / "images"
    images.mkdir()
    Config(concepts=(Concept(instance_data_dir=str(images)),)).save(model.config_path)
    config = Config(concepts=(Concept(instance_data_dir=str(images), instance_token="zwx"),)).to_dict()
    assert client.post("/dreambooth/config/dog", auth=auth, json=config).json() == config

    # start over HTTP; the trainer is a stand-in here (the browser test runs the real one)
    run_settings = []
    monkeypatch.setattr(jobs, "trainer_command", lambda r, name, settings: run_settings.append(settings) or [
        sys.executable, str(FAKE_TRAINER), str(r.model(name).path), "wait"])
    # the Settings page's scoring model fills the model's empty parameter for the run, read at the start
    shared.opts.data["dreambooth_fidelity_clip_model"] = str(home / "clip")
    sd_models.calls.clear()
    try:
        job = client.post("/dreambooth/start/dog", auth=auth, json={}).json()
        assert job["name"] == "dog" and run_settings == [{"fidelity_clip_model": str(home / "clip")}]
        assert sd_models.calls[:1] == ["unload"] and sd_models.model_data.sd_model is None
        again = client.post("/dreambooth/start/dog", auth=auth, json={})
        assert again.status_code == 409 and "'dog'" in again.json()["detail"]
        wait_for(lambda: client.get("/dreambooth/status", auth=auth).json().get("step", 0) >= 2)
        jobs.request(root, "dog", "save")  # the trainer writes a checkpoint: the webui's list is refreshed
        wait_for(lambda: client.get("/dreambooth/status/dog", auth=auth).json()["checkpoints"])
        wait_for(lambda: "list_models" in sd_models.calls)
        assert client.post("/dreambooth/cancel", auth=auth, json={}).json()["name"] == "dog"
        wait_for(lambda: client.get("/dreambooth/status/dog", auth=auth).json()["state"] == "cancelled")
        wait_for(lambda: "reload" in sd_models.calls)
        assert sd_models.model_data.sd_model == "loaded"
        assert client.post("/dreambooth/cancel", auth=auth, json={}).status_code == 409
    finally:
        job = jobs.running_job(root)
        if job:
            os.kill(job["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_data_dir_flag_and_setting(webui, tmp_path):
    other = tmp_path / "elsewhere"
    script, _, app = start_webui(webui, ["--api", "--dreambooth-dir", str(other)])
    assert script.data_root().root == other
    assert (other / "models" / "dreambooth").is_dir()
    webui["shared"].opts.data["dreambooth_data_dir"] = str(tmp_path / "from-settings")
    assert script.data_root().root == other  # the flag wins over the setting
    from fastapi.testclient import TestClient

    assert TestClient(app, base_url=LOCAL).get("/dreambooth/models").status_code == 200  # no --api-auth: open like the webui's API


ALICE, GRETA = ("alice", "secret"), ("greta", "pw:with:colons")
ACCESS = {  # flags -> (status of the routes for: no credentials, alice's, greta's), and of the webui's own /sdapi
    "no flags": ([], (404, 404, 404), 404),
    "--gradio-auth only": (["--gradio-auth", "greta:pw:with:colons"], (404, 404, 404), 404),
    "--api": (["--api"], (200, 200, 200), 200),
    "--nowebui": (["--nowebui"], (200, 200, 200), 200),
    "--api --api-auth": (["--api", "--api-auth", "alice:secret"], (401, 200, 401), 401),
    "--nowebui --api-auth": (["--nowebui", "--api-auth", "alice:secret"], (401, 200, 401), 401),
    "--api --gradio-auth": (["--api", "--gradio-auth", "greta:pw:with:colons"], (401, 401, 200), 200),
    "--api --gradio-auth-path": (["--api", "--gradio-auth-path", "{auth_file}"], (401, 401, 200), 200),
    "--api --api-auth --gradio-auth": (["--api", "--api-auth", "alice:secret", "--gradio-auth", "greta:pw:with:colons"],
                                       (401, 200, 401), 401),
}


@pytest.mark.parametrize("case", list(ACCESS))
def test_routes_follow_the_webuis_access_flags(webui, tmp_path, case):
    """The routes exist where the webui's own API does (--api, --nowebui) and use --api-auth, else --gradio-auth."""
    from fastapi.testclient import TestClient

    flags, expected, sdapi = ACCESS[case]
    auth_file = tmp_path / "auth.txt"
    auth_file.write_text("\n greta:pw:with:colons,\n", encoding="utf-8")
    argv = [a.replace("{auth_file}", str(auth_file)) for a in flags]
    script, tabs, app = start_webui(webui, argv, build_ui=False)
    client = TestClient(app, base_url=LOCAL)
    got = tuple(client.get("/dreambooth/models", auth=who).status_code for who in (None, ALICE, GRETA))
    assert got == expected
    assert client.get("/sdapi/v1/sd-models").status_code == sdapi  # the webui's own API, for comparison
    if expected[0] != 404:  # a state-changing route needs the same credentials
        assert client.post("/dreambooth/cancel", json={}).status_code == (401 if expected[0] == 401 else 409)


def run_installer(ext: Path, site: Path, log: Path, **stub_env) -> list:
    """The webui runs install.py as a subprocess with its own python and its folder on PYTHONPATH. Returns the pip
    commands; what install.py printed is in run_installer.output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUB), str(site)]), "STUB_SITE": str(site),
           "STUB_PIP_LOG": str(log), **stub_env}
    # -S: no site-packages, so the environment is exactly what STUB_SITE holds (a webui 1.10 stand-in)
    done = subprocess.run([sys.executable, "-S", str(ext / "install.py")], env=env, check=True, cwd=ext,
                          capture_output=True, text=True)
    run_installer.output = done.stdout + done.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_install_only_what_is_missing_and_never_torch(webui, tmp_path):
    site = tmp_path / "site"
    # what webui 1.10 ships (the parts we care about), plus an accelerate older than we can work with
    for name, version in (("torch", "2.1.2"), ("torchvision", "0.16.2"), ("xformers", "0.0.23"),
                          ("transformers", "4.30.2"), ("gradio", "3.41.2"), ("safetensors", "0.4.2"),
                          ("accelerate", "0.18.0"), ("Pillow", "9.5.0"), ("tqdm", "4.66.1")):
        fake_dist(site, name, version)
    log = tmp_path / "pip.log"
    first = run_installer(webui["ext"], site, log)
    installed = [line.split('"')[1] for line in first]
    # transformers 4.30.2 cannot import diffusers 0.31+ nor peft 0.14+: the versions that fit it are asked for
    assert sorted(installed) == sorted(["diffusers>=0.27,<0.31", "peft<0.14", "accelerate>=0.21", "pyyaml",
                                        "tensorboard", "prodigyopt>=1.0", "lion-pytorch>=0.2", "schedulefree>=1.2",
                                        "came-pytorch>=0.1.3",
                                        "bitsandbytes>=0.50"])  # the version whose 8-bit AdamW runs on a CPU too
    assert "settled" not in run_installer.output
    for line in first:  # torch & co are pinned to what is installed for every pip call
        constraints = line.split('-c "')[1].rstrip('"')
        assert not Path(constraints).exists()  # cleaned up after the run
    names = {re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower() for req in installed}
    assert not names & {"torch", "torchvision", "xformers", "transformers", "gradio"}
    assert run_installer(webui["ext"], site, log) == []  # the second start installs nothing


def test_installer_says_which_older_version_it_settled_for(webui, tmp_path):
    """SD.Next on a CPU: the webui's pins leave no bitsandbytes >= 0.50; pip settles for 0.42, and install.py says so."""
    site = tmp_path / "site"
    for name, version in (("torch", "2.1.2"), ("transformers", "4.30.2"), ("gradio", "3.43.0"), ("setuptools", "69.5.1")):
        fake_dist(site, name, version)
    log = tmp_path / "pip.log"
    asked = run_installer(webui["ext"], site, log, STUB_PIP_REFUSE="bitsandbytes>=0.50",
                          STUB_PIP_VERSIONS="bitsandbytes=0.42.0")
    bnb = [line.split('"')[1] for line in asked if "bitsandbytes" in line]
    assert bnb == ["bitsandbytes>=0.50", "bitsandbytes"]
    said = [line for line in run_installer.output.splitlines() if "bitsandbytes" in line]
    assert said == ["DreamBooth: bitsandbytes>=0.50 does not fit the webui's packages; installing another bitsandbytes",
                    "DreamBooth: settled for bitsandbytes 0.42.0, older than the 0.50 it asked for: its 8-bit AdamW "
                    "runs on CUDA GPUs only; on a CPU choose the adamw optimizer"]
    assert run_installer(webui["ext"], site, log) == []  # what it settled for stays: the next start installs nothing
    assert run_installer.output == ""


def test_installer_pins_torch_family():
    install = load_file(REPO / "install.py", "db_install")
    pins = install.pinned_constraints()
    import torch

    assert f"torch=={torch.__version__}" in pins.splitlines()
    # everything installed is pinned (pip may only add packages), except what must be upgraded
    from importlib import metadata

    assert f"gradio=={metadata.version('gradio')}" in pins.splitlines()
    upgrading = install.pinned_constraints(["gradio>=99", "torch>=99"]).splitlines()
    assert not any(line.startswith("gradio==") for line in upgrading)
    assert f"torch=={torch.__version__}" in upgrading  # never released, whatever is asked
    assert install.plan(["torch>=99", "torchvision", "xformers", "gradio>=99"]) == []


def test_lora_files_refresh_the_webuis_lora_list_and_checkpoints_its_checkpoint_list(webui, monkeypatch):
    """The built-in Lora extension keeps its list in its `networks` module; without that extension, nothing happens."""
    import types

    script = load_file(webui["ext"] / "scripts" / "dreambooth_tab.py", "dreambooth_tab.py")
    host = script.webui_host()
    monkeypatch.delitem(sys.modules, "networks", raising=False)
    host.loras_changed()  # no Lora extension: nothing to refresh, no error
    scans, refreshed = [], []
    networks = types.ModuleType("networks")
    networks.list_available_networks = lambda: scans.append(1)
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.setattr(webui["shared"], "refresh_checkpoints", lambda: refreshed.append(1))
    host = script.webui_host()
    host.files_changed([host.root.lora / "dog_10.safetensors"])
    assert (len(scans), len(refreshed)) == (1, 0)
    host.files_changed([host.root.checkpoints / "dog_10.safetensors"])
    assert (len(scans), len(refreshed)) == (1, 1)


def test_on_forge_the_hosts_model_is_freed_by_forges_memory_manager(webui, monkeypatch):
    """Forge's sd_models.unload_model_weights keeps the model on the GPU; its memory manager really moves it off."""
    import types

    sd_models = webui["sd_models"]
    script = load_file(webui["ext"] / "scripts" / "dreambooth_tab.py", "dreambooth_tab.py")
    del sd_models.calls[:]
    script.free_host_model(), script.restore_host_model()
    assert sd_models.calls == ["unload", "reload"]  # the webui: its own unload and reload

    calls = []
    manager = types.ModuleType("backend.memory_management")
    manager.unload_all_models = lambda: calls.append("unload_all_models")
    manager.soft_empty_cache = lambda force=False: calls.append(("soft_empty_cache", force))
    backend = types.ModuleType("backend")
    backend.memory_management = manager
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", manager)
    del sd_models.calls[:]
    script.free_host_model(), script.restore_host_model()
    assert calls == ["unload_all_models", ("soft_empty_cache", True)]
    assert sd_models.calls == []  # Forge loads its models again on demand


# ---------------------------------------------------------------- javascript/dreambooth.js

JAVASCRIPT = REPO / "javascript" / "dreambooth.js"
# The webui's globals that javascript/dreambooth.js may call, each read in the sources of A1111 1.10.1 and of Forge
# (same file and behaviour in both):
WEBUI_GLOBALS = {
    "gradioApp": "script.js: the element that holds the page (gradio-app's shadow root or the document)",
    "onUiUpdate": "script.js: registers a callback run on every change of the page",
    "switch_to_txt2img": "javascript/ui.js: clicks the first button of #tabs (txt2img)",
    "selectCheckpoint": "javascript/ui.js: sets desiredCheckpointName and clicks the hidden #change_checkpoint "
                        "button, whose handler sets the sd_model_checkpoint setting (a title or file name)",
    "updateInput": "javascript/ui.js: dispatches an input event so gradio takes a textbox's new value",
}
# Other webui globals an extension might be tempted to call; dreambooth.js must not call them directly either.
OTHER_WEBUI_NAMES = ("onUiLoaded", "onAfterUiUpdate", "cardClicked", "get_uiCurrentTab", "opts", "submit",
                     "switch_to_img2img", "requestProgress", "desiredCheckpointName")


def test_javascript_calls_only_webui_helpers_that_exist_in_webui_and_forge():
    source = JAVASCRIPT.read_text(encoding="utf-8")
    code = re.sub(r"//[^\n]*", "", source)  # comments may name anything
    code = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', code)  # so may strings, except in webui("NAME") below
    declared = json.loads(re.search(r"var WEBUI_HELPERS = (\[[^\]]*\]);", source).group(1))
    assert set(declared) <= set(WEBUI_GLOBALS), set(declared) - set(WEBUI_GLOBALS)
    used = set(re.findall(r'webui\("(\w+)"\)', source))
    assert used and used <= set(declared)
    for name in [*WEBUI_GLOBALS, *OTHER_WEBUI_NAMES]:  # no direct call or read: every helper goes through webui()
        assert not re.search(rf"(?<![\w.]){name}\b", code), f"dreambooth.js uses {name} directly"


PAGE = """<!doctype html><html><head>{helpers}</head><body>
<div id="tabs"><button onclick="window.shown='txt2img'">txt2img</button><button>DreamBooth</button></div>
{txt2img}
<div id="db_progress" data-state="{state}"></div>
<button id="db_train">Train</button><button id="db_pause">Pause</button><button id="db_cancel">Cancel</button>
<div id="db_run_message"><div class="db-info" data-state="starting">Training dog started</div></div>
<div id="db_p_num_train_epochs"></div>
<div id="db_settings_message"><div class="db-error" data-fields="db_p_num_train_epochs">Error: ...</div></div>
<ul id="db_checkpoint_list">
 <li><button type="button" class="db-use" data-db-checkpoint="dog_24.safetensors [abc123]" hidden>Use</button></li>
 <li><button type="button" class="db-use" data-db-lora="&lt;lora:dog_30:1&gt;" hidden>Use</button></li>
</ul><script>{script}</script></body></html>"""
TXT2IMG = """<div id="tab_txt2img"><div id="txt2img_prompt"><label><textarea>a photo</textarea></label></div></div>
<button id="change_checkpoint" style="display:none" onclick="window.calls.push(['change_checkpoint', desiredCheckpointName])"></button>"""
# Stand-ins with the webui's names and behaviour (what each does is described in WEBUI_GLOBALS); they record calls.
HELPERS = {
    "gradioApp": "function gradioApp() { window.calls.push(['gradioApp']); return document; }",
    "onUiUpdate": "function onUiUpdate(cb) { window.calls.push(['onUiUpdate']); "
                  "new MutationObserver(cb).observe(document.documentElement, {subtree: true, childList: true, attributes: true}); }",
    "switch_to_txt2img": "function switch_to_txt2img() { window.calls.push(['switch_to_txt2img']); "
                         "document.querySelector('#tabs button').click(); return Array.from(arguments); }",
    "selectCheckpoint": "var desiredCheckpointName = null; function selectCheckpoint(name) { "
                        "window.calls.push(['selectCheckpoint', name]); desiredCheckpointName = name; "
                        "document.getElementById('change_checkpoint').click(); }",
    "updateInput": "function updateInput(target) { window.calls.push(['updateInput', target.value]); "
                   "target.dispatchEvent(new Event('input', {bubbles: true})); }",
}


def load_page(page, helpers=(), txt2img=True, state="running"):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    script = "<script>window.calls = [];" + "\n".join(HELPERS[h] for h in helpers) + "</script>"
    page.set_content(PAGE.format(helpers=script, txt2img=TXT2IMG if txt2img else "", state=state,
                                 script=JAVASCRIPT.read_text(encoding="utf-8")))
    page.wait_for_function("window.dreambooth !== undefined")
    page.evaluate("window.dreambooth.sync()")
    return errors


@pytest.mark.slow
def test_javascript_in_the_webui_uses_its_helpers(page):
    errors = load_page(page, helpers=WEBUI_GLOBALS)
    # buttons follow the run; an error's field is marked; the "started" message gave way to "running"
    assert page.evaluate("document.querySelector('#db_train').disabled")
    assert not page.evaluate("document.querySelector('#db_cancel').disabled")
    assert page.locator("#db_p_num_train_epochs.db-invalid").count() == 1
    assert page.locator("#db_run_message div").is_hidden()
    page.evaluate("document.querySelector('#db_progress').dataset.state = 'paused'; window.dreambooth.sync()")
    assert page.inner_text("#db_pause") == "Resume"
    page.evaluate("document.querySelector('#db_progress').dataset.state = 'none'; window.dreambooth.sync()")
    assert page.evaluate("document.querySelector('#db_train').disabled")  # no model selected: nothing to train
    page.evaluate("document.querySelector('#db_progress').dataset.state = 'paused'; window.dreambooth.sync()")
    # a checkpoint: switch to txt2img, select it in the webui's checkpoint list
    assert page.locator("button.db-use").nth(0).is_visible()
    page.evaluate("window.calls = []")
    page.locator("button.db-use").nth(0).click()
    assert page.evaluate("window.shown") == "txt2img"
    calls = page.evaluate("window.calls.filter(c => c[0] !== 'gradioApp')")
    assert calls == [["switch_to_txt2img"], ["selectCheckpoint", "dog_24.safetensors [abc123]"],
                     ["change_checkpoint", "dog_24.safetensors [abc123]"]]
    # a LoRA: its tag goes into the txt2img prompt once, and gradio is told
    page.evaluate("window.calls = []")
    page.locator("button.db-use").nth(1).click()
    page.locator("button.db-use").nth(1).click()
    assert page.input_value("#txt2img_prompt textarea") == "a photo <lora:dog_30:1>"
    assert ["updateInput", "a photo <lora:dog_30:1>"] in page.evaluate("window.calls")
    assert page.evaluate("window.calls.filter(c => c[0] === 'updateInput').length") == 1
    assert errors == []


@pytest.mark.slow
@pytest.mark.parametrize("helpers,txt2img", [((), False), ((), True), (("gradioApp", "switch_to_txt2img"), True),
                                             (("gradioApp", "onUiUpdate", "selectCheckpoint", "updateInput"), True)])
def test_javascript_degrades_to_nothing_without_the_webuis_helpers(page, helpers, txt2img):
    errors = load_page(page, helpers=helpers, txt2img=txt2img, state="idle")
    assert not page.evaluate("document.querySelector('#db_train').disabled")  # its own part works anyway
    assert page.evaluate("document.querySelector('#db_pause').disabled")
    checkpoint_ok = {"switch_to_txt2img", "selectCheckpoint"} <= set(helpers) and txt2img
    assert page.locator("button.db-use").nth(0).is_visible() == checkpoint_ok
    assert not checkpoint_ok
    page.evaluate("document.querySelectorAll('button.db-use').forEach(b => b.click())")  # even if clicked
    assert page.evaluate("[window.dreambooth.useCheckpoint('x'), window.dreambooth.useLora('<lora:x:1>')]") == [
        False, False]
    assert page.evaluate("window.calls.filter(c => c[0] !== 'gradioApp' && c[0] !== 'onUiUpdate')") == []
    assert page.evaluate("window.shown") is None
    if txt2img:
        assert page.input_value("#txt2img_prompt textarea") == "a photo"
    assert errors == []
