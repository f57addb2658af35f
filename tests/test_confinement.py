"""Guarantee 7, "tenants never reach the host", for images and disks: a request names catalog images,
never host paths; QEMU opens only files of vmorch's stores; no host file changes owner or mode."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from worker import domxml

from .apiserver import ApiServer
from .conftest import WorkerProc, cleanup_namespace, run_cli, wait_until
from .helpers import qemu_pids, qemu_worker
from .imageserver import ImageServer, hostile_backed, serving, sha256_of
from .test_images import remove_ok, store_of
from .test_operations import ok

pytestmark = [pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("genisoimage") is None,
                                 reason="qemu-img and genisoimage are needed")]


@pytest.fixture(scope="module")
def served(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    with serving(tmp_path_factory.mktemp("served")) as server:
        server.add("guest.qcow2", guest_image)
        hostile_backed(server.dir, "backed.qcow2")
        yield server


def _launch_body(ns: str, vm: str, image: str) -> dict[str, object]:
    return {"operations": [{"op": "launch", "namespace": ns, "vm": vm,
                            "params": {"memory_mib": 16, "disk_gib": 1, "image": image}}]}


def test_hostile_paths_through_the_api_are_refused_before_anything_is_enqueued(
        api_server: ApiServer, client: RedisClient, settings: Settings, redis: Redis, served: ImageServer) -> None:
    ns = settings.namespace
    other = f"{ns}-o"
    # another namespace's VM, with its disk: its path is the most tempting one
    with api_server.http(api_server.admin_token) as admin:
        r = admin.post(f"/api/v1/namespaces/{other}/vms/victim/launch", json={"memory_mib": 16, "disk_gib": 1})
        assert r.status_code == 202, r.text
        victim = admin.get(f"/api/v1/jobs/{r.json()[0]['id']}/wait", params={"timeout": 30}).json()
    victim_disk = victim["result"]["disk"]
    assert victim_disk and "victim" not in victim_disk  # not guessable from the name
    home = str(settings.home)
    hostile = ["/etc/shadow", "../x", "/proc/self/environ", victim_disk, f"{home}/cluster.json",
               "/root/.ssh/id_rsa", "..", "./img", "img/../../etc/passwd", "~root", "C:\\x", "file:///etc/shadow"]
    operate = api_server.token(f"{ns}-op", "operate", [ns])
    before = redis.get(keys.JOB_NEXT)
    with api_server.http(operate) as http:
        for image in hostile:
            for path, body in (("/api/v1/jobs", _launch_body(ns, "h1", image)),
                               (f"/api/v1/namespaces/{ns}/vms/h1/launch",
                                {"memory_mib": 16, "disk_gib": 1, "image": image})):
                r = http.post(path, json=body)
                assert r.status_code == 422, (image, path, r.text)
                error = r.json()["error"]
                assert error["field"].endswith("image") and "image" in error["message"], (image, error)
        # an import needs an admin of every namespace: file:// (a host's own file) above all
        for source in ("file:///etc/shadow", f"{served.url}/guest.qcow2"):
            r = http.post("/api/v1/images", json={"name": f"i-{ns}", "source": source})
            assert r.status_code == 403 and "whole cluster" in r.json()["error"]["message"], r.text
        assert http.delete(f"/api/v1/images/i-{ns}").status_code == 403
        assert http.get("/api/v1/images").status_code == 200  # reading the catalog is any token's
    for role, namespaces, why in (("operate", ["*"], "needs admin"), ("admin", [ns], "whole cluster")):
        with api_server.http(api_server.token(f"{ns}-{role}", role, namespaces)) as http:
            r = http.post("/api/v1/images", json={"name": f"i-{ns}", "source": "file:///etc/shadow"})
            assert r.status_code == 403 and why in r.json()["error"]["message"], r.text
    with api_server.http(api_server.admin_token) as http:  # and bad import requests, even from an admin
        for body, field in (({"name": "../x", "source": f"{served.url}/g"}, "name"),
                            ({"name": f"i-{ns}", "source": "ftp://host/x"}, "source"),
                            ({"name": f"i-{ns}", "source": "http://user:pw@host/x"}, "source"),
                            ({"name": f"i-{ns}", "source": f"{served.url}/g", "sha256": "xyz"}, "sha256"),
                            ({"name": f"i-{ns}", "source": f"{served.url}/g", "hosts": ["nope"]}, "host")):
            r = http.post("/api/v1/images", json=body)
            assert r.status_code == 422 and field in r.json()["error"]["message"], (body, r.text)
    assert redis.get(keys.JOB_NEXT) == before, "a refused request enqueued a job"
    r = run_cli(settings, "vm", "launch", "h1", "--image", "/etc/shadow")
    assert r.returncode == 2 and "image" in r.stderr and "path" in r.stderr
    assert redis.get(keys.JOB_NEXT) == before
    [gone] = client.submit([Operation.build(Op.DELETE, other, "victim")])
    assert client.wait([gone.id], timeout=30)[0].state is JobState.SUCCEEDED
    victims = [int(i) for i in redis.zrange(keys.jobs(other), 0, -1)]
    cleanup_namespace(client, redis, other)
    for job_id in victims:  # the other namespace's jobs are not this test's to leave behind
        redis.delete(keys.job(job_id), keys.job_history(job_id))


def test_an_image_with_an_outside_backing_file_is_refused_over_the_api(
        api_server: ApiServer, client: RedisClient, settings: Settings, served: ImageServer) -> None:
    name = f"backed-{settings.namespace}"
    with api_server.http(api_server.admin_token) as http:
        r = http.post("/api/v1/images", json={"name": name, "source": f"{served.url}/backed.qcow2",
                                              "hosts": ["t1"]})
        assert r.status_code == 202, r.text
        job = http.get(f"/api/v1/jobs/{r.json()[0]['id']}/wait", params={"timeout": 30}).json()
        assert job["state"] == "failed" and "backing file (/etc/hostname)" in job["error"]["message"], job
        image = http.get(f"/api/v1/images/{name}").json()
        assert image["hosts"] == {"t1": "failed"}
        r = http.delete(f"/api/v1/images/{name}")
        assert r.status_code == 202
        http.get(f"/api/v1/jobs/{r.json()[0]['id']}/wait", params={"timeout": 30})
        assert http.get(f"/api/v1/images/{name}").status_code == 404


def test_disk_and_seed_sources_are_never_relabelled_and_the_seed_is_a_readonly_cdrom(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    import libvirt

    disk = tmp_path / "vms" / f"{'ab' * 16}.qcow2"
    disk.parent.mkdir()
    disk.write_bytes(b"")
    seed = domxml.seed_for(disk)
    assert seed == tmp_path / "vms" / f"{'ab' * 16}.seed.iso"
    shapes = {"without a seed": None, "with its seed": seed}
    for what, made in shapes.items():
        if made is not None:
            made.write_bytes(b"")  # the launch handler builds it before the domain is defined
        xml = domxml.domain_xml(name="ns.vm", virt_type="qemu", memory_mib=64, vcpus=1, disk=str(disk),
                                meta=domxml.VmorchMeta("ns", "vm", disk=str(disk)))
        sources = ET.fromstring(xml).findall("devices/disk/source")
        assert [s.get("file") for s in sources] == [str(disk), *([str(seed)] if made else [])], what
        for source in sources:
            label = source.find("seclabel")
            assert label is not None and (label.get("model"), label.get("relabel")) == ("dac", "no"), what
        cdroms = ET.fromstring(xml).findall("devices/disk[@device='cdrom']")
        assert len(cdroms) == (1 if made else 0), what
        if made:
            assert cdroms[0].find("readonly") is not None and cdroms[0].find("target").get("bus") == "ide"  # type: ignore[union-attr]
        conn = libvirt.open("test:///default")  # libvirt's own schema accepts the shape
        try:
            conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE).undefine()
        finally:
            conn.close()


# -- real QEMU: what it opens, and whose files it leaves as they were -----------------------------


@pytest.fixture(scope="module")
def qemu_host(base_settings: Settings) -> Iterator[tuple[WorkerProc, Path]]:
    root = Path(tempfile.mkdtemp(prefix="vmcq", dir="/tmp"))  # short: agent socket paths live under it
    with qemu_worker(base_settings, "cq", root, up_within=90) as worker:
        yield worker, root


def _owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _open_files(pid: int) -> list[str]:
    """The regular files QEMU has open (sockets, pipes, anon inodes, devices are not files of a store)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            mode = fd.stat().st_mode
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(mode):
            found.append(target)
    return found


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_opens_only_store_files_and_changes_no_owner(qemu_host: tuple[WorkerProc, Path], client: RedisClient,
                                                          served: ImageServer, base_settings: Settings) -> None:
    _, root = qemu_host
    ns = client.settings.namespace
    name = f"conf-{ns}"
    jobs = client.import_image(name, f"{served.url}/guest.qcow2", hosts=["cq"])
    assert client.wait([j.id for j in jobs], timeout=60)[0].state is JobState.SUCCEEDED
    image = client.image(name)
    storage = store_of(base_settings, "cq")
    stored = storage / "images" / f"{image.sha256}.qcow2"
    # owned by someone else than QEMU's user (root): libvirt's DAC relabelling would chown it to root
    os.chown(stored, 4242, 4343)
    before = _owner(stored)

    launch = ok(client, Op.LAUNCH, "conf", memory_mib=128, disk_gib=1, image=name, host="cq",
                cloud_init="#cloud-config\n", ssh_keys=[])
    assert launch.result is not None
    disk = Path(launch.result["disk"])
    seed = domxml.seed_for(disk)
    disk_owner, seed_owner = _owner(disk), _owner(seed)
    pidfile = root / "run" / "qemu" / f"{ns}.conf.pid"
    wait_until(pidfile.exists, what="QEMU's pid file")
    pid = int(pidfile.read_text().strip())
    assert pid in qemu_pids(root)
    opened = _open_files(pid)
    allowed = (f"{storage}/", f"{root}/", "/dev/")
    outside = [f for f in opened if not f.startswith(allowed)]
    assert not outside, f"QEMU opened files outside vmorch's stores: {outside}"
    assert {str(disk), str(stored), str(seed)} <= set(opened), opened
    assert _owner(stored) == before
    ok(client, Op.SNAPSHOT, "conf", name="s1")  # an internal snapshot: of the disk; the seed is read-only

    ok(client, Op.STOP, "conf", force=True, timeout_s=3)
    ok(client, Op.START, "conf")
    wait_until(lambda: int(pidfile.read_text().strip() or 0) != pid, what="a new QEMU")
    assert str(seed) in _open_files(int(pidfile.read_text().strip()))  # the seed is there again
    ok(client, Op.DELETE, "conf")
    assert not disk.exists() and not seed.exists()
    assert _owner(stored) == before, "a VM's life changed the owner or mode of its image"
    assert (disk_owner[:2], seed_owner[:2]) == ((0, 0), (0, 0))
    assert sha256_of(stored) == image.sha256
    os.chown(stored, 0, 0)
    remove_ok(client, name)
