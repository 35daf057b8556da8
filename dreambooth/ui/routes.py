"""REST routes under /dreambooth/: drive a training over HTTP (the webui mounts them on its FastAPI app).

GET  /dreambooth/models              {"models": [names], "running": job or null}
GET  /dreambooth/config/{name}       the model's config.json
POST /dreambooth/config/{name}       replace it (validated; 400 names every bad field)
POST /dreambooth/start/{name}        start training (409 while another runs)
GET  /dreambooth/status[/{name}]     status of the running job, or of a model
POST /dreambooth/cancel              cancel the running job

Bad input answers 400 with {"detail": message}; an unknown model 404; a second training 409.
"""
from __future__ import annotations

from hmac import compare_digest

from .. import worker
from ..config import Config
from ..errors import UserError
from ..host import Host
from ..models import save_config


def basic_auth(credentials: str) -> list:
    """The webui's API auth (--api-auth user:pass[,user:pass]): the same HTTP Basic check its own API attaches."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    users = dict(item.strip().split(":", 1) for item in credentials.split(",") if ":" in item)

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())):
        if given.username in users and compare_digest(given.password, users[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def add_routes(app, host: Host, dependencies: list = ()) -> None:
    from fastapi import APIRouter, Body, HTTPException

    root = host.root
    router = APIRouter(prefix="/dreambooth", dependencies=list(dependencies), tags=["dreambooth"])

    def model(name: str):
        try:
            m = root.model(name)
        except UserError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        if not m.exists():
            raise HTTPException(status_code=404, detail=f"model {name!r}: not found")
        return m

    @router.get("/models")
    def models():
        return {"models": root.model_names(), "running": worker.running_job(root)}

    @router.get("/config/{name}")
    def get_config(name: str):
        try:
            return Config.load(model(name).config_path).to_dict()
        except UserError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @router.post("/config/{name}")
    def set_config(name: str, body: dict = Body(...)):
        try:
            return save_config(model(name), body).to_dict()
        except UserError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @router.post("/start/{name}")
    def start(name: str):
        model(name)
        try:
            return worker.start(root, name, host)
        except worker.JobRunningError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        except UserError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @router.get("/status")
    def running_status():
        job = worker.running_job(root)
        return worker.status(root, job["name"]).to_dict() if job else {"state": "idle", "running": False}

    @router.get("/status/{name}")
    def model_status(name: str):
        return worker.status(root, model(name).name).to_dict()

    @router.post("/cancel")
    def cancel():
        job = worker.running_job(root)
        if job is None:
            raise HTTPException(status_code=409, detail="no training is running")
        return {"message": worker.request(root, job["name"], "cancel"), "name": job["name"]}

    app.include_router(router)
