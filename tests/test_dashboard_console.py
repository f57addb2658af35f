"""A VM's live console: the API's WebSocket (``orchestrator/edge/api/consolesocket.py``) and the
dashboard's console view on it.

The WebSocket's rules without a browser, on the session's cluster (libvirt's test driver: a VM
whose console stream the test writes itself); then the dashboard in headless Chromium against a
real guest under QEMU (TCG): its boot and a typed command's output show, and a second, read-only
viewer sees the same output while its keys go nowhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from orchestrator.edge.api import consolesocket
from orchestrator.model.operation import Op
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .apiserver import ApiServer, serve
from .conftest import ROOT, ops, wait_until
from .guestvm import BOOT_MARKER, GuestCluster, guest_cluster
from .test_dashboard import browser, expect, needs_browser, new_page, shot, sign_in  # noqa: F401  (browser: a fixture)

#: how long one message may take to come (a loaded 2-core machine)
RECV_S = 20.0


def ws_url(api: ApiServer, ns: str, vm: str, query: str = "") -> str:
    return f"{api.url.replace('http://', 'ws://', 1)}/api/v1/namespaces/{ns}/vms/{vm}/console/ws{query}"


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    """The test's sockets, closed at its end whatever happens."""
    with ExitStack() as opened:
        yield opened


def open_ws(sockets: ExitStack, api: ApiServer, ns: str, vm: str, query: str = "") -> ClientConnection:
    return sockets.enter_context(connect(ws_url(api, ns, vm, query), open_timeout=RECV_S, close_timeout=5,
                                         proxy=None))


def recv(ws: ClientConnection) -> dict[str, Any]:
    message = json.loads(ws.recv(timeout=RECV_S))
    assert isinstance(message, dict)
    return message


def hello(ws: ClientConnection, token: str | None, **more: object) -> dict[str, Any]:
    """Send the first message; the server's ``ready``."""
    ws.send(json.dumps({"token": token, **more}))
    ready = recv(ws)
    assert ready["type"] == "ready", ready
    return ready


def refused(ws: ClientConnection, first: str | None) -> tuple[int, str, dict[str, Any]]:
    """Send ``first`` (if any); the refusal's close code, its reason and the error message before it."""
    if first is not None:
        ws.send(first)
    error = recv(ws)
    assert error["type"] == "error", error
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=RECV_S)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason, error["error"]


def output_until(ws: ClientConnection, text: str) -> str:
    """Output messages until ``text`` has shown; everything they held."""
    seen = ""
    while text not in seen:
        message = recv(ws)
        assert message["type"] == "output", message
        seen += message["data"]
    return seen


def test_the_console_socket_refuses_without_a_good_token_or_outside_the_tokens_namespaces(
        api_server: ApiServer, client: RedisClient, settings: Settings, sockets: ExitStack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "w1", memory_mib=16, disk_gib=0))])
    other = api_server.token(f"{ns}-ws-other", "admin", [f"{ns}-other"])
    reader = api_server.token(f"{ns}-ws-read", "read", [ns])

    # No token, a malformed first message, an unknown token: 4401, and nothing else is looked at
    # (the VM's name is not even checked).
    for first in (json.dumps({}), json.dumps({"token": None}), "not json", json.dumps({"token": "vmo_nope"})):
        code, reason, error = refused(open_ws(sockets, api_server, ns, "-x-"), first)
        assert code == 4401 and error["code"] == "unauthorized", (first, code, error)
        assert reason in ("missing API token", "unknown or revoked API token")
        assert "first message" in error["hint"]
    # ... nor a token in the query string, where access logs would keep it
    code, _, _ = refused(open_ws(sockets, api_server, ns, "w1", f"?token={reader}"), json.dumps({}))
    assert code == 4401
    code, reason, _ = refused(open_ws(sockets, api_server, ns, "w1", f"?token={reader}"), json.dumps({"token": reader}))
    assert code == 4422 and reason == "this route takes no query parameters"
    # no first message at all: refused after a while, not held open
    monkeypatch.setattr(consolesocket, "HELLO_TIMEOUT_S", 0.5)
    code, reason, _ = refused(open_ws(sockets, api_server, ns, "w1"), None)
    assert code == 4401 and reason.startswith("no first message within")
    monkeypatch.undo()

    # A good token of another namespace: 4403, whether or not the VM exists there.
    for vm in ("w1", "nosuch"):
        code, reason, error = refused(open_ws(sockets, api_server, ns, vm), json.dumps({"token": other}))
        assert code == 4403 and error["code"] == "forbidden" and f"namespace {ns!r}" in reason
    # Within its namespaces: a VM that doesn't exist, a bad name, a bad first message.
    code, _, error = refused(open_ws(sockets, api_server, ns, "nosuch"), json.dumps({"token": reader}))
    assert code == 4404 and error["code"] == "not_found"
    code, reason, _ = refused(open_ws(sockets, api_server, ns, "-bad-"), json.dumps({"token": reader}))
    assert code == 4422 and reason.startswith("invalid VM name")
    code, reason, _ = refused(open_ws(sockets, api_server, "Bad_NS", "w1"), json.dumps({"token": reader}))
    assert code == 4422 and reason.startswith("invalid namespace")
    code, reason, _ = refused(open_ws(sockets, api_server, ns, "w1"), json.dumps({"token": reader, "lines": -1}))
    assert code == 4422 and reason.startswith("first message: lines:")
    code, reason, _ = refused(open_ws(sockets, api_server, ns, "w1"), json.dumps({"token": reader, "tail": 5}))
    assert code == 4422 and reason.startswith("first message: tail:")
    # Bad input after the start: a clean close with the reason, never a traceback.
    for bad in ("{", json.dumps({"type": "rm -rf"}), json.dumps({"type": "input", "data": "x" * (70 * 1024)}),
                json.dumps({"type": "input", "data": "\x00" * (70 * 1024)})):
        ws = open_ws(sockets, api_server, ns, "w1")
        hello(ws, reader)
        code, reason, error = refused(ws, bad)
        assert code == 4422 and reason.startswith("message: ") and error["code"] == "invalid_input", (bad, reason)
    ws = open_ws(sockets, api_server, ns, "w1")
    hello(ws, reader)
    ws.send(b"\x00binary")
    code, reason, _ = refused(ws, None)
    assert code == 4422 and reason == "message: a binary message"


