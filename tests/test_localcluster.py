"""The embedded local cluster (``vmorch up`` / ``vmorch down``), with real processes.

Every test starts its own cluster (a real redis-server and real workers on libvirt's test
driver) in a temporary home, and always stops it again, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import libvirt
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator import localcluster
from orchestrator.localcluster import ClusterInfo
from orchestrator.localcluster.api import api_answers
from orchestrator.model.errors import AlreadyExists, ClusterUnavailable, InvalidInput
from orchestrator.model.records import HostState
from orchestrator.model.settings import Settings
from orchestrator.store.jobstore import Store
from orchestrator.store.redisconn import connect

ROOT = Path(__file__).resolve().parent.parent
TEST_URI = "test:///default"

pytestmark = pytest.mark.slow


def _settings(home: Path) -> Settings:
    return Settings(home=home, heartbeat_interval=0.5, host_down_after=3.0)


def _wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether a process runs; an exited child nobody reaped yet (zombie) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _recorded(home: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((home / "cluster.json").read_text())
    return data


def _pids(info: ClusterInfo) -> list[int]:
    extra = [pid for pid in (info.scheduler_pid, info.api_pid) if pid]
    return [info.supervisor_pid, info.redis_pid, *(h.pid for h in info.hosts), *extra]


def _hosts_up(info: ClusterInfo) -> dict[str, int | None]:
    """host name -> worker pid, for the hosts that are up."""
    with connect(info.redis_url, retries=0) as client:
        return {h.name: h.pid for h in Store(client, host_down_after=3.0).hosts() if h.state is HostState.UP}


def _redis_answers(url: str) -> bool:
    try:
        with connect(url, retries=0) as client:
            return bool(client.ping())
    except (RedisConnectionError, OSError):
        return False


def _assert_stopped(home: Path, pids: list[int], redis_url: str) -> None:
    _wait_for(lambda: not any(_running(p) for p in pids), "every recorded process to exit", timeout=10)
    assert not (home / "cluster.json").exists()
    assert not _redis_answers(redis_url)


def _safety_stop(settings: Settings) -> None:
    """Teardown: whatever the test did, nothing it started may keep running."""
    localcluster.down(settings, on_event=lambda _line: None)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home short enough for embedded QEMU's socket paths (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="vlc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def running(home: Path) -> Iterator[ClusterInfo]:
    settings = _settings(home)
    try:
        yield localcluster.up(settings, hosts=2, libvirt_uri=TEST_URI, detach=True, on_event=lambda _line: None)
    finally:
        _safety_stop(settings)


def test_up_detached_starts_redis_and_every_host(running: ClusterInfo, home: Path) -> None:
    assert [h.name for h in running.hosts] == ["host1", "host2"]
    assert all(h.libvirt_uri == TEST_URI for h in running.hosts)
    assert _hosts_up(running) == {h.name: h.pid for h in running.hosts}
    with connect(running.redis_url, retries=0) as client:  # equal shares of one machine: equal hosts
        hosts = [h for h in Store(client, host_down_after=3.0).hosts() if h.name in ("host1", "host2")]
    machine = libvirt.open(TEST_URI).getInfo()  # what one test hypervisor reports: the whole "machine"
    assert {(h.memory_mib, h.cpus) for h in hosts} == {(machine[1] // 2, machine[2] // 2)}
    assert _recorded(home)["redis_url"] == running.redis_url
    with connect(running.redis_url, retries=0) as client:  # an accepted job survives a power loss
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    # Every other vmorch command with this home finds the cluster through cluster.json.
    assert Settings(home=home).resolved_redis_url() == running.redis_url
    assert localcluster.status(_settings(home)) == running
    assert (home / ".vmorch-home").exists()
    json.dumps(running.model_dump(mode="json"))  # what 'vmorch --json up' prints


def test_up_serves_the_api_with_an_admin_token_and_restarts_it(running: ClusterInfo, home: Path) -> None:
    token_file = home / "token"
    assert running.api_url and running.api_pid and _recorded(home)["api_url"] == running.api_url
    assert token_file.stat().st_mode & 0o777 == 0o600
    # the cluster's Redis wants its password, which only the owner of the home can read
    assert (home / "cluster.json").stat().st_mode & 0o777 == 0o600
    password = urlsplit(running.redis_url).password
    assert password and not _redis_answers(running.redis_url.replace(f":{password}@", ""))
    assert password not in " ".join(Path(f"/proc/{running.redis_pid}/cmdline").read_text().split("\0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMORCH_")}
    # the token comes from <home>/token by itself
    env.update(VMORCH_HOME=str(home), VMORCH_API_URL=running.api_url)
    listed = subprocess.run([sys.executable, "-m", "cli", "--json", "host", "list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {h["name"] for h in json.loads(listed.stdout)} == {"host1", "host2"}
    assert httpx.get(f"{running.api_url}/api/v1/hosts").status_code == 401

    os.kill(running.api_pid, signal.SIGKILL)

    def restarted() -> bool:
        info = localcluster.status(_settings(home))
        return bool(info and info.api_pid != running.api_pid and info.api_url and api_answers(info.api_url))

    _wait_for(restarted, "the API to answer again from a new process")
    secret = token_file.read_text().strip()
    r = httpx.get(f"{running.api_url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert r.json()["name"] == "local-admin" and r.json()["role"] == "admin"


def test_second_up_is_refused_and_leaves_the_first_alone(running: ClusterInfo, home: Path) -> None:
    with pytest.raises(AlreadyExists) as caught:
        localcluster.up(_settings(home), hosts=1, libvirt_uri=TEST_URI, detach=True, on_event=lambda _line: None)
    assert caught.value.message == f"a local cluster is already running under {home}"
    assert caught.value.hint == "stop it with 'vmorch down'"
    assert all(_running(p) for p in _pids(running))
    assert localcluster.status(_settings(home)) == running


def test_supervisor_restarts_a_killed_worker(running: ClusterInfo, home: Path) -> None:
    host1 = running.hosts[0]
    os.kill(host1.pid, signal.SIGKILL)

    def restarted() -> int | None:
        info = localcluster.status(_settings(home))
        new = info.hosts[0] if info else None
        return new.pid if new and new.pid != host1.pid and _hosts_up(running).get("host1") == new.pid else None

    _wait_for(restarted, "host1 to heartbeat again from a new worker")
    info = localcluster.status(_settings(home))
    assert info is not None and info.hosts[0].restarts == 1
    assert info.hosts[1] == running.hosts[1]  # host2 was left alone
    log = (home / "logs" / "supervisor.log").read_text()
    assert f"host1 worker (pid {host1.pid}) exited (killed by SIGKILL)" in log


def test_down_stops_every_process_and_up_again_reuses_the_home(running: ClusterInfo, home: Path) -> None:
    settings = _settings(home)
    events: list[str] = []
    localcluster.down(settings, on_event=events.append)
    _assert_stopped(home, _pids(running), running.redis_url)
    assert events[-1] == "local cluster stopped"
    assert localcluster.status(settings) is None
    assert (home / "redis").is_dir()  # the AOF stays for the next 'up'

    again = localcluster.up(settings, hosts=1, libvirt_uri=TEST_URI, detach=True, on_event=lambda _line: None)
    try:
        assert _hosts_up(again) == {"host1": again.hosts[0].pid}
    finally:
        localcluster.down(settings, purge=True, on_event=events.append)
    _assert_stopped(home, _pids(again), again.redis_url)
    assert not home.exists()
    localcluster.down(settings, on_event=events.append)
    assert events[-1] == f"no local cluster is running under {home}"


def test_down_after_the_supervisor_was_killed_stops_what_it_left(running: ClusterInfo, home: Path) -> None:
    os.kill(running.supervisor_pid, signal.SIGKILL)
    _wait_for(lambda: not _running(running.supervisor_pid), "the supervisor to die")
    assert all(_running(p) for p in _pids(running)[1:])  # its orphans still run

    localcluster.down(_settings(home), on_event=lambda _line: None)
    _assert_stopped(home, _pids(running), running.redis_url)


def test_foreground_up_stops_everything_on_ctrl_c(home: Path, tmp_path: Path) -> None:
    code = ("import sys; from orchestrator import localcluster as lc; "
            "from orchestrator.model.settings import Settings; "
            "lc.up(Settings(home=sys.argv[1], heartbeat_interval=0.5, host_down_after=3.0), hosts=1, "
            "libvirt_uri='test:///default')")
    with (tmp_path / "foreground.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, str(home)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: localcluster.status(_settings(home)) is not None, "the foreground cluster to start")
        info = localcluster.status(_settings(home))
        assert info is not None and info.supervisor_pid == proc.pid
        _wait_for(lambda: "host1" in _hosts_up(info), "host1 to come up")
        proc.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        assert proc.wait(timeout=40) == 0
        _assert_stopped(home, _pids(info), info.redis_url)
        assert "local cluster stopped" in (tmp_path / "foreground.log").read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=40)
        _safety_stop(_settings(home))


def _qemu_pids(root: Path) -> list[int]:
    """The QEMU processes of one embedded root (they outlive their worker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _running(int(proc.name)):
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmdline and str(root) in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.qemu
def test_down_powers_off_qemu_domains_and_keeps_their_definitions(short_home: Path) -> None:
    home = short_home / "home"
    uri, warning = localcluster.default_libvirt_uri(home, "host1")
    if warning:
        pytest.skip(warning)
    root = home.resolve() / "hosts" / "host1" / "libvirt"
    settings = _settings(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMORCH_")} | {"VMORCH_HOME": str(home)}
    try:
        info = localcluster.up(settings, hosts=1, detach=True, on_event=lambda _line: None)
        assert info.hosts[0].libvirt_uri == uri
        launch = subprocess.run([sys.executable, "-m", "cli", "vm", "launch", "q1", "--memory", "64", "--disk", "0",
                                 "--wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert launch.returncode == 0, launch.stdout + launch.stderr
        qemu = _qemu_pids(root)
        assert len(qemu) == 1

        localcluster.down(settings, on_event=lambda _line: None)
        _assert_stopped(home, _pids(info), info.redis_url)
        _wait_for(lambda: not _running(qemu[0]), "QEMU to exit", timeout=10)
        assert (root / "etc" / "qemu" / "default.q1.xml").is_file()  # 'vmorch up' finds it again, shut off
    finally:
        _safety_stop(settings)
        for pid in _qemu_pids(root):  # only ever this test's own guests
            os.kill(pid, signal.SIGKILL)


def test_missing_redis_server_is_reported_with_the_fix(home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ClusterUnavailable) as caught:
        localcluster.up(_settings(home), libvirt_uri=TEST_URI, detach=True, on_event=lambda _line: None)
    assert caught.value.message == "redis-server not found"
    assert caught.value.hint == "install it: apt-get install redis-server (or run scripts/install.sh)"
    assert not (home / "cluster.json").exists()


def test_redis_appendfsync_is_always_unless_relaxed(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.localcluster.supervisor import redis_appendfsync

    monkeypatch.delenv("VMORCH_REDIS_APPENDFSYNC", raising=False)
    assert redis_appendfsync() == "always"
    monkeypatch.setenv("VMORCH_REDIS_APPENDFSYNC", "everysec")
    assert redis_appendfsync() == "everysec"
    monkeypatch.setenv("VMORCH_REDIS_APPENDFSYNC", "sometimes")
    with pytest.raises(InvalidInput, match="VMORCH_REDIS_APPENDFSYNC='sometimes'"):
        redis_appendfsync()


def test_purge_refuses_a_directory_vmorch_did_not_create(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidInput):
        localcluster.down(_settings(foreign), purge=True, on_event=lambda _line: None)
    assert (foreign / "precious.txt").exists()


def test_default_libvirt_uri_prefers_embedded_qemu(short_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, warning = localcluster.default_libvirt_uri(short_home, "host1")
    if warning is None:
        assert uri == f"qemu:///embed?root={short_home.resolve()}/hosts/host1/libvirt"
    else:  # a machine without QEMU or without the libvirt-qemu user
        assert uri == TEST_URI

    uri, warning = localcluster.default_libvirt_uri(short_home / ("x" * 40), "host1")
    assert uri == TEST_URI
    assert warning is not None and "too long for QEMU's UNIX sockets" in warning

    monkeypatch.setenv("PATH", str(short_home))  # no qemu-system-x86_64 here
    uri, warning = localcluster.default_libvirt_uri(short_home, "host1")
    assert uri == TEST_URI
    assert warning is not None and warning.startswith("qemu-system-x86_64 not found")
