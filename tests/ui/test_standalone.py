"""The standalone app (`python -m dreambooth ui`) as a real server process, on the newest gradio and, where their
environments exist, on 3.41.2 and 4.40: it listens on 127.0.0.1, serves the same REST routes as the webui, puts
`--auth` in front of both the page and the routes, and gives no other origin CORS permission."""
import base64
import json
import sys
import urllib.error
import urllib.request

import pytest


def call(url, method="GET", body=None, content_type=None, auth=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if content_type:
        request.add_header("Content-Type", content_type)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def listening_addresses(port: int) -> set:
    """Local addresses (hex, as /proc/net/tcp writes them) with a listening socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["newest", "3.41", "4.40"])
def test_standalone_app_routes_auth_and_loopback(stack, start_app, stack_python, wait_for):
    python = sys.executable if stack == "newest" else stack_python(stack)
    open_app = start_app(python=python)
    # the routes join gradio's app right after it starts serving (as in the webui): wait for the line saying so
    wait_for(lambda: b"REST routes at" in open_app.log.read_bytes())
    assert listening_addresses(open_app.port) == {"0100007F"}  # 127.0.0.1 only
    base = open_app.url + "dreambooth/"
    status, body, _ = call(base + "models")
    assert status == 200 and json.loads(body) == {"models": [], "running": None}
    assert call(base + "cancel", "POST", b"{}", "text/plain")[0] == 415  # a cross-site form post cannot reach it
    assert call(base + "cancel", "POST", b"{}", "application/json")[0] == 409  # nothing runs
    # no CORS permission for another origin, not even another app on this machine
    status, _, headers = call(base + "cancel", "OPTIONS", headers={
        "Origin": "http://localhost:9999", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers.keys()}

    locked = start_app(python=python, root=open_app.root, args=["--auth", "alice:s3cret"])
    wait_for(lambda: b"REST routes at" in locked.log.read_bytes())
    base = locked.url + "dreambooth/"
    assert call(base + "models")[0] == 401
    assert call(base + "models", auth=("alice", "wrong"))[0] == 401
    assert call(base + "models", auth=("alice", "s3cret"))[0] == 200
    assert call(base + "cancel", "POST", b"{}", "application/json")[0] == 401
    assert call(base + "cancel", "POST", b"{}", "application/json", auth=("alice", "s3cret"))[0] == 409
    # the page's own endpoints want gradio's login
    status, body, _ = call(locked.url + "config")
    assert status in (401, 403) or b'"auth_required"' in body or b"auth_required" in body, (status, body[:200])
