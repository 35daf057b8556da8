"""REST routes under /dreambooth/: drive a training over HTTP, on the webui's FastAPI app or the standalone app's.

GET  /dreambooth/models              {"models": [names], "running": job or null}
GET  /dreambooth/config/{name}       the model's config.json
POST /dreambooth/config/{name}       replace it (validated; 400 names every bad field); the concepts' folders and
                                     files stay as chosen in the tab or the CLI
POST /dreambooth/start/{name}        start training (409 while another runs); the body may say
                                     {"start_over": true} (from the source checkpoint's weights, at step 0) or
                                     {"from_step": S} (go back to the kept save of step S); default: resume
GET  /dreambooth/status[/{name}]     status of the running job, or of a model
POST /dreambooth/cancel              cancel the running job

Access: the routes exist where the host's own API does (webui: --api or --nowebui) and sit behind its HTTP Basic
auth when one is set. They follow the tab's access rule (dreambooth.access): a call from another site's page or
addressed to a name that is not this machine's is answered 403 with one line. A POST must also say `Content-Type: application/json` (its body may be empty where none is needed):
a web page can send text/plain or form posts to another site without asking, but not JSON, so a page open in the same
browser cannot start, cancel or reconfigure a training. Bodies are at most MAX_BODY bytes of UTF-8 JSON, bounded as
config files are (config.parse_json: depth, no NaN/Infinity).

Bad input answers 400 with {"detail": one line}; a body that is not JSON 415; one too large 413; an unknown model 404;
a second training 409; a refused caller 403; a write that fails 507 (disk full) or 500, the detail naming the file.
"""
from __future__ import annotations

import base64
import binascii
from hmac import compare_digest

from fastapi import APIRouter, Depends, HTTPException, Request

from .. import actions, jobs
from ..config import MAX_CONFIG_BYTES, Config, parse_json
from ..events import Follower
from ..errors import UserError, WriteError
from ..host import Host
from ..models import save_config

MAX_BODY = MAX_CONFIG_BYTES


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """'user:pass[,user:pass]' (the webui's --api-auth / --gradio-auth format) -> [(user, pass)]."""
    pairs = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise UserError("credentials: expected user:password (several separated by commas)")
        user, password = item.split(":", 1)
        if not user or not password:
            raise UserError("credentials: user and password must not be empty")
        pairs.append((user, password))
    return pairs


def basic_auth(credentials) -> list:
    """HTTP Basic auth as the webui's own API does it (--api-auth): a list of FastAPI dependencies.

    `credentials` is 'user:pass[,user:pass]' or a list of (user, pass) pairs."""
    pairs = parse_credentials(credentials) if isinstance(credentials, str) else list(credentials)
    users = {user: password for user, password in pairs}

    def auth(request: Request):
        given = basic_credentials(request.headers.get("authorization", ""))
        if given and given[0] in users and compare_digest(given[1].encode(), users[given[0]].encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": 'Basic charset="UTF-8"'})

    return [Depends(auth)]


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` header, UTF-8 as RFC 7617 says (Latin-1 where it is not
    UTF-8); None when there is none or it is malformed."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (ValueError, binascii.Error):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, colon, password = text.partition(":")
    return (user, password) if colon else None


async def json_body(request: Request):
    """The JSON body of a state-changing request (None when empty); 415 / 413 / 400 otherwise."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(status_code=415, detail="send the request as JSON (Content-Type: application/json)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise HTTPException(status_code=413, detail=f"request body: larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPException(status_code=413, detail=f"request body: larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return None
    try:
        return parse_json(raw, "request body")
    except UserError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


def failed(e: UserError) -> HTTPException:
    """400 for bad input; a failed write is the server's: 507 when the disk is full, else 500."""
    if isinstance(e, WriteError):
        return HTTPException(status_code=507 if e.disk_full else 500, detail=str(e))
    return HTTPException(status_code=400, detail=str(e))


def start_options(data) -> tuple[bool, int | None]:
    """(start over, the kept save to go back to) from the body of POST /start (empty: resume)."""
    options = {} if data is None else data
    if not isinstance(options, dict) or set(options) - {"start_over", "from_step"}:
        raise HTTPException(status_code=400, detail='request body: expected {"start_over": true} or '
                                                    '{"from_step": S}, or nothing')
    start_over, from_step = options.get("start_over", False), options.get("from_step")
    if not isinstance(start_over, bool):
        raise HTTPException(status_code=400, detail="start_over: expected true or false")
    if from_step is not None and (isinstance(from_step, bool) or not isinstance(from_step, int) or from_step < 0):
        raise HTTPException(status_code=400, detail="from_step: expected a step number (0 or more)")
    return start_over, from_step


def add_routes(app, host: Host, dependencies: list = ()) -> None:
    root = host.root
    follower = Follower()  # the status routes read only what a run's log gained since the last call

    def allowed(request: Request):
        refusal = host.access.refusal(request.headers)
        if refusal:
            raise HTTPException(status_code=403, detail=refusal)

    router = APIRouter(prefix="/dreambooth", dependencies=[Depends(allowed), *dependencies], tags=["dreambooth"])
    body = Depends(json_body)

    def model(name: str):
        try:
            m = root.model(name)
        except UserError as e:
            raise failed(e) from None
        if not m.exists():
            raise HTTPException(status_code=404, detail=f"model {name!r}: not found")
        return m

    @router.get("/models")
    def models():
        return {"models": root.model_names(), "running": jobs.running_job(root)}

    @router.get("/config/{name}")
    def get_config(name: str):
        try:
            return Config.load(model(name).config_path).to_dict()
        except UserError as e:
            raise failed(e) from None

    @router.post("/config/{name}")
    def set_config(name: str, data=body):
        if not isinstance(data, dict):
            raise HTTPException(status_code=400, detail="request body: expected the config as a JSON object")
        try:
            return save_config(model(name), data, paths_fixed=True).to_dict()
        except UserError as e:
            raise failed(e) from None

    @router.post("/start/{name}")
    def start(name: str, data=body):
        model(name)
        start_over, from_step = start_options(data)
        try:
            started = actions.train(root, name, host, start_over=start_over, from_step=from_step)
            return {**started.job, "from_step": started.from_step, "message": started.message}
        except jobs.JobRunningError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        except UserError as e:
            raise failed(e) from None

    @router.get("/status")
    def running_status():
        job = jobs.running_job(root)
        return jobs.status(root, job["name"], follower).to_dict() if job else {"state": "idle", "running": False}

    @router.get("/status/{name}")
    def model_status(name: str):
        return jobs.status(root, model(name).name, follower).to_dict()

    @router.post("/cancel", dependencies=[body])
    def cancel():
        job = jobs.running_job(root)
        if job is None:
            raise HTTPException(status_code=409, detail="no training is running")
        try:
            return {"message": actions.request(root, job["name"], "cancel"), "name": job["name"]}
        except UserError as e:
            raise failed(e) from None

    app.include_router(router)
