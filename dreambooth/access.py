"""Who may call the tab's handlers and the REST routes: one rule for both, owned here.

Two attacks reach a server that listens on this machine from a web page the user happens to visit:
- Cross-site calls. A page may POST to any address without asking (`fetch(..., {mode: "no-cors"})`) and open a
  WebSocket to it; the browser says where the call comes from in the `Origin` header. A call whose Origin is not the
  page the tab is served from (or an origin the user allowed) is refused. Calls without an Origin (the webui's --api
  clients, curl, scripts) are not from a browser page and pass.
- DNS rebinding. A page on evil.example points its name at 127.0.0.1 and then calls "its own" server, same-origin.
  The `Host` header still says evil.example: a name that is not an IP address, localhost, this machine's name or a
  name the user allowed is refused. Behind a login (the rebound page has no session) or a public share link the Host
  is not checked.

gradio 3.41 and 4.40 let a caller put a `request` object (headers included) in the body of /run/predict, /api/predict
and /queue/join, which the handler then sees instead of the real request. `AccessMiddleware` removes it from calls
that carry a foreign Origin, so a handler always sees the headers the browser sent.
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# gradio's call routes (3.41, 4.40 and newer, under any mount path): their bodies may carry a `request` object
GRADIO_CALLS = re.compile(r"/(run|api|call)/[^/]+/?$|/queue/join/?$")
MAX_CALL_BODY = 64 << 20  # what this middleware reads to clean a foreign call; larger foreign calls are refused


def _split_host(value: str, default_port: int | None = None) -> tuple[str, int | None]:
    """'Example.org:8080' -> ('example.org', 8080); '[::1]:7860' -> ('::1', 7860)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return name.rstrip("."), int(port) if port.isdigit() else default_port


def origin_address(origin: str) -> tuple[str, int | None] | None:
    """'http://Example.org' -> ('example.org', 80); None for 'null' and anything that is not scheme://host[:port]."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[parts.scheme]


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def machine_names() -> set[str]:
    """The names this machine answers to on its own network (the address it serves on may be reached by them)."""
    names = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            name = get().lower().rstrip(".")
        except OSError:
            continue
        if name:
            names |= {name, f"{name.split('.')[0]}.local"}
    return names


@dataclass(frozen=True)
class Access:
    """The rule. `origins`: origins the user allowed besides the page's own (the webui's --cors-allow-origins);
    `origin_pattern`: a regular expression for more (--cors-allow-origins-regex); `hosts`: host names the user
    reaches the server by besides IP addresses, localhost and this machine's names (a proxy's name, --server-name);
    `any_host`: do not check Host (behind a login or a share link); `public`: check nothing (a public share link:
    anyone on the internet can call it directly, so a page calling it through a visitor's browser gains nothing);
    `allow_hint`: how the user allows an origin."""

    origins: tuple[str, ...] = ()
    origin_pattern: str | None = None
    hosts: tuple[str, ...] = ()
    any_host: bool = False
    public: bool = False
    allow_hint: str = "start the app with --allow-origin ORIGIN"
    _names: frozenset = field(default_factory=lambda: frozenset(machine_names()), compare=False, repr=False)

    def host_allowed(self, host: str | None) -> bool:
        if self.any_host or self.public or not host:
            return True
        name, _ = _split_host(host)
        if is_ip_address(name) or name == "localhost" or name.endswith(".localhost") or name in self._names:
            return True
        allowed = {_split_host(h)[0] for h in self.hosts} | {a[0] for a in map(origin_address, self.origins) if a}
        return name in allowed

    def origin_allowed(self, origin: str | None, host: str | None, forwarded_host: str | None = None) -> bool:
        if origin is None or self.public:
            return True  # not sent by a browser page, or a public link anyone may call
        if origin.strip() in self.origins or (self.origin_pattern and re.fullmatch(self.origin_pattern, origin.strip())):
            return True
        address = origin_address(origin)
        if address is None:
            return False  # "null": a sandboxed frame or a local file, never the tab's own page
        served = [h for h in (host, (forwarded_host or "").split(",")[0]) if h and h.strip()]
        return any(_split_host(h, address[1]) == address for h in served)

    def refusal(self, headers) -> str | None:
        """Why a call with these headers (a mapping with lower-case keys) is refused, in one line; None to allow."""
        host = headers.get("host")
        if not self.host_allowed(host):
            return (f"refused a request addressed to {host!r}: not this machine's address (a web page may have "
                    "pointed its own name at this machine)")
        origin = headers.get("origin")
        if not self.origin_allowed(origin, host, headers.get("x-forwarded-host")):
            return (f"refused a request from the page at {origin}: it is not this page's own address (if it is "
                    f"yours, {self.allow_hint})")
        return None


def request_headers(request) -> dict:
    """The headers a gradio handler's `gr.Request` carries, with lower-case names (a fastapi Request's, or the dict
    gradio 3.41's queue copies from the WebSocket)."""
    if request is None:
        return {}
    headers = getattr(request, "headers", None)
    if headers is None:
        return {}
    items = headers.items() if hasattr(headers, "items") else vars(headers).items()
    return {str(k).lower(): str(v) for k, v in items}


class AccessMiddleware:
    """ASGI middleware: gives every gradio handler the real request (see the module's doc) and, where `everywhere`
    (the standalone app, which serves nothing else), refuses any call the rule refuses with 403 and one line."""

    def __init__(self, app, access: Access, everywhere: bool = False):
        self.app, self.access, self.everywhere = app, access, everywhere

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.access.refusal(headers)
        if refusal and self.everywhere:
            return await _refuse(scope, receive, send, refusal)
        foreign_call = (scope["type"] == "http" and scope.get("method") == "POST" and refusal
                        and GRADIO_CALLS.search(scope.get("path", "")))
        if not foreign_call:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_CALL_BODY:
                return await _refuse(scope, receive, send, refusal)
        body = _without_request(body)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                 + [(b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay, send)


def _without_request(body: bytes) -> bytes:
    """A gradio call's JSON body without the caller-supplied `request` (left as it is when it is not JSON)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if isinstance(data, dict) and "request" in data:
        del data["request"]
        return json.dumps(data).encode("utf-8")
    return body


async def _refuse(scope, receive, send, refusal: str):
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": refusal[:120]})
        return
    payload = json.dumps({"detail": refusal}).encode("utf-8")
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def install(app, access: Access, everywhere: bool = False) -> None:
    """Put AccessMiddleware in front of an app that may already be serving (the webui's, the standalone gradio's)."""
    from starlette.middleware import Middleware

    if any(getattr(m, "cls", None) is AccessMiddleware for m in app.user_middleware):
        return
    app.user_middleware.insert(0, Middleware(AccessMiddleware, access=access, everywhere=everywhere))
    app.middleware_stack = None  # rebuilt from user_middleware on the next request
