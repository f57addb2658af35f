"""The web dashboard in a real browser, and the API route it added (a VM's queue).

Headless Chromium (Debian's ``chromium`` package, no browser download) driven by playwright,
against the HTTP API served over the session's cluster: real Redis, real Celery workers t1
and t2 on libvirt's test driver; and once against 'vmorch up' with embedded QEMU. With
VMORCH_UPDATE_SCREENSHOTS=1, the screenshots of the main pages replace ``docs/screenshots/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import localcluster
from orchestrator.control.locks import LockManager, vm_lock
from orchestrator.model.errors import NotFound
from orchestrator.model.operation import Op
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .apiserver import ApiServer
from .conftest import PYTHON, ROOT, ops, wait_until
from .test_localcluster import _qemu_pids
from .test_schedule import scheduler

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "docs" / "screenshots"
#: how long the page may take to show a change (its long polls answer within 2 s)
UI_TIMEOUT_MS = 20_000
#: a software-emulated QEMU guest on a loaded machine
QEMU_TIMEOUT_MS = 60_000

needs_browser = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                   reason="no chromium: install Debian's 'chromium' package (scripts/install.sh)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: install Debian's 'chromium' package (scripts/install.sh)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is a dev dependency: pip install -e '.[dev]'")
    sync_api.expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def new_page(browser: Any, api: ApiServer) -> Any:
    """A fresh tab (its own sessionStorage) with the dashboard's sign-in page open."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # refused API calls (401/403) are logged by the browser too; a policy violation is a bug
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)
    page.errors = errors
    page.goto(api.url + "/")  # redirected to /ui/
    return page


def sign_in(page: Any, secret: str) -> None:
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", secret)
    page.click("#login button[type=submit]")
    expect(page.locator("#whoami")).to_be_visible()


