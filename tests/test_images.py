"""The image catalog: import over HTTP to hosts' stores, launch by name, cloud-init seeds; and the real
guest booted from a catalog image, its seed read from inside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.model.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from worker import domxml

from .conftest import WorkerProc, run_cli, start_worker, wait_hosts_up
from .guest import Qemu
from .imageserver import ImageServer, hostile_backed, qemu_img, serving, sha256_of
from .test_operations import ok, one
from .test_qemu import qemu_pids

pytestmark = [pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("genisoimage") is None,
                                 reason="qemu-img and genisoimage are needed")]

SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
           "alice@example \"quoted\"")
USER_DATA = "#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: 'hello from vmorch'\n"


@pytest.fixture(scope="module")
def images(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    with serving(tmp_path_factory.mktemp("served")) as server:
        server.add("guest.qcow2", guest_image)
        yield server


def import_ok(client: RedisClient, name: str, source: str, hosts: list[str], **kw: object) -> list[int]:
    jobs = client.import_image(name, source, hosts=hosts, **kw)  # type: ignore[arg-type]
    done = client.wait([j.id for j in jobs], timeout=120)
    assert all(j.state is JobState.SUCCEEDED for j in done), [(j.host, j.error) for j in done]
    return [j.id for j in done]


def remove_ok(client: RedisClient, name: str) -> None:
    jobs = client.remove_image(name)
    done = client.wait([j.id for j in jobs], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in done), [(j.host, j.error) for j in done]
    with pytest.raises(NotFound):
        client.image(name)
    # its history went in the same step as its record: no key of a removed image is left
    assert not client.redis.exists(keys.image(name), keys.image_hosts(name), keys.image_history(name))


def store_of(settings: Settings, host: str) -> Path:
    return settings.home / "hosts" / host / "disks"


def chain(path: Path) -> list[dict[str, object]]:
    return list(json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", str(path))))


# -- what a launch may carry, checked once for the CLI, the API and experiment files --------------


@pytest.mark.parametrize(("params", "message"), [
    ({"image": "/etc/shadow"}, "looks like a path"),
    ({"image": "../x"}, "looks like a path"),
    ({"image": "a.b"}, "invalid image name"),
    ({"image": "ok", "disk_gib": 0}, "needs a disk"),
    ({"cloud_init": "#cloud-config\n"}, "need --image"),
    ({"image": "ok", "cloud_init": "#cloud-config\n\x00"}, "control character"),
    ({"image": "ok", "cloud_init": "x" * (64 * 1024 + 1)}, "at most 65536"),
    ({"image": "ok", "cloud_init": "é" * 40000}, "more than 65536"),
    ({"image": "ok", "ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}, "private key"),
    ({"image": "ok", "ssh_keys": ["ssh-dss AAAAB3NzaC1kc3MAAACBAP"]}, "not an OpenSSH public key"),
    ({"image": "ok", "ssh_keys": ["ssh-ed25519 !!!"]}, "not valid base64"),
    ({"image": "ok", "ssh_keys": [SSH_KEY.replace("ssh-ed25519", "ssh-rsa", 1)]}, "is a 'ssh-ed25519' key"),
    ({"image": "ok", "ssh_keys": [SSH_KEY + "\x07"]}, "control character"),
])
def test_launch_params_refuse_paths_and_bad_guest_data(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        Operation.build(Op.LAUNCH, "default", "v1", **params)
    assert info.value.exit_code == 2


def test_keys_are_normalised_and_the_experiment_example_validates(settings: Settings) -> None:
    params = Operation.build(Op.LAUNCH, "default", "v1", image="ok", ssh_keys=[f"  {SSH_KEY}  "]).params
    assert params.ssh_keys == [SSH_KEY]  # type: ignore[attr-defined]
    examples = Path(__file__).resolve().parent.parent / "examples"
    r = run_cli(settings, "experiment", "validate", str(examples / "guests.yaml"))
    assert r.returncode == 0, r.stderr


# -- on the test driver: the catalog's whole life, fast -------------------------------------------


def test_import_launch_by_name_and_remove(cluster: list[WorkerProc], client: RedisClient, images: ImageServer,
                                          guest_image: Path, base_settings: Settings) -> None:
    ns = client.settings.namespace
    name = f"img-{ns}"
    started = time.monotonic()
    import_ok(client, name, f"{images.url}/guest.qcow2", ["t1", "t2"], sha256=sha256_of(guest_image))
    took = time.monotonic() - started
    image = client.image(name)
    assert image.hosts == {"t1": "ready", "t2": "ready"} and image.sha256 == sha256_of(guest_image), image
    assert image.format == "qcow2" and image.size_bytes > 0 and image.virtual_size_bytes > 0
    assert name in [i.name for i in client.images()]
    assert client.redis.xlen(keys.image_history(name)) >= 2  # its own history: its two import jobs at least
    stored = store_of(base_settings, "t1") / "images" / f"{image.sha256}.qcow2"
    assert stored.is_file() and sha256_of(stored) == image.sha256 and stored.stat().st_mode & 0o777 == 0o444
    print(f"imported {image.size_bytes / 2**20:.1f} MiB to two hosts in {took:.2f}s")

    # importing it again where it is ready is refused; a name may not change its source
    with pytest.raises(AlreadyExists, match="already ready"):
        client.import_image(name, f"{images.url}/guest.qcow2", hosts=["t1"])
    with pytest.raises(AlreadyExists, match="another source"):
        client.import_image(name, f"{images.url}/other.qcow2", hosts=["t1"])

    launch = ok(client, Op.LAUNCH, "fromimg", memory_mib=64, disk_gib=1, image=name, host="t2",
                cloud_init=USER_DATA, ssh_keys=[SSH_KEY])
    assert launch.result is not None
    disk = Path(launch.result["disk"])
    assert disk.parent == store_of(base_settings, "t2") / "vms" and len(disk.stem) == 32 and "fromimg" not in str(disk)
    [top, base] = chain(disk)
    assert top["format"] == "qcow2" and top["backing-filename-format"] == "qcow2"
    assert top["backing-filename"] == str(store_of(base_settings, "t2") / "images" / f"{image.sha256}.qcow2")
    assert base["filename"] == top["backing-filename"] and "backing-filename" not in base
    seed = domxml.seed_for(disk)
    assert seed.is_file()
    assert client.vm(ns, "fromimg").image == name

    with pytest.raises(NotFound, match="no image"):
        client.submit([Operation.build(Op.LAUNCH, ns, "nowhere", image=f"nope-{ns}")])

    # in use: removal refused, naming the VM
    with pytest.raises(InvalidInput, match=f"{ns}/fromimg"):
        client.remove_image(name)
    ok(client, Op.DELETE, "fromimg")
    assert not disk.exists() and not seed.exists()
    assert sha256_of(stored) == image.sha256
    remove_ok(client, name)
    assert not stored.exists() and not (store_of(base_settings, "t2") / "images" / stored.name).exists()


def test_placement_and_moves_follow_the_image(cluster: list[WorkerProc], client: RedisClient,
                                              images: ImageServer, base_settings: Settings) -> None:
    ns = client.settings.namespace
    name = f"one-{ns}"
    import_ok(client, name, f"{images.url}/guest.qcow2", ["t1"])
    with pytest.raises(InvalidInput, match=r"image .* is not ready on host 't2' \(it is ready on t1\)"):
        client.submit([Operation.build(Op.LAUNCH, ns, "p1", image=name, host="t2")])
    [job] = client.submit([Operation.build(Op.LAUNCH, ns, "p1", image=name, memory_mib=16)])
    assert job.host == "t1"  # the only host where it is ready
    assert client.wait([job.id], timeout=60)[0].state is JobState.SUCCEEDED
    ok(client, Op.KILL, "p1")
    with pytest.raises(InvalidInput, match=r"its image .* is not ready there"):
        client.submit([Operation.build(Op.MOVE_OUT, ns, "p1", to="t2")])
    ok(client, Op.DELETE, "p1")
    remove_ok(client, name)


def test_a_move_carries_the_seed_and_needs_the_image_there(cluster: list[WorkerProc], client: RedisClient,
                                                            images: ImageServer) -> None:
    ns = client.settings.namespace
    name = f"mv-{ns}"
    import_ok(client, name, f"{images.url}/guest.qcow2", ["t1", "t2"])
    launch = ok(client, Op.LAUNCH, "mv", memory_mib=16, image=name, host="t1", cloud_init=USER_DATA)
    assert launch.result is not None
    seed = domxml.seed_for(launch.result["disk"])
    content = seed.read_bytes()
    ok(client, Op.KILL, "mv")
    out, into = client.submit([Operation.build(Op.MOVE_OUT, ns, "mv", to="t2")])
    out, into = client.wait([out.id, into.id], timeout=60)
    assert out.state is into.state is JobState.SUCCEEDED, (out.error, into.error)
    assert into.result is not None
    moved = domxml.seed_for(into.result["disk"])
    assert not seed.exists() and moved.read_bytes() == content and moved.parent.parent.parent.name == "t2"
    ok(client, Op.DELETE, "mv")
    assert not moved.exists()
    remove_ok(client, name)


def test_cli_image_commands_and_launch_options(cluster: list[WorkerProc], client: RedisClient, settings: Settings,
                                               images: ImageServer, tmp_path: Path) -> None:
    ns = settings.namespace
    name = f"cli-{ns}"
    r = run_cli(settings, "image", "import", name, f"{images.url}/guest.qcow2", "--host", "t1", "--wait")
    assert r.returncode == 0, r.stderr
    r = run_cli(settings, "--json", "image", "list")
    listed = {i["name"]: i for i in json.loads(r.stdout)}
    assert listed[name]["hosts"] == {"t1": "ready"} and set(listed[name]) >= {"name", "format", "size_bytes",
                                                                              "sha256", "hosts"}
    r = run_cli(settings, "image", "show", name)
    assert r.returncode == 0 and "ready" in r.stdout
    user_data, key, private = tmp_path / "user-data", tmp_path / "id.pub", tmp_path / "id"
    user_data.write_text(USER_DATA)
    key.write_text(SSH_KEY + "\n")
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    # a path, or anything with '/', is refused before anything is sent: exit 2, naming the field
    for bad in ("/abs/path.qcow2", "../x", f"{name}/x", "x.qcow2"):
        r = run_cli(settings, "vm", "launch", "c1", "--image", bad)
        assert r.returncode == 2 and "image" in r.stderr, (bad, r.stderr)
    r = run_cli(settings, "vm", "launch", "c1", "--image", name, "--ssh-key", str(private))
    assert r.returncode == 2 and "private key" in r.stderr
    r = run_cli(settings, "vm", "launch", "c1", "--cloud-init", str(user_data))
    assert r.returncode == 2 and "need --image" in r.stderr
    r = run_cli(settings, "vm", "launch", "c1", "--image", name, "--memory", "16", "--cloud-init", str(user_data),
                "--ssh-key", str(key), "--wait")
    assert r.returncode == 0, r.stderr
    job = client.jobs(ns, vm="c1")[0]
    assert job.params["cloud_init"] == USER_DATA and job.params["ssh_keys"] == [SSH_KEY]
    r = run_cli(settings, "image", "remove", name)
    assert r.returncode == 2 and f"{ns}/c1" in r.stderr
    ok(client, Op.DELETE, "c1")
    r = run_cli(settings, "image", "remove", name, "--wait")
    assert r.returncode == 0, r.stderr
    r = run_cli(settings, "image", "show", name)
    assert r.returncode == 3


def test_hostile_images_are_refused_by_every_host(cluster: list[WorkerProc], client: RedisClient,
                                                  images: ImageServer, base_settings: Settings) -> None:
    ns = client.settings.namespace
    backed = hostile_backed(images.dir, "backed.qcow2")
    shadow = hostile_backed(images.dir, "shadow.qcow2", backing="/etc/shadow", fmt="raw")
    cases = {
        f"backed-{ns}": (f"{images.url}/{backed.name}", "backing file"),
        f"shadow-{ns}": (f"{images.url}/{shadow.name}", "backing file"),
        f"badsum-{ns}": (f"{images.url}/guest.qcow2", "sha256"),
        f"gone-{ns}": (f"{images.url}/nothing-here.qcow2", "HTTP 404"),
    }
    before_hostname = os.stat("/etc/hostname")
    for name, (source, why) in cases.items():
        jobs = client.import_image(name, source, hosts=["t1"], sha256="0" * 64 if "badsum" in name else None)
        [done] = client.wait([j.id for j in jobs], timeout=60)
        assert done.state is JobState.FAILED and done.error is not None and why in done.error.message, done.error
        image = client.image(name)
        assert image.hosts == {"t1": "failed"} and why in image.errors["t1"]
        with pytest.raises(InvalidInput, match="not ready"):
            client.submit([Operation.build(Op.LAUNCH, ns, "h1", image=name, host="t1")])
        remove_ok(client, name)
    leftovers = [p.name for p in (store_of(base_settings, "t1") / "images").iterdir()]
    assert not [p for p in leftovers if p.startswith(".part-")], leftovers
    after = os.stat("/etc/hostname")
    assert (after.st_uid, after.st_gid, after.st_mode) == (before_hostname.st_uid, before_hostname.st_gid,
                                                           before_hostname.st_mode)


# -- real QEMU: two hosts, the real guest --------------------------------------------------------

qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")


@pytest.fixture(scope="module")
def qemu_hosts(base_settings: Settings) -> Iterator[list[WorkerProc]]:
    # short roots: the guest agent's socket path under them must fit a UNIX socket's 107 bytes
    roots = [Path(tempfile.mkdtemp(prefix=f"vm{h}", dir="/tmp")) for h in ("ia", "ib")]
    workers = [start_worker(base_settings, h, f"qemu:///embed?root={r}", concurrency=2)
               for h, r in zip(("ia", "ib"), roots, strict=True)]
    try:
        wait_hosts_up(base_settings, *workers, timeout=90)
        yield workers
    finally:
        for w in workers:
            w.stop()
        leftover = [pid for r in roots for pid in qemu_pids(r)]
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)
        assert not leftover, f"QEMU processes outlived the test: {leftover}"


@qemu
@pytest.mark.qemu
@pytest.mark.slow
def test_real_guest_from_the_catalog_reads_its_seed(qemu_hosts: list[WorkerProc], client: RedisClient,
                                                    images: ImageServer, guest_image: Path,
                                                    base_settings: Settings, tmp_path: Path) -> None:
    ns = client.settings.namespace
    name = f"guest-{ns}"
    started = time.monotonic()
    import_ok(client, name, f"{images.url}/guest.qcow2", ["ia", "ib"])
    print(f"imported the guest to two QEMU hosts in {time.monotonic() - started:.2f}s")
    image = client.image(name)
    stored = store_of(base_settings, "ia") / "images" / f"{image.sha256}.qcow2"
    launch = ok(client, Op.LAUNCH, "g1", memory_mib=256, disk_gib=1, image=name, host="ia",
                cloud_init=USER_DATA, ssh_keys=[SSH_KEY])
    assert launch.result is not None and launch.result["state"] == "running"
    disk = Path(launch.result["disk"])
    seed = domxml.seed_for(disk)
    [top, base] = chain(disk)
    assert top["backing-filename"] == str(stored) and "backing-filename" not in base  # copy-on-write overlay
    ok(client, Op.STOP, "g1", force=True, timeout_s=5)
    ok(client, Op.START, "g1")  # the seed stays attached: a new QEMU opens it again
    ok(client, Op.KILL, "g1")
    assert one(client, Op.START, "g1").state is JobState.SUCCEEDED
    ok(client, Op.KILL, "g1")
    assert client.vm(ns, "g1").state is VmState.SHUTOFF

    # the disk and the seed as the VM had them, booted in plain QEMU (an overlay on the VM's disk)
    guest = Qemu(disk, tmp_path / "boot", extra=("-drive", f"file={seed},media=cdrom,readonly=on,format=raw"))
    try:
        guest.start()
        guest.wait_serial("vmorch-guest: ready", timeout=120)
        agent = guest.agent(timeout=60)
        code, meta, _ = agent.exec(["cat", "/mnt/cidata/meta-data"])
        assert code == 0 and 'local-hostname: "g1"' in meta and f'instance-id: "{ns}-g1-{launch.id}"' in meta
        assert json.dumps(SSH_KEY) in meta
        code, user, _ = agent.exec(["cat", "/mnt/cidata/user-data"])
        assert code == 0 and user == USER_DATA
        code, host, _ = agent.exec(["hostname"])
        assert host.strip() == "g1"
        agent.close()
    finally:
        guest.stop()
    ok(client, Op.DELETE, "g1")
    assert not disk.exists() and not seed.exists()
    assert sha256_of(stored) == image.sha256  # the image is unchanged by the VM's whole life
    remove_ok(client, name)
    assert not stored.exists()
