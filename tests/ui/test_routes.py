"""The REST routes' rules, through FastAPI's test client: state-changing routes take JSON only (a web page in the same
browser cannot send them a "simple" cross-site request), bodies are bounded, and every bad body is a 4xx with one
line, never a 500. The trainer is a small stand-in speaking the events contract."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from dreambooth import jobs
from dreambooth.config import Concept, Config
from dreambooth.host import Host
from dreambooth.store import DataRoot
from dreambooth.ui import routes

LOCAL = "http://127.0.0.1:7860"  # the address a browser on this machine uses (the test client's default name is refused)

FAKE = Path(__file__).with_name("fake_trainer.py")


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A FastAPI app with the routes (open, as with a bare --api), a model 'dog' with an images folder."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    root = DataRoot(tmp_path / "root").ensure()
    images = tmp_path / "images"
    images.mkdir()
    model = root.model("dog")
    model.path.mkdir(parents=True)
    Config(concepts=(Concept(instance_data_dir=str(images)),)).save(model.config_path)
    monkeypatch.setattr(jobs, "trainer_command",
                        lambda r, name, settings: [sys.executable, str(FAKE), str(r.model(name).path), "wait"])
    app = FastAPI()
    routes.add_routes(app, Host(root=root))
    yield TestClient(app, base_url=LOCAL), root
    job = jobs.running_job(root)
    if job:  # a failed test must not leave its trainer running
        os.kill(job["pid"], signal.SIGKILL)


# What a page on another site can send without a CORS preflight: a form (urlencoded, multipart, text/plain) or a
# fetch with no-cors mode, whose body may be empty and whose content type may be absent.
SIMPLE_REQUESTS = {
    "text/plain JSON": {"content": b'{"concepts": []}', "headers": {"Content-Type": "text/plain"}},
    "text/plain empty": {"content": b"", "headers": {"Content-Type": "text/plain;charset=UTF-8"}},
    "form": {"content": b"a=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    "multipart": {"content": b"--x\r\n\r\n--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
    "no content type": {"content": b""},
    "json look-alike": {"content": b"{}", "headers": {"Content-Type": "application/jsonp"}},
}


@pytest.mark.parametrize("kind", list(SIMPLE_REQUESTS))
@pytest.mark.parametrize("path", ["/dreambooth/start/dog", "/dreambooth/cancel", "/dreambooth/config/dog"])
def test_state_changing_routes_refuse_what_a_cross_site_page_can_send(api, path, kind):
    client, root = api
    before = root.model("dog").config_path.read_bytes()
    response = client.post(path, **SIMPLE_REQUESTS[kind])
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["detail"]
    assert jobs.running_job(root) is None
    assert root.model("dog").config_path.read_bytes() == before


def test_json_start_and_cancel_work(api, wait_for):
    client, root = api
    job = client.post("/dreambooth/start/dog", json={})
    assert job.status_code == 200 and job.json()["name"] == "dog"
    wait_for(lambda: client.get("/dreambooth/status").json().get("step", 0) >= 1)
    empty_json = client.post("/dreambooth/cancel", content=b"", headers={"Content-Type": "application/json"})
    assert empty_json.status_code == 200 and empty_json.json()["name"] == "dog"
    wait_for(lambda: client.get("/dreambooth/status/dog").json()["state"] == "cancelled")


def big_object(size: int) -> bytes:
    return json.dumps({"concepts": [{"instance_prompt": "x" * size}]}).encode()


BAD_BODIES = {  # body -> (status, words the one-line answer must contain)
    "over the size limit": (big_object(routes.MAX_BODY), 413, "larger than"),
    "invalid UTF-8": (b'{"concepts": [{"instance_prompt": "\xff\xfe"}]}', 400, "UTF-8"),
    "invalid JSON": (b'{"concepts": [', 400, "not valid JSON"),
    "trailing garbage": (b'{"concepts": []} {}', 400, "not valid JSON"),
    "NaN": (b'{"parameters": {"learning_rate": NaN}}', 400, "NaN"),
    "Infinity": (b'{"parameters": {"learning_rate": -Infinity}}', 400, "Infinity"),
    "5000-digit number": (b'{"parameters": {"seed": ' + b"9" * 5000 + b"}}", 400, "not valid JSON"),
    "400-digit number": (b'{"parameters": {"learning_rate": ' + b"9" * 400 + b"}}", 400, "learning_rate"),
    "1e400": (b'{"parameters": {"learning_rate": 1e400}}', 400, "finite number"),
    "-1e999": (b'{"parameters": {"adam_epsilon": -1e999}}', 400, "finite number"),
    "nested 33 deep": (b"[" * 33 + b"]" * 33, 400, "nested"),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    "a list, not an object": (b"[]", 400, "JSON object"),
    "a string": (b'"config"', 400, "JSON object"),
    "empty": (b"", 400, "JSON object"),
    "whitespace": (b"  \n", 400, "JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_config_bodies_answer_one_line_and_change_nothing(api, case):
    client, root = api
    body, status, words = BAD_BODIES[case]
    before = root.model("dog").config_path.read_bytes()
    response = client.post("/dreambooth/config/dog", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail and len(detail) < 300
    assert root.model("dog").config_path.read_bytes() == before


def test_a_large_body_without_a_length_is_cut_off_while_it_streams(api):
    client, root = api

    def chunks():
        for _ in range(routes.MAX_BODY // 65536 + 2):
            yield b" " * 65536

    response = client.post("/dreambooth/config/dog", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_a_good_config_is_stored_and_a_model_name_cannot_escape(api):
    client, root = api
    config = Config().to_dict()
    saved = client.post("/dreambooth/config/dog", json=config, headers={"Content-Type": "application/json; charset=utf-8"})
    assert saved.status_code == 200 and saved.json() == config
    assert client.post("/dreambooth/config/..%2F..%2Fx", json=config).status_code in (400, 404)
    assert client.post("/dreambooth/start/nope", json={}).status_code == 404


def test_basic_auth_guards_every_route(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    routes.add_routes(app, Host(root=DataRoot(tmp_path).ensure()), routes.basic_auth("alice:secret,bob:pw:x"))
    client = TestClient(app, base_url=LOCAL)
    for method, path in (("get", "/dreambooth/models"), ("get", "/dreambooth/status"), ("post", "/dreambooth/cancel"),
                         ("post", "/dreambooth/start/dog"), ("get", "/dreambooth/config/dog")):
        kwargs = {"json": {}} if method == "post" else {}
        assert getattr(client, method)(path, **kwargs).status_code == 401
        assert getattr(client, method)(path, auth=("alice", "wrong"), **kwargs).status_code == 401
        assert getattr(client, method)(path, auth=("älice", "sécret"), **kwargs).status_code == 401
    assert client.get("/dreambooth/models", auth=("alice", "secret")).status_code == 200
    assert client.get("/dreambooth/models", auth=("bob", "pw:x")).status_code == 200


@pytest.mark.parametrize("text", ["alice", ":pw", "alice:", "a:b,,c"])
def test_credentials_format(text):
    from dreambooth.errors import UserError

    with pytest.raises(UserError, match="^credentials: "):
        routes.parse_credentials(text)
    assert routes.parse_credentials(" a:b , c:d:e ") == [("a", "b"), ("c", "d:e")]


def test_start_can_start_over_or_go_back_and_says_what_it_did(api, wait_for):
    client, root = api
    model = root.model("dog")
    for bad, said in (({"start_over": "yes"}, "start_over: expected true or false"),
                      ({"from_step": -1}, "from_step: expected a step number"),
                      ({"from_step": True}, "from_step: expected a step number"),
                      ({"resume": True}, 'expected {"start_over": true} or {"from_step": S}'),
                      ([], 'expected {"start_over": true} or {"from_step": S}'),
                      ({"start_over": True, "from_step": 3}, "not both"),
                      ({"from_step": 4}, "no kept save at step 4 (kept: none)")):
        response = client.post("/dreambooth/start/dog", json=bad)
        assert response.status_code == 400 and said in response.json()["detail"], (bad, response.text)
        assert jobs.last_job(root) is None
    started = client.post("/dreambooth/start/dog", json={"from_step": None})
    assert started.status_code == 200, started.text
    assert started.json()["message"] == "Training dog started, from step 0." and started.json()["from_step"] == 0
    assert client.post("/dreambooth/start/dog", json={"start_over": True}).status_code == 409
    client.post("/dreambooth/cancel", json={})
    wait_for(lambda: jobs.running_job(root) is None)
    assert model.exists()