def shot(page: Any, name: str) -> None:
    """A screenshot for the README; taken always (it must not fail), kept only when asked for,
    so that a test run leaves the tree clean: VMORCH_UPDATE_SCREENSHOTS=1 pytest tests/test_dashboard.py."""
    png = page.screenshot(full_page=True)
    assert png.startswith(b"\x89PNG")
    if os.environ.get("VMORCH_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / f"{name}.png").write_bytes(png)


def mark_no_reload(page: Any) -> None:
    page.evaluate("window.__sameDocument = true")


def assert_not_reloaded(page: Any) -> None:
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"


def api_post(page: Any, path: str, body: object = None) -> int:
    """POST to the API from the page, with the page's own token: what a user could do by hand."""
    return int(page.evaluate(
        """async ([path, body]) => (await fetch(path, {method: 'POST',
             headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('vmorch.token'),
                       'Content-Type': 'application/json'},
             body: JSON.stringify(body)})).status""", [path, body]))


@needs_browser
def test_dashboard_launch_watch_act_and_read_only(browser: Any, api_server: ApiServer, client: RedisClient,
                                                  settings: Settings, base_settings: Settings) -> None:
    ns = settings.namespace
    operator = api_server.token(f"{ns}-operator", "operate", [ns])
    reader = api_server.token(f"{ns}-reader", "read", [ns])
    page = new_page(browser, api_server)
    assert page.url.endswith("/ui/")

    # Signed in: both hosts up, with capacity bars.
    sign_in(page, operator)
    expect(page.locator("#whoami")).to_have_text(f"{ns}-operator · operate")
    for host in ("t1", "t2"):
        row = page.locator(f'#hosts tr[data-host="{host}"]')
        expect(row.locator(".badge")).to_have_text("up")
        expect(row.locator(".bar")).to_have_count(2)

    # Launch from the page: the created jobs show, and reach succeeded without a reload.
    page.click('nav a[data-page="vms"]')
    mark_no_reload(page)
    page.fill('#launch input[name="name"]', "web[1-3]")
    page.fill('#launch input[name="memory_mib"]', "32")
    page.fill('#launch input[name="tags"]', "role=web, tier=front")
    page.click("#launch button[type=submit]")
    created = page.locator(".created-job")
    expect(created).to_have_count(3)
    for i in range(3):
        expect(created.nth(i).locator(".badge")).to_have_text("succeeded")
    expect(page.locator('#vms tr[data-vm="web2"] .badge')).to_have_text("running")
    assert_not_reloaded(page)
    # a filter narrows the list in place
    page.fill('#vm-filters input[name="name"]', "web3")
    expect(page.locator("#vms tr[data-vm]")).to_have_count(1)
    page.fill('#vm-filters input[name="name"]', "")
    page.fill('#vm-filters input[name="tag"]', "tier=back")
    expect(page.locator("#vms tr[data-vm]")).to_have_count(0)
    page.fill('#vm-filters input[name="tag"]', "role=web")
    expect(page.locator("#vms tr[data-vm]")).to_have_count(3)
    page.select_option('#vm-filters select[name="state"]', "paused")
    expect(page.locator("#vms tr[data-vm]")).to_have_count(0)
    page.select_option('#vm-filters select[name="state"]', "")
    page.fill('#vm-filters input[name="tag"]', "")
    page.click('nav a[data-page="hosts"]')
    expect(page.locator('#hosts tr[data-host="t1"] .bar').first).to_be_visible()
    shot(page, "hosts")
    page.click('nav a[data-page="vms"]')
    expect(page.locator("#vms tr[data-vm]")).to_have_count(3)
    shot(page, "vms")

    # The jobs list follows a job submitted elsewhere (here: straight through the API) by itself.
    page.click('nav a[data-page="jobs"]')
    expect(page.locator("#jobs tr[data-job]")).to_have_count(4)  # the three launches and their parent job
    mark_no_reload(page)
    with api_server.http(operator) as http:
        [paused] = http.post(f"/api/v1/namespaces/{ns}/vms/web2/pause").json()
    row = page.locator(f'#jobs tr[data-job="{paused["id"]}"]')
    expect(row.locator(".badge")).to_have_text("succeeded")
    assert_not_reloaded(page)
    shot(page, "jobs")
    page.select_option('#job-filters select[name="state"]', "failed")
    expect(page.locator("#jobs tr[data-job]")).to_have_count(0)
    page.select_option('#job-filters select[name="state"]', "")
    page.select_option('#job-filters select[name="op"]', "pause")
    expect(page.locator("#jobs tr[data-job]")).to_have_count(1)
    page.select_option('#job-filters select[name="op"]', "")
    expect(page.locator("#jobs tr[data-job]")).to_have_count(5)
    ro = new_page(browser, api_server)  # a read token, used below
    sign_in(ro, reader)

    # The VM page: actions queue behind a held VM lock; the page shows the queue and the holder.
    page.click('#jobs a[href="#/vms/web1"]')
    expect(page.locator("#actions button.action")).to_have_count(8)
    holder = LockManager(base_settings.resolved_redis_url(), owner="test-holder", expire=4)
    try:
        with holder.hold(vm_lock(ns, "web1"), timeout=5):
            page.click('#actions button[data-op="pause"]')
            page.once("dialog", lambda d: d.accept("before-upgrade"))
            page.click('#actions button[data-op="snapshot"]')
            expect(page.locator(".created-job")).to_have_count(2)
            expect(page.locator("#queue tr[data-job]")).to_have_count(2)
            expect(page.locator("#queue tr[data-job] .badge").first).to_have_text("waiting")
            expect(page.get_by_text("held by test-holder")).to_be_visible()
            shot(page, "vm")
            # the waiting snapshot's page says what it waits for and who holds it
            page.click(".created-job >> nth=0")
            expect(page.locator("#lock")).to_contain_text("held by test-holder")
            expect(page.locator('#timeline li[data-step="waiting"]')).to_have_class("now")
            expect(page.locator('#job-actions button[data-op="cancel"]')).to_be_visible()
            ro.goto(page.url)  # the same waiting job: no cancel for a read token
            expect(ro.locator('#timeline li[data-step="waiting"]')).to_have_class("now")
            assert ro.locator("button.action").count() == 0
            mark_no_reload(page)
            shot(page, "job")
        # released: the job page follows the job to its end by itself
        expect(page.locator('#timeline li[data-step="final"] b')).to_have_text("succeeded")
        assert_not_reloaded(page)
        expect(page.locator("#lock")).to_contain_text("It waited behind")
    finally:
        holder.close()
    page.click("h1 a")  # back to the VM
    expect(page.locator(".chip.snapshot")).to_have_text("before-upgrade")
    expect(page.locator(".chip", has_text="role=web")).to_be_visible()

    # A destructive action asks first: dismissed, nothing is sent; accepted, the job runs.
    before = len(client.jobs(ns, limit=1000))
    page.once("dialog", lambda d: d.dismiss())
    page.click('#actions button[data-op="kill"]')
    time.sleep(0.5)
    assert len(client.jobs(ns, limit=1000)) == before
    page.once("dialog", lambda d: d.accept())
    page.click('#actions button[data-op="kill"]')
    expect(page.locator(".created-job").first).to_contain_text("kill web1")
    expect(page.locator(".created-job .badge").first).to_have_text("succeeded")
    expect(page.locator("h1 .badge")).to_have_text("shutoff")
    assert not page.errors, page.errors

    # A read token: everything visible, no action offered, and the API refuses to act.
    expect(ro.locator("#whoami")).to_have_text(f"{ns}-reader · read")
    ro.click('nav a[data-page="vms"]')
    expect(ro.locator("#vms tr[data-vm]")).to_have_count(3)
    assert ro.locator("#launch").count() == 0
    ro.click('#vms a[href="#/vms/web2"]')
    expect(ro.locator("#history tr").first).to_be_visible()
    assert ro.locator("button.action").count() == 0
    ro.goto(f"{api_server.url}/ui/#/jobs/{paused['id']}")
    expect(ro.locator('#timeline li[data-step="final"] b')).to_have_text("succeeded")
    assert ro.locator("button.action").count() == 0
    jobs_before = len(client.jobs(ns, limit=1000))
    assert api_post(ro, f"/api/v1/namespaces/{ns}/vms/web2/stop", {"force": True}) == 403
    assert api_post(ro, f"/api/v1/jobs/{paused['id']}/cancel") == 403
    with api_server.http(reader) as http:
        assert http.post(f"/api/v1/namespaces/{ns}/vms/web2/kill").status_code == 403
    assert len(client.jobs(ns, limit=1000)) == jobs_before
    assert not ro.errors, ro.errors
    page.context.close()
    ro.context.close()


@needs_browser
def test_a_parent_jobs_page_lists_its_children_and_retries_the_failed_ones(
        browser: Any, api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    operator = api_server.token(f"{ns}-retrier", "operate", [ns])
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "pb[1-2]", memory_mib=16, disk_gib=0))])
    client.wait([j.id for j in client.submit(ops(Op.KILL, ns, "pb2"))])
    paused = client.submit(ops(Op.PAUSE, ns, "pb[1-2]"))  # pb2 is shut off: its pause fails
    parent = paused[0].parent
    assert parent is not None
    client.wait([parent], timeout=30)
    client.wait([j.id for j in client.submit(ops(Op.START, ns, "pb2"))])

    page = new_page(browser, api_server)
    sign_in(page, operator)
    page.evaluate(f"location.hash = '#/jobs/{parent}'")
    expect(page.locator("#job-children")).to_contain_text("pb1")
    expect(page.locator("#job-children")).to_contain_text("pb2")
    expect(page.locator("#job-children [data-state=failed]")).to_have_count(1)
    page.click("button[data-op=retry]")
    # not page.wait_for_function: its polling evaluates a string, which the page's CSP refuses (a flake)
    expect(page).to_have_url(re.compile(rf"#/jobs/(?!{parent}$)\d+$"))
    retried = int(page.evaluate("location.hash.split('/').pop()"))
    expect(page.locator("#job-children [data-state=succeeded]")).to_have_count(1)
    assert client.job(retried).retry_of == parent and client.job(retried).state is JobState.SUCCEEDED
    assert not page.errors, page.errors
    page.context.close()