def test_the_console_socket_streams_output_and_takes_one_writers_input(
        api_server: ApiServer, client: RedisClient, settings: Settings, redis: Redis,
        sockets: ExitStack) -> None:
    ns = settings.namespace
    [launched] = client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "w2", memory_mib=16, disk_gib=0))])
    assert launched.state is JobState.SUCCEEDED
    operator = api_server.token(f"{ns}-ws-op", "operate", [ns])
    reader = api_server.token(f"{ns}-ws-reader", "read", [ns])
    stream, inbox, lease = keys.vm_console(ns, "w2"), keys.vm_console_input(ns, "w2"), keys.vm_console_writer(ns, "w2")
    for line in ("boot 1\r\n", "boot 2\r\n", "login# "):
        redis.xadd(stream, {"d": line, "o": "0", "f": "t:1"})

    # The operator types: the last lines first, the writer lease held by its session.
    op_ws = open_ws(sockets, api_server, ns, "w2")
    ready = hello(op_ws, operator, lines=1)
    assert ready["writer"] is True and ready["why"] is None and redis.get(lease) == ready["holder"]
    assert ready["holder"].startswith(f"{ns}-ws-op-")
    assert output_until(op_ws, "login# ") == "login# "  # lines=1: the last (unfinished) line only
    # A reader watches: everything, and the reason it can't type.
    ro_ws = open_ws(sockets, api_server, ns, "w2")
    ready = hello(ro_ws, reader)
    assert ready["writer"] is False and "has role read" in ready["why"]
    assert output_until(ro_ws, "login# ") == "boot 1\r\nboot 2\r\nlogin# "
    # A second operator: read-only while the first holds the lease, told who holds it.
    op2_ws = open_ws(sockets, api_server, ns, "w2")
    ready2 = hello(op2_ws, operator)
    assert ready2["writer"] is False and ready2["holder"] == redis.get(lease) and "is typing" in ready2["why"]
    output_until(op2_ws, "login# ")

    # Input: the writer's is queued for the VM's host; a read-only session's is dropped, and it is told.
    op_ws.send(json.dumps({"type": "input", "data": "ls\r"}))
    for ws in (ro_ws, op2_ws):
        ws.send(json.dumps({"type": "input", "data": "rm -rf /\r"}))
        answer = recv(ws)
        assert answer["type"] == "mode" and answer["writer"] is False and answer["dropped"] == len("rm -rf /\r")
    wait_until(lambda: redis.lrange(inbox, 0, -1) == ["ls\r"], timeout=RECV_S, what="the writer's input queued")
    # claiming is refused to a read token, and to anyone while the lease is held
    for ws in (ro_ws, op2_ws):
        ws.send(json.dumps({"type": "claim"}))
        assert recv(ws)["writer"] is False
    # What the guest prints reaches every viewer as it comes.
    redis.xadd(stream, {"d": "ls\r\nbin etc\r\n", "o": "0", "f": "t:1"})
    for ws in (op_ws, ro_ws, op2_ws):
        assert "bin etc" in output_until(ws, "bin etc")
    assert redis.lrange(inbox, 0, -1) == ["ls\r"]

    # The writer leaves: its lease is given back at once, and the other operator takes it.
    op_ws.close()
    wait_until(lambda: redis.get(lease) is None, timeout=RECV_S, what="the lease given back")
    op2_ws.send(json.dumps({"type": "claim"}))
    mode = recv(op2_ws)
    assert mode["type"] == "mode" and mode["writer"] is True and redis.get(lease) == mode["holder"]
    op2_ws.send(json.dumps({"type": "input", "data": "pwd\r"}))
    wait_until(lambda: redis.lrange(inbox, 0, -1) == ["ls\r", "pwd\r"], timeout=RECV_S, what="the new writer's input")
    op2_ws.send(json.dumps({"type": "release"}))
    mode = recv(op2_ws)
    assert mode["writer"] is False and redis.get(lease) is None
    # Asked for read-only: it never takes the lease.
    ws = open_ws(sockets, api_server, ns, "w2")
    ready = hello(ws, operator, read_only=True)
    assert ready["writer"] is False and ready["why"] == "read-only, as asked" and redis.get(lease) is None
    # A revoked token's sockets close (it is looked up again every few seconds).
    output_until(ws, "bin etc")
    api_server.revoke(f"{ns}-ws-reader")
    code, reason, _ = refused(ro_ws, None)
    assert code == 4401 and reason == "the API token was revoked"


