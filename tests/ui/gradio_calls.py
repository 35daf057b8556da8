"""Calling a served gradio app's handlers as a web page of another site can: raw HTTP (exact headers: any Origin and
Host, no Content-Type) and raw WebSockets, for gradio 3.41 (/run/predict, WebSocket /queue/join), 4.40 (/run/predict,
POST /queue/join + /queue/data) and 6 (the same under /gradio_api).

The FastAPI that gradio 6 runs on refuses a body without `Content-Type: application/json` by itself (a no-cors page
cannot send that). There the calls say JSON, as a page would that a CORS preflight had let through, so that the
extension's own check is what refuses them."""
import http.client
import json
import urllib.request
import uuid
from urllib.parse import urlsplit


class GradioApp:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.config = json.loads(urllib.request.urlopen(self.url + "/config", timeout=30).read())
        self.version = tuple(int(p) for p in self.config["version"].split(".")[:2])
        self.prefix = "/gradio_api" if self.version >= (5, 0) else ""
        self.address = urlsplit(self.url).netloc
        self.content_type = "application/json" if self.version >= (5, 0) else None

    def component(self, elem_id: str) -> dict:
        return next(c for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def handler(self, elem_id: str, event: str = "click") -> tuple[int, dict]:
        """(fn_index, dependency) of the handler an element's event runs (its first one)."""
        target = self.component(elem_id)["id"]
        for index, dep in enumerate(self.config["dependencies"]):
            for t in dep["targets"]:
                if (t == target) if isinstance(t, int) else (t[0] == target and t[1] == event):
                    if dep.get("backend_fn", True):
                        return dep.get("id", index), dep
        raise KeyError(elem_id)

    def inputs(self, dep: dict, **given) -> list:
        """Values for a handler's inputs: each component's value in the page, or given by elem_id."""
        by_id = {c["id"]: c for c in self.config["components"]}
        out = []
        for i in dep["inputs"]:
            props = by_id.get(i, {}).get("props", {})
            out.append(given.get(props.get("elem_id"), props.get("value")))
        return out

    def _request(self, method: str, path: str, body: bytes | None, headers: dict):
        conn = http.client.HTTPConnection(self.address, timeout=60)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": self.address, "Content-Type": self.content_type if body else None, **headers}
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders(body)
        return conn.getresponse()

    def predict(self, fn_index: int, data: list, headers: dict, forged_request: dict | None = None):
        """POST /run/predict without a Content-Type (a `fetch(..., {mode: "no-cors", body: Blob})`): (status, body)."""
        body = {"fn_index": fn_index, "data": data, "session_hash": uuid.uuid4().hex[:10]}
        if forged_request is not None:
            body["request"] = forged_request
        response = self._request("POST", self.prefix + "/run/predict", json.dumps(body).encode(), headers)
        return response.status, response.read().decode("utf-8", "replace")

    def queue(self, fn_index: int, data: list, headers: dict) -> str:
        """A call through the queue as a page can make it: the output text (or the refusal) in one string."""
        session = uuid.uuid4().hex[:10]
        if self.version < (4, 0):
            from websockets.sync.client import connect

            ws_url = "ws://" + self.address + "/queue/join"
            extra = {k: v for k, v in headers.items() if k.lower() not in ("origin", "host")}
            try:
                with connect(ws_url, origin=headers.get("Origin"), additional_headers=extra, open_timeout=30) as ws:
                    for _ in range(20):
                        msg = json.loads(ws.recv(timeout=60))
                        if msg["msg"] == "send_hash":
                            ws.send(json.dumps({"fn_index": fn_index, "session_hash": session}))
                        elif msg["msg"] == "send_data":
                            ws.send(json.dumps({"fn_index": fn_index, "data": data, "session_hash": session,
                                                "event_data": None}))
                        elif msg["msg"] == "process_completed":
                            return json.dumps(msg)
            except Exception as e:  # a refused WebSocket
                return f"websocket refused: {e}"
            return "no answer"
        body = {"fn_index": fn_index, "data": data, "session_hash": session, "event_data": None, "trigger_id": None}
        joined = self._request("POST", self.prefix + "/queue/join", json.dumps(body).encode(), headers)
        text = joined.read().decode("utf-8", "replace")
        if joined.status != 200:
            return f"join {joined.status}: {text}"
        stream = self._request("GET", f"{self.prefix}/queue/data?session_hash={session}", None, headers)
        if stream.status != 200:
            return f"data {stream.status}: {stream.read().decode('utf-8', 'replace')}"
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("data:") and "process_completed" in line:
                return line
        return "no answer"