DASH_EXPERIMENT = """\
name: dash-exp
vms:
  - name: ex[1-2]
    memory: 16
steps:
  - name: pause-ex
    op: pause
    target: ex[1-2]
  - name: resume-ex
    op: resume
    target: ex[1-2]
teardown: delete
"""


@needs_browser
def test_schedules_and_experiment_runs_pages(browser: Any, api_server: ApiServer, client: RedisClient,
                                             settings: Settings, base_settings: Settings, tmp_path: Path) -> None:
    ns = settings.namespace
    operator = api_server.token(f"{ns}-sched-op", "operate", [ns])
    reader = api_server.token(f"{ns}-sched-read", "read", [ns])
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "sv1", memory_mib=16, disk_gib=0))], timeout=30)
    base = f"/api/v1/namespaces/{ns}"
    tagger = {"name": "tagger", "every": "1s",
              "operations": [{"op": "tag", "target": "sv1", "params": {"set": {"seen": "yes"}}}]}
    nightly = {"name": "nightly", "cron": "0 2 * * *", "source": "examples/web-smoke.yaml",
               "experiment": (ROOT / "examples" / "web-smoke.yaml").read_text()}
    page = new_page(browser, api_server)
    ro = new_page(browser, api_server)
    try:
        with api_server.http(operator) as op_http, api_server.http(reader) as read_http:
            for body in (tagger, nightly):
                assert op_http.post(f"{base}/schedules", json=body).status_code == 201
            assert op_http.post(f"{base}/schedules/nightly/pause").json()["paused"] is True

            # The list: both schedules, when and what, next firing, paused or not, the last firing.
            with scheduler(settings, tmp_path / "scheduler.log"):
                sign_in(page, operator)
                page.click('nav a[data-page="schedules"]')
                row = page.locator('#schedules tr[data-schedule="tagger"]')
                expect(row).to_contain_text("every 1s")
                expect(row).to_contain_text("vm tag sv1")
                expect(row.locator('[data-col="state"] .badge')).to_have_text("active")
                expect(row.locator('[data-col="next"]')).to_contain_text("(in ")
                expect(row.locator('[data-col="last"] .badge')).to_have_text("fired")
                paused_row = page.locator('#schedules tr[data-schedule="nightly"]')
                expect(paused_row.locator('[data-col="state"] .badge')).to_have_text("paused")
                expect(paused_row).to_contain_text("experiment examples/web-smoke.yaml")
                expect(paused_row.locator('[data-col="last"]')).to_have_text("never")
                shot(page, "schedules")

                # Its page: the firings with their jobs' states, followed live.
                row.locator("a").click()
                mark_no_reload(page)
                firings = page.locator("#firings tr[data-slot]")
                expect(firings.nth(2)).to_be_visible()  # three firings and counting
                expect(firings.first.locator(".badge").first).to_have_text("fired")
                expect(page.locator("#firings .firing-jobs [data-state=succeeded]").first).to_be_visible()
                expect(page.locator('#firings .firing-jobs a[href^="#/jobs/"]').first).to_be_visible()
                assert_not_reloaded(page)
                shot(page, "schedule")

                # Pause from the page: the API says paused, and no next firing.
                page.click('#schedule-actions button[data-op="pause"]')
                expect(page.locator("h1 .badge")).to_have_text("paused")
                expect(page.locator('#schedule-spec [data-field="next"]')).to_have_text("paused")
                shown = read_http.get(f"{base}/schedules/tagger").json()
                assert shown["paused"] is True and shown["next_at"] is None
                last_slot = shown["last_slot"]  # no slot is claimed while paused
                # A read token sees the same page, with no button; the API refuses it anyway.
                ro_url = page.url
                sign_in(ro, reader)
                ro.goto(ro_url)
                expect(ro.locator("h1 .badge")).to_have_text("paused")
                expect(ro.locator("#firings tr[data-slot]").first).to_be_visible()
                assert ro.locator("#schedule-actions button").count() == 0
                assert api_post(ro, f"{base}/schedules/tagger/resume") == 403
                # Resume: it fires again, and the page shows the new firing.
                page.click('#schedule-actions button[data-op="resume"]')
                expect(page.locator("h1 .badge")).to_have_text("active")
                assert read_http.get(f"{base}/schedules/tagger").json()["paused"] is False
                newer: list[str] = []

                def fired_again() -> bool:
                    history = read_http.get(f"{base}/schedules/tagger", params={"history": 1}).json()["history"]
                    newer[:] = [f["slot"] for f in history if f["slot"] > last_slot]
                    return bool(newer)

                wait_until(fired_again, timeout=UI_TIMEOUT_MS / 1000, what="a firing after the resume")
                expect(page.locator(f'#firings tr[data-slot="{newer[0]}"]')).to_be_visible()
                assert_not_reloaded(page)
                # remove asks first
                page.once("dialog", lambda d: d.dismiss())
                page.click('#schedule-actions button[data-op="remove"]')
                assert op_http.get(f"{base}/schedules/tagger").status_code == 200
                page.goto(f"{api_server.url}/ui/#/schedules/nightly")
                page.once("dialog", lambda d: d.accept())
                page.click('#schedule-actions button[data-op="remove"]')
                expect(page.locator("#schedules tr[data-schedule]")).to_have_count(1)
                assert op_http.get(f"{base}/schedules/nightly").status_code == 404
                op_http.delete(f"{base}/schedules/tagger")

            # An experiment run: its steps in order, each step's job and progress, followed live
            # (ex2's launch waits behind its held VM lock, so the run is caught half way).
            page.click('nav a[data-page="experiments"]')
            expect(page.locator("#runs")).to_contain_text(f"No experiment run in namespace {ns}")
            holder = LockManager(base_settings.resolved_redis_url(), owner="test-holder", expire=4)
            try:
                with holder.hold(vm_lock(ns, "ex2"), timeout=5):
                    answer = op_http.post(f"{base}/experiments", json={"text": DASH_EXPERIMENT, "source": "dash.yaml"})
                    assert answer.status_code == 202, answer.text
                    run = answer.json()
                    row = page.locator(f'#runs tr[data-run="{run["id"]}"]')
                    expect(row.locator(".badge")).to_have_text("running")
                    row.locator(f'a[href="#/experiments/{run["id"]}"]').click()
                    mark_no_reload(page)
                    steps = page.locator("#steps tr[data-step]")
                    expect(steps).to_have_count(4)
                    assert [steps.nth(i).get_attribute("data-step") for i in range(4)] == \
                        ["launch", "pause-ex", "resume-ex", "teardown"]
                    assert [steps.nth(i).get_attribute("data-kind") for i in range(4)] == \
                        ["launch", "step", "step", "teardown"]
                    launch = page.locator('#steps tr[data-step="launch"]')
                    expect(launch.locator(".bar")).to_have_text("1 / 2")
                    expect(launch.locator(".badge")).to_have_text("running")
                    expect(page.locator('#steps tr[data-step="pause-ex"] .badge')).to_have_text("queued")
                    expect(page.locator("h1 .badge")).to_have_text("running")
                    shot(page, "experiment")
            finally:
                holder.close()
            for step in ("launch", "pause-ex", "resume-ex", "teardown"):
                expect(page.locator(f'#steps tr[data-step="{step}"] .badge')).to_have_text("succeeded")
                expect(page.locator(f'#steps tr[data-step="{step}"] .bar')).to_have_text("2 / 2")
            expect(page.locator("h1 .badge")).to_have_text("succeeded")
            assert_not_reloaded(page)
            launch_job = run["steps"][0]["job"]
            page.click(f'#steps a[href="#/jobs/{launch_job}"]')
            expect(page.locator("#job-children")).to_contain_text("ex2")
            page.click('nav a[data-page="experiments"]')
            expect(row.locator(".badge")).to_have_text("succeeded")
            expect(row).to_contain_text("dash.yaml")
            shot(page, "experiments")
            ro.click('nav a[data-page="experiments"]')
            expect(ro.locator(f'#runs tr[data-run="{run["id"]}"] .badge')).to_have_text("succeeded")
        assert not page.errors, page.errors
        assert not ro.errors, ro.errors
    finally:
        for name in ("tagger", "nightly"):
            with contextlib.suppress(NotFound):
                client.remove_schedule(ns, name)
        page.context.close()
        ro.context.close()


