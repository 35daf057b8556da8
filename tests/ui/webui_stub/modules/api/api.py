"""modules/api/api.py: the webui's own REST API (/sdapi/v1/...), mounted by webui.py only with --api or --nowebui.

One route stands in for all of them; like the webui's, every route sits behind HTTP Basic auth when --api-auth is
set (users 'u:p' separated by commas), and the credentials are compared with hmac.compare_digest."""
from hmac import compare_digest

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import shared, sd_models


class Api:
    def __init__(self, app, queue_lock=None):
        self.app = app
        self.credentials = {}
        if shared.cmd_opts.api_auth:
            for auth in shared.cmd_opts.api_auth.split(","):
                user, password = auth.split(":")
                self.credentials[user] = password
        self.add_api_route("/sdapi/v1/sd-models", self.get_sd_models, methods=["GET"])

    def add_api_route(self, path, endpoint, **kwargs):
        if shared.cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        if credentials.username in self.credentials:
            if compare_digest(credentials.password, self.credentials[credentials.username]):
                return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    def get_sd_models(self):
        return [{"title": info.title, "filename": info.filename} for info in sd_models.checkpoints_list.values()]
