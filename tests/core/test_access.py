"""The access rule (dreambooth.access): which Host and Origin headers a call may carry."""
import pytest

from dreambooth.access import Access, machine_names


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7861", "192.168.1.20:7860",
                                  "10.0.0.5", "app.localhost:80", None, ""])
def test_addresses_of_this_machine_pass(host):
    assert Access().host_allowed(host)


@pytest.mark.parametrize("host", ["evil.example:7860", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "sd.example.org"])
def test_other_names_are_refused_unless_allowed(host):
    assert not Access().host_allowed(host)
    assert Access(hosts=(host.split(":")[0],)).host_allowed(host)
    assert Access(any_host=True).host_allowed(host)


def test_the_machines_own_names_pass():
    for name in machine_names():
        assert Access().host_allowed(f"{name}:7860")


def test_an_allowed_origin_names_a_host_too():
    access = Access(origins=("https://sd.example.org",))
    assert access.host_allowed("sd.example.org")
    assert access.origin_allowed("https://sd.example.org", "127.0.0.1:7860")


@pytest.mark.parametrize("origin, host", [
    ("http://127.0.0.1:7860", "127.0.0.1:7860"),
    ("http://localhost:7860", "localhost:7860"),
    ("https://sd.example.org", "sd.example.org"),  # the default port on both sides
    ("https://sd.example.org", "sd.example.org:443"),
    ("http://[::1]:7860", "[::1]:7860"),
    (None, "127.0.0.1:7860"),  # not a browser page
])
def test_the_pages_own_origin_passes(origin, host):
    assert Access().origin_allowed(origin, host)


@pytest.mark.parametrize("origin, host", [
    ("http://evil.example", "127.0.0.1:7860"),
    ("http://127.0.0.1:9999", "127.0.0.1:7860"),  # another local app is another site
    ("http://localhost:7860", "127.0.0.1:7860"),
    ("null", "127.0.0.1:7860"),  # a sandboxed frame or a local file
    ("not a url", "127.0.0.1:7860"),
    ("http://evil.example", None),
])
def test_other_origins_are_refused(origin, host):
    assert not Access().origin_allowed(origin, host)


def test_a_public_share_link_checks_nothing():
    public = Access(public=True)
    assert public.refusal({"host": "abc.gradio.live", "origin": "http://evil.example"}) is None


def test_a_proxy_and_the_users_allowances():
    assert Access().origin_allowed("https://sd.example.org", "127.0.0.1:7860", forwarded_host="sd.example.org")
    assert Access(origins=("https://sd.example.org",)).origin_allowed("https://sd.example.org", "127.0.0.1:7860")
    pattern = Access(origin_pattern=r"https://.*\.example\.org")
    assert pattern.origin_allowed("https://a.example.org", "127.0.0.1:7860")
    assert not pattern.origin_allowed("https://a.example.org.evil.example", "127.0.0.1:7860")


def test_refusals_are_one_line_naming_the_caller():
    access = Access(allow_hint="start the app with --allow-origin ORIGIN")
    said = access.refusal({"host": "127.0.0.1:7860", "origin": "http://evil.example"})
    assert "http://evil.example" in said and "--allow-origin" in said and "\n" not in said
    said = access.refusal({"host": "evil.example:7860", "origin": "http://evil.example:7860"})
    assert "evil.example:7860" in said and "not this machine's address" in said
    assert access.refusal({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}) is None
    assert access.refusal({}) is None