@needs_browser
def test_a_bad_token_stays_on_the_sign_in_page(browser: Any, api_server: ApiServer) -> None:
    page = new_page(browser, api_server)
    sign_in_form = page.locator("#login")
    page.fill("#token", "vmo_not-a-token")
    page.click("#login button[type=submit]")
    expect(sign_in_form.locator(".error")).to_contain_text("unknown or revoked API token")
    assert page.locator("#nav").is_hidden()
    assert page.evaluate("sessionStorage.getItem('vmorch.token')") is None
    page.context.close()


@needs_browser
def test_a_cluster_wide_token_picks_any_namespace(browser: Any, api_server: ApiServer) -> None:
    page = new_page(browser, api_server)
    sign_in(page, api_server.admin_token)
    page.click('nav a[data-page="vms"]')
    expect(page.locator("h1")).to_contain_text("VMs in default")  # the CLI's default, even if empty
    page.once("dialog", lambda d: d.accept("lab-7"))
    page.select_option("#ns-select", "")  # "other…"
    expect(page.locator("h1")).to_contain_text("VMs in lab-7")
    expect(page.locator("#vms")).to_contain_text("No VM in namespace lab-7.")
    expect(page.locator("#ns-select")).to_have_value("lab-7")
    assert not page.errors, page.errors
    page.context.close()