VENDOR = ROOT / "orchestrator" / "edge" / "dashboard" / "static" / "vendor"


def test_xterm_is_vendored_as_its_readme_says_and_served_from_the_dashboard(api_server: ApiServer) -> None:
    """The files are npm's own (the checksums in vendor/README.md), and nothing is fetched from elsewhere."""
    readme = (VENDOR / "README.md").read_text()
    sums = dict(reversed(line.split()) for line in readme.split("```")[1].strip().splitlines())
    assert set(sums) == {"xterm.mjs", "xterm.css", "xterm.LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} differs from npm's"
    assert "| 6.0.0 |" in readme and "Permission is hereby granted" in (VENDOR / "xterm.LICENSE").read_text()
    pages = "".join((VENDOR.parent / f).read_text() for f in ("index.html", "app.js", "style.css"))
    elsewhere = re.search(r"(src|href|import\(|url\()\s*=?\s*[\"']?(https?:)?//", pages)
    assert elsewhere is None, f"loaded from elsewhere: {elsewhere}"
    with api_server.http() as http:
        for path, kind in (("/ui/vendor/xterm.mjs", "javascript"), ("/ui/vendor/xterm.css", "text/css")):
            r = http.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
            assert "script-src 'self'" in r.headers["content-security-policy"]
        assert 'href="vendor/xterm.css"' in http.get("/ui/").text


# -- the dashboard against a real guest ----------------------------------------------------------

VM = "dc1"
IMAGE = f"dcimg{os.getpid() % 10000}"
#: a software-emulated guest booting on a loaded 2-core machine
BOOT_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def booted(base_settings: Settings, guest_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[GuestCluster]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with guest_cluster(base_settings, tmp_path_factory.mktemp("dconsole"), f"dcon{os.getpid() % 10000}",
                       {"dch1": {"VMORCH_ACCEL": "tcg"}}) as cluster:
        cluster.import_image(IMAGE, guest_image)
        cluster.launch(VM, host="dch1", image=IMAGE)
        cluster.wait_console(VM, BOOT_MARKER, timeout=BOOT_TIMEOUT_S)
        cluster.wait_console(VM, f"{VM}# ", timeout=BOOT_TIMEOUT_S)  # the root shell on ttyS0
        yield cluster


@pytest.fixture(scope="module")
def guest_api(base_settings: Settings) -> Iterator[ApiServer]:
    with serve(base_settings, name=f"dconsole-admin-{os.getpid()}") as server:
        yield server


def screen_text(page: Any) -> str:
    """What the terminal shows (xterm's DOM renderer writes spaces as no-break spaces)."""
    return str(page.locator("#console .xterm-rows").inner_text()).replace("\xa0", " ")


def wait_screen(page: Any, text: str, cluster: GuestCluster, timeout: float = 60.0) -> None:
    try:
        wait_until(lambda: text in screen_text(page), timeout=timeout, interval=0.2, what=f"{text!r} on the page")
    except AssertionError as exc:
        inbox = cluster.redis.lrange(keys.vm_console_input(cluster.namespace, VM), 0, -1)
        raise AssertionError(f"{exc}; the page shows:\n{screen_text(page)}\nthe console stream ends with:\n"
                             f"{cluster.console_text(VM)[-1500:]!r}\nunread input: {inbox!r}") from None


@needs_browser
@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(400)  # the module's guest boots within it (pytest-timeout counts fixtures' setup)
def test_the_console_view_shows_the_guest_and_types_for_one_writer_only(
        browser: Any, booted: GuestCluster, guest_api: ApiServer) -> None:  # noqa: F811
    ns = booted.namespace
    operator = guest_api.token(f"{ns}-dash-op", "operate", [ns])
    operator2 = guest_api.token(f"{ns}-dash-op2", "operate", [ns])
    reader = guest_api.token(f"{ns}-dash-read", "read", [ns])
    lease = keys.vm_console_writer(ns, VM)
    wait_until(lambda: not booted.redis.get(lease), timeout=20, what="the console's writer lease to be free")
    page = new_page(browser, guest_api)
    ro = new_page(browser, guest_api)
    waiting = new_page(browser, guest_api)
    try:
        # The VM page links to its console; the console shows the boot, read-write for an operator.
        sign_in(page, operator)
        page.evaluate(f"location.hash = '#/vms/{VM}'")
        page.click('#vm-tabs a[data-tab="console"]')
        mode = page.locator("#console-mode")
        expect(mode).to_have_attribute("data-mode", "read-write")
        expect(page.locator("#console .xterm-rows")).to_contain_text(f"{VM}#")
        assert booted.redis.get(lease), "the page holds the writer lease"

        # A command typed on the page runs in the guest: its output shows (not just its echo).
        word = f"hello-{secrets.randbelow(10**9)}"
        page.locator("#console").click()
        page.keyboard.type(f"echo {word} | tr a-z A-Z\n")
        wait_screen(page, word.upper(), booted)
        assert word.upper() in booted.console_text(VM)
        shot(page, "console")

        # A read token's viewer sees the same output live, and its keys go nowhere.
        sign_in(ro, reader)
        ro.evaluate(f"location.hash = '#/vms/{VM}/console'")
        expect(ro.locator("#console-mode")).to_have_attribute("data-mode", "read-only")
        expect(ro.locator("#console-mode")).to_contain_text("has role read")
        assert ro.locator("#console-take").is_hidden()
        wait_screen(ro, word.upper(), booted)
        # ... and so does a second operator's while the first types (one writer at a time)
        sign_in(waiting, operator2)
        waiting.evaluate(f"location.hash = '#/vms/{VM}/console'")
        expect(waiting.locator("#console-mode")).to_have_attribute("data-mode", "read-only")
        expect(waiting.locator("#console-mode")).to_contain_text("is typing")
        expect(waiting.locator("#console-take")).to_be_visible()
        ignored = f"ignored-{secrets.randbelow(10**9)}"
        for viewer in (ro, waiting):
            viewer.locator("#console").click()
            viewer.keyboard.type(f"echo {ignored}\n")
        later = f"later-{secrets.randbelow(10**9)}"
        page.locator("#console").click()
        page.keyboard.type(f"echo {later} | tr a-z A-Z\n")
        for viewer in (page, ro, waiting):
            wait_screen(viewer, later.upper(), booted)
        # typed before 'later' (input is ordered): had it been sent, the guest would have echoed it by now
        assert ignored not in booted.console_text(VM)

        # The writer leaves the page: its lease goes back, and the waiting operator takes the keyboard.
        page.evaluate("location.hash = '#/vms'")
        wait_until(lambda: not booted.redis.get(lease), timeout=20, what="the writer lease given back")
        waiting.click("#console-take")
        expect(waiting.locator("#console-mode")).to_have_attribute("data-mode", "read-write")
        third = f"third-{secrets.randbelow(10**9)}"
        waiting.locator("#console").click()
        waiting.keyboard.type(f"echo {third} | tr a-z A-Z\n")
        wait_screen(ro, third.upper(), booted)
        for viewer in (page, ro, waiting):
            assert not viewer.errors, viewer.errors
    finally:
        for viewer in (page, ro, waiting):
            viewer.context.close()
