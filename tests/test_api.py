"""The HTTP API's own behaviour: 202 + Location, error bodies, validation, paging, long polls, OpenAPI."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from redis import Redis

from orchestrator.edge.api import create_app
from orchestrator.edge.httpclient import HttpClient
from orchestrator.model.operation import Op, SubmitOptions
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from worker import domxml

from .apiserver import ApiServer, running
from .conftest import ops, wait_until

HOSTILE = "a<b>&c\"d'e]]>f<![CDATA[g]]></vmorch:tag><vmorch:fence>999</vmorch:fence>&amp;"


def _launch(ns: str, vm: str, **params: object) -> dict[str, object]:
    return {"operations": [{"op": "launch", "namespace": ns, "vm": vm, "params": {"memory_mib": 16, "disk_gib": 0,
                                                                                  **params}}]}


def test_mutations_answer_202_with_location_and_jobs_are_followed_to_the_end(
        api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    with api_server.http(api_server.admin_token) as http:
        r = http.post("/api/v1/jobs", json=_launch(ns, "w1"))
        assert r.status_code == 202, r.text
        [job] = r.json()
        assert r.headers["location"] == f"/api/v1/jobs/{job['id']}" and job["state"] in ("queued", "waiting",
                                                                                          "running", "succeeded")
        assert http.get(r.headers["location"]).json()["id"] == job["id"]
        done = http.get(f"/api/v1/jobs/{job['id']}/wait", params={"timeout": 20}).json()
        assert done["state"] == "succeeded" and done["finished_at"].endswith("Z")
        # a range through the per-VM route: brackets URL-encoded
        r = http.post(f"/api/v1/namespaces/{ns}/vms/{quote('w[2-3]', safe='')}/launch",
                      json={"memory_mib": 16, "disk_gib": 0})
        assert r.status_code == 202 and [j["vm"] for j in r.json()] == ["w2", "w3"]
        ids = [j["id"] for j in r.json()]
        waited = http.get("/api/v1/jobs/wait", params={"ids": ids, "timeout": 20}).json()
        assert [j["state"] for j in waited] == ["succeeded", "succeeded"]
        r = http.post(f"/api/v1/namespaces/{ns}/vms/w1/stop", json={"force": True, "timeout_s": 5})
        assert r.status_code == 202 and r.json()[0]["params"] == {"force": True, "timeout_s": 5.0,
                                                                  "force_after_timeout": False}
        vm = http.get(f"/api/v1/namespaces/{ns}/vms/w1").json()
        assert vm["name"] == "w1" and vm["memory_mib"] == 16
        assert [v["name"] for v in http.get(f"/api/v1/namespaces/{ns}/vms").json()] == ["w1", "w2", "w3"]


def test_errors_have_one_shape_and_the_right_status(api_server: ApiServer, client: RedisClient,
                                                   settings: Settings, redis: Redis) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "e1", memory_mib=16, disk_gib=0))])
    before = redis.get(keys.JOB_NEXT)
    [launch_d1] = _launch(ns, "d1")["operations"]  # type: ignore[index]
    cases: list[tuple[str, str, object, int, str, str | None]] = [
        ("POST", f"/api/v1/namespaces/{ns}/vms/nosuch/pause", None, 404, "not_found", None),
        ("GET", f"/api/v1/namespaces/{ns}/vms/nosuch", None, 404, "not_found", None),
        ("GET", "/api/v1/jobs/999999999", None, 404, "not_found", None),
        ("POST", "/api/v1/jobs", _launch(ns, "e1"), 409, "already_exists", None),
        ("POST", "/api/v1/jobs", _launch(ns, "huge", memory_mib=4 * 1024 * 1024), 409, "no_capacity", None),
        ("POST", "/api/v1/jobs", _launch(ns, "bad.name"), 422, "invalid_input", "body.operations.0.vm"),
        ("POST", "/api/v1/jobs", _launch(ns, "neg", memory_mib=-5), 422, "invalid_input",
         "body.operations.0.memory_mib"),
        ("POST", "/api/v1/jobs", _launch(ns, "h", host="atlantis"), 422, "invalid_input", None),
        ("POST", "/api/v1/jobs", _launch(ns, "t", tags={"k<": "v"}), 422, "invalid_input", "body.operations.0.tags"),
        ("POST", "/api/v1/jobs", {"operations": []}, 422, "invalid_input", "body.operations"),
        # found by the fuzzer: a name twice in one batch left its first launch accepted and never sent
        ("POST", "/api/v1/jobs", {"operations": [launch_d1, launch_d1]}, 422, "invalid_input", None),
        ("POST", "/api/v1/jobs", {"operations": [launch_d1, {**launch_d1, "namespace": f"{ns}-x"}]}, 422,
         "invalid_input", None),
        ("POST", "/api/v1/jobs", {"operations": [{"op": "frobnicate", "namespace": ns, "vm": "e1"}]}, 422,
         "invalid_input", "body.operations.0.op"),
        ("POST", "/api/v1/jobs", {"operations": [{"op": "pause", "namespace": ns, "vm": "e1", "x": 1}]}, 422,
         "invalid_input", "body.operations.0.x"),
        ("POST", "/api/v1/jobs", {"operations": [{"op": "move-in", "namespace": ns, "vm": "e1",
                                                  "params": {"source": "t1"}}]}, 422, "invalid_input", None),
        ("POST", f"/api/v1/namespaces/{ns}/vms/e1/set", {}, 422, "invalid_input", None),
        ("POST", f"/api/v1/namespaces/{ns}/vms/e1/set", {"vcpus": 0}, 422, "invalid_input", "body.vcpus"),
        ("POST", f"/api/v1/namespaces/{ns}/vms/{quote('r[3-1]', safe='')}/start", None, 422, "invalid_input", None),
        ("POST", f"/api/v1/namespaces/{ns}/vms/e1/frobnicate", None, 422, "invalid_input", "path.op"),
        ("GET", f"/api/v1/namespaces/{ns}/jobs?limit=0", None, 422, "invalid_input", "query.limit"),
        ("GET", f"/api/v1/namespaces/{ns}/jobs?state=bogus", None, 422, "invalid_input", "query.state"),
        ("GET", "/api/v1/namespaces/Bad_NS/vms", None, 422, "invalid_input", "path.ns"),
        ("GET", "/api/v1/jobs/0", None, 422, "invalid_input", "path.job_id"),
        ("POST", "/api/v1/plan", {"operations": [{"op": "pause", "namespace": ns, "vm": "e1"}]}, 422,
         "invalid_input", None),
        ("POST", "/api/v1/namespaces", {"name": ns}, 409, "already_exists", None),
        ("DELETE", f"/api/v1/namespaces/{ns}", None, 409, "exec_failed", None),
        ("POST", f"/api/v1/namespaces/{ns}/deletion", None, 422, "invalid_input", None),
        ("GET", "/api/v1/nowhere", None, 404, "not_found", None),
        ("PUT", "/api/v1/jobs", None, 405, "method_not_allowed", None),
        ("POST", "/api/v1/hosts/nohost/drain", None, 404, "not_found", None),
    ]
    with api_server.http(api_server.admin_token) as http:
        for method, path, body, status, code, field in cases:
            r = http.request(method, path, json=body)
            assert r.status_code == status, (method, path, r.text)
            error = r.json()["error"]
            assert error["code"] == code and error["message"], (path, error)
            if field:
                assert error["field"] == field, (path, error)
            if status in (404, 409, 422):
                assert error["hint"], (path, error)
        r = http.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert redis.get(keys.JOB_NEXT) == before, "a refused request made a job"
    assert client.store.namespace(ns) is not None and client.store.namespace(ns).state == "active"  # type: ignore


def test_the_http_client_raises_what_the_redis_client_raises(api_server: ApiServer, client: RedisClient,
                                                             settings: Settings) -> None:
    http = HttpClient(settings.model_copy(update={"api_url": api_server.url, "token": api_server.admin_token}))
    try:
        for call in (lambda c: c.vm(settings.namespace, "nosuch"), lambda c: c.job(999999999),
                     lambda c: c.submit(ops(Op.PAUSE, settings.namespace, "nosuch")),
                     lambda c: c.drain("nohost", True)):
            with pytest.raises(Exception) as direct:
                call(client)
            with pytest.raises(Exception) as over_http:
                call(http)
            assert type(over_http.value) is type(direct.value)
            assert (over_http.value.message, over_http.value.hint) == (  # type: ignore[attr-defined]
                direct.value.message, direct.value.hint)  # type: ignore[attr-defined]
    finally:
        http.close()


def test_job_listing_pages_with_before_and_a_link_header(api_server: ApiServer, client: RedisClient,
                                                         settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "p1", memory_mib=16, disk_gib=0))])
    ids = [j.id for j in client.submit(ops(Op.PAUSE, ns, "p1") + ops(Op.RESUME, ns, "p1") * 2,
                                       SubmitOptions(parent=False))]
    client.wait(ids)
    seen: list[int] = []
    url: str | None = f"/api/v1/namespaces/{ns}/jobs?limit=2"
    with api_server.http(api_server.admin_token) as http:
        while url:
            r = http.get(url)
            seen += [j["id"] for j in r.json()]
            link = r.headers.get("link")
            url = link[1:link.index(">")] if link else None
        assert http.get(f"/api/v1/namespaces/{ns}/jobs", params={"op": "resume"}).json()[0]["op"] == "resume"
    assert seen == sorted(seen, reverse=True) and len(seen) == 4


def test_long_poll_answers_at_the_timeout_or_as_soon_as_the_job_is_final(api_server: ApiServer,
                                                                        client: RedisClient,
                                                                        settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "lp", memory_mib=16, disk_gib=0))])
    # a stop without --force on a guest without an OS waits for its timeout: a job that stays running
    [stop] = client.submit(ops(Op.STOP, ns, "lp", timeout_s=3))
    with api_server.http(api_server.admin_token) as http:
        t = time.monotonic()
        early = http.get(f"/api/v1/jobs/{stop.id}/wait", params={"timeout": 0.5}).json()
        assert time.monotonic() - t < 5
        if early["state"] in ("queued", "waiting", "running"):
            t = time.monotonic()
            final = http.get(f"/api/v1/jobs/{stop.id}/wait", params={"timeout": 20}).json()
            assert final["state"] in ("succeeded", "failed") and time.monotonic() - t < 15


def test_names_and_tags_cannot_change_the_domain_xml(api_server: ApiServer, client: RedisClient,
                                                     settings: Settings) -> None:
    """Names with markup are refused by their pattern; tag values that are allowed stay data in the XML."""
    ns = settings.namespace
    with api_server.http(api_server.admin_token) as http:
        for bad in ("a<b", "a&b", 'a"b', "a'b", "a]]>b"):
            r = http.post("/api/v1/jobs", json=_launch(ns, bad))
            assert r.status_code == 422 and r.json()["error"]["field"] == "body.operations.0.vm", bad
            r = http.post("/api/v1/jobs", json=_launch(ns, "ok", tags={bad: "v"}))
            assert r.status_code == 422, bad
        r = http.post("/api/v1/jobs", json=_launch(ns, "x1", tags={"role": HOSTILE}))
        assert r.status_code == 202, r.text
        [job] = http.get("/api/v1/jobs/wait", params={"ids": [r.json()[0]["id"]], "timeout": 20}).json()
        assert job["state"] == "succeeded"
        assert http.get(f"/api/v1/namespaces/{ns}/vms/x1").json()["tags"] == {"role": HOSTILE}
    # what the worker writes into libvirt for this accepted request (worker/domxml.py, ElementTree)
    meta = domxml.VmorchMeta(ns, "x1", job["params"]["tags"], job_id=job["id"], fence=1)
    xml = domxml.domain_xml(name=f"{ns}.x1", virt_type="qemu", memory_mib=16, vcpus=1, disk=None, meta=meta)
    assert domxml.parse_metadata(xml) == meta
    root = ET.fromstring(xml)
    assert [el.text for el in root.iter(f"{{{domxml.NS}}}fence")] == ["1"]
    assert len(list(root.iter(f"{{{domxml.NS}}}tag"))) == 1 and "<![CDATA[" not in xml


def test_openapi_documents_every_error_and_needs_no_token(api_server: ApiServer) -> None:
    with api_server.http() as http:
        doc = http.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    routes = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]
    assert len(routes) >= 20
    for path, method, op in routes:
        documented = set(op["responses"])
        assert {"401", "422"} <= documented or path == "/api/v1/health", (method, path, documented)
        for code in documented - {"200", "201", "202", "204"}:
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert "403" in doc["paths"]["/api/v1/jobs"]["post"]["responses"]


def test_redis_down_is_503_and_an_unexpected_error_is_a_logged_json_500(
        api_server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = Settings(redis_url="redis://127.0.0.1:1/0", home=tmp_path)
    with running(create_app(down)) as url:
        r = httpx.get(f"{url}/api/v1/whoami", headers={"Authorization": "Bearer vmo_x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "cluster_unavailable"
        assert httpx.get(f"{url}/api/v1/health", timeout=30).status_code == 503
    with running(create_app(down.model_copy(update={"api_auth": False}))) as url:
        assert httpx.get(f"{url}/api/v1/hosts", timeout=30).status_code == 503

    def boom(self: RedisClient) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(RedisClient, "hosts", boom)
    with running(create_app(api_server.settings)) as url:
        r = httpx.get(f"{url}/api/v1/hosts", headers={"Authorization": f"Bearer {api_server.admin_token}"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret internals" not in r.text and "Traceback" not in r.text


def test_namespaces_through_the_api(api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = f"{settings.namespace}-n"
    with api_server.http(api_server.admin_token) as http:
        r = http.post("/api/v1/namespaces", json={"name": ns, "hosts": ["t1"]})
        assert r.status_code == 201 and r.json()["hosts"] == ["t1"], r.text
        assert ns in [n["name"] for n in http.get("/api/v1/namespaces").json()]
        [launch] = http.post("/api/v1/jobs", json=_launch(ns, "n1")).json()
        assert launch["host"] == "t1"
        http.get(f"/api/v1/jobs/{launch['id']}/wait", params={"timeout": 20})
        assert http.delete(f"/api/v1/namespaces/{ns}").status_code == 409
        jobs = http.post(f"/api/v1/namespaces/{ns}/deletion", params={"force": "true"}).json()
        assert [j["op"] for j in jobs] == ["delete"]
        http.get("/api/v1/jobs/wait", params={"ids": [j["id"] for j in jobs], "timeout": 20})
        assert http.delete(f"/api/v1/namespaces/{ns}").json()["namespace"] == ns
        assert http.get(f"/api/v1/namespaces/{ns}").status_code == 404


def test_server_sent_events_carry_job_changes_of_the_token_namespaces_only(
        api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "s1", memory_mib=16, disk_gib=0))])
    mine = api_server.token(f"{ns}-sse", "read", [ns])
    other = api_server.token(f"{ns}-sse-b", "read", [f"{ns}-b"])
    with api_server.http(mine) as http:
        assert http.get("/api/v1/jobs/events", params={"namespace": f"{ns}-b"}).status_code == 403
        assert http.get("/api/v1/jobs/events", params={"namespace": "Bad_NS"}).status_code == 422
    with api_server.http() as http:
        assert http.get("/api/v1/jobs/events").status_code == 401
    seen: dict[str, list[dict[str, object]]] = {"mine": [], "other": []}

    def listen(name: str, secret: str, until: float) -> None:
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=api_server.url, headers=headers, timeout=2) as http, \
                http.stream("GET", "/api/v1/jobs/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            try:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen[name].append(json.loads(line[6:]))
                        if seen[name][-1]["state"] == "succeeded":
                            return
                    if time.monotonic() > until:
                        return
            except httpx.ReadTimeout:  # nothing for this token: the stream stays quiet
                return

    import threading

    until = time.monotonic() + 8
    threads = [threading.Thread(target=listen, args=(n, s, until)) for n, s in (("mine", mine), ("other", other))]
    for t in threads:
        t.start()
    # both listeners subscribed (the API subscribes each stream to the updates channel)
    wait_until(lambda: client.redis.pubsub_numsub(keys.UPDATES)[0][1] >= 2, timeout=10,
               what="both SSE subscriptions")
    [pause] = client.submit(ops(Op.PAUSE, ns, "s1"))
    client.wait([pause.id])
    for t in threads:
        t.join(timeout=15)
    assert [e["state"] for e in seen["mine"] if e["id"] == pause.id][-1] == "succeeded"
    assert {e["namespace"] for e in seen["mine"]} == {ns}
    assert seen["other"] == []


def test_the_api_does_what_its_document_says(api_server: ApiServer, client: RedisClient, settings: Settings,
                                             redis: Redis) -> None:
    """Issue 16: what schemathesis's checks found between /openapi.json and the answers, one case each."""
    ns = settings.namespace
    client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "c1", memory_mib=16, disk_gib=0))])
    before = redis.get(keys.JOB_NEXT)
    with api_server.http(api_server.admin_token) as http:
        doc = http.get("/openapi.json").json()
        paths = doc["paths"]
        # names: the validators' rules, in the document (a schema-valid name is a valid name)
        [name] = [p for p in paths["/api/v1/namespaces/{ns}/vms/{name}"]["get"]["parameters"] if p["name"] == "name"]
        assert name["schema"]["pattern"].startswith("^") and name["schema"]["maxLength"] == 63
        [nsp] = [p for p in paths["/api/v1/namespaces/{ns}/vms"]["get"]["parameters"] if p["name"] == "ns"]
        assert "pattern" in nsp["schema"]
        # the health check is public, and says so; the event stream's type is documented
        assert paths["/api/v1/health"]["get"].get("security", []) == []
        assert paths["/api/v1/whoami"]["get"]["security"] == [{"HTTPBearer": []}]
        assert "text/event-stream" in paths["/api/v1/jobs/events"]["get"]["responses"]["200"]["content"]
        # a body that isn't even UTF-8: a 422 with the JSON error body, like any other body that isn't JSON
        r = http.post("/api/v1/jobs", content=b"\x80{", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text
        # a 405 names every method of the path
        r = http.request("OPTIONS", "/api/v1/images")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        r = http.request("PATCH", f"/api/v1/namespaces/{ns}/schedules/s1")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
        # POST on a VM's queue (or console) is the wrong method there, not an unknown operation
        for path in (f"/api/v1/namespaces/{ns}/vms/c1/queue", f"/api/v1/namespaces/{ns}/vms/c1/console"):
            r = http.post(path)
            assert r.status_code == 405 and r.headers["allow"] == "GET", (path, r.text)
            assert r.json()["error"]["code"] == "method_not_allowed"
        # a bad target is named as the field at fault
        r = http.post(f"/api/v1/namespaces/{ns}/vms/{'9' * 80}/start")
        assert r.status_code == 422 and r.json()["error"]["field"] == "path.target", r.text
        # a job with nothing to retry: its state conflicts (409), the request is fine
        [job] = client.jobs(ns, limit=1)
        r = http.post(f"/api/v1/jobs/{job.id}/retry")
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_input", r.text
        # a quota is integers: JSON false or "5" is not one (pydantic's lax mode took them as 0 and 5)
        for bad in ({"vms": False}, {"vms": "5"}):
            r = http.put(f"/api/v1/namespaces/{ns}/quota", json=bad)
            assert r.status_code == 422 and r.json()["error"]["field"] == "body.vms", r.text
    # Prometheus's path, with and without the slash, and no redirect
    for path in ("/metrics", "/metrics/"):
        r = httpx.get(f"{api_server.url}{path}", timeout=30)
        assert r.status_code == 200 and "vmorch_redis_up" in r.text, path
    assert redis.get(keys.JOB_NEXT) == before


def test_a_query_parameter_the_route_does_not_take_is_refused_naming_it(
        api_server: ApiServer, client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    with api_server.http(api_server.admin_token) as http:
        typo = http.post(f"/api/v1/namespaces/{ns}/deletion", params={"forse": "true"})
        assert typo.status_code == 422, typo.text
        assert typo.json()["error"]["field"] == "query.forse" and "force" in typo.json()["error"]["hint"]
        assert http.get("/api/v1/hosts", params={"x": "1"}).status_code == 422
        assert http.get("/api/v1/health", params={"x": "1"}).status_code == 422
        assert http.get(f"/api/v1/namespaces/{ns}/jobs", params={"limit": "5"}).status_code == 200
    assert client.jobs(ns) == []