def test_the_dashboard_files_are_served_without_a_token(api_server: ApiServer) -> None:
    with api_server.http() as http:
        root = http.get("/")
        assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
        for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
            r = http.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
            assert "script-src 'self'" in r.headers["content-security-policy"]
        assert http.get("/ui/nothing.js").status_code == 404
        # the data stays behind the token
        assert http.get("/api/v1/hosts").status_code == 401


def test_vm_queue_lists_unfinished_jobs_in_order_and_the_lock_holder(
        api_server: ApiServer, client: RedisClient, settings: Settings, base_settings: Settings) -> None:
    ns = settings.namespace
    [launched] = client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "q1", memory_mib=16, disk_gib=0))])
    assert launched.state is JobState.SUCCEEDED
    reader = api_server.token(f"{ns}-q-read", "read", [ns])
    stranger = api_server.token(f"{ns}-q-other", "admin", [f"{ns}-other"])
    url = f"/api/v1/namespaces/{ns}/vms/q1/queue"
    holder = LockManager(base_settings.resolved_redis_url(), owner="test-holder", expire=4)
    with api_server.http(reader) as http:
        idle = http.get(url).json()
        assert idle == {"vm": "q1", "lock": vm_lock(ns, "q1").name, "holder": None, "jobs": []}
        try:
            with holder.hold(vm_lock(ns, "q1"), timeout=5):
                jobs = client.submit(ops(Op.PAUSE, ns, "q1") + ops(Op.RESUME, ns, "q1"))
                wait_until(lambda: client.job(jobs[0].id).state is JobState.WAITING, what="the pause to wait")
                queued = http.get(url).json()
                assert [j["id"] for j in queued["jobs"]] == [j.id for j in jobs]
                assert [j["seq"] for j in queued["jobs"]] == sorted(j["seq"] for j in queued["jobs"])
                assert queued["holder"].startswith("test-holder:")
        finally:
            holder.close()
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in jobs], timeout=30))
        assert http.get(url).json()["jobs"] == []
        # a VM that doesn't exist has an empty queue, as its job list is empty
        assert http.get(f"/api/v1/namespaces/{ns}/vms/nosuch/queue").json()["jobs"] == []
    with api_server.http(stranger) as http:
        assert http.get(url).status_code == 403
    with api_server.http() as http:
        assert http.get(url).status_code == 401


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home short enough for embedded QEMU's socket paths (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="vdash-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_browser
@pytest.mark.qemu
@pytest.mark.slow
def test_vmorch_up_then_a_qemu_vm_launched_from_the_page(browser: Any, short_home: Path) -> None:
    """The whole path a new user takes: 'vmorch up', open the printed address, sign in, launch."""
    home = short_home / "home"
    _uri, warning = localcluster.default_libvirt_uri(home, "host1")
    if warning:
        pytest.skip(warning)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMORCH_")} | {"VMORCH_HOME": str(home)}
    settings = Settings(home=home)
    try:
        up = subprocess.run([PYTHON, "-m", "cli", "up", "--hosts", "2", "--detach"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        api_url = json.loads((home / "cluster.json").read_text())["api_url"]
        assert f"dashboard: {api_url}/ui/" in up.stdout
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.goto(f"{api_url}/ui/")
        sign_in(page, (home / "token").read_text().strip())
        for host in ("host1", "host2"):
            expect(page.locator(f'#hosts tr[data-host="{host}"] .badge')).to_have_text("up")
        assert "qemu:///embed" in page.locator('#hosts tr[data-host="host1"]').inner_text()

        page.click('nav a[data-page="vms"]')
        expect(page.locator("h1")).to_contain_text("VMs in default")
        mark_no_reload(page)
        page.fill('#launch input[name="name"]', "q1")
        page.fill('#launch input[name="memory_mib"]', "32")
        page.click("#launch button[type=submit]")
        expect(page.locator(".created-job .badge")).to_have_text("succeeded", timeout=QEMU_TIMEOUT_MS)
        expect(page.locator('#vms tr[data-vm="q1"] .badge')).to_have_text("running")
        assert_not_reloaded(page)
        assert len(_qemu_pids(home.resolve())) == 1

        page.click('#vms a[href="#/vms/q1"]')
        page.once("dialog", lambda d: d.accept())
        page.click('#actions button[data-op="delete"]')
        expect(page.locator(".created-job .badge")).to_have_text("succeeded", timeout=QEMU_TIMEOUT_MS)
        wait_until(lambda: not _qemu_pids(home.resolve()), timeout=20, what="QEMU to exit")
        context.close()
        down = subprocess.run([PYTHON, "-m", "cli", "down"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
    finally:
        localcluster.down(settings, on_event=lambda _line: None)
        for pid in _qemu_pids(home.resolve()):  # only ever this test's own guests
            os.kill(pid, signal.SIGKILL)
