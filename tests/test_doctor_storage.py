"""``vmorch doctor`` on a host whose worker uses the system libvirtd: can its QEMU user reach the disks?

Computed from the directories' modes and the QEMU user's uid and groups (``os.access`` answers for
the caller, root when the tests run as root), so these tests need no such user and no libvirtd.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.edge import doctor as d
from orchestrator.edge.qemuaccess import User, can_traverse, chmod_for, is_system_qemu, qemu_user, untraversable
from orchestrator.model.records import Host, HostState
from orchestrator.model.settings import Settings

#: a user that owns nothing here and is in no group of these files: the "others" bits apply
QEMU = User("libvirt-qemu", 64055, frozenset({64055}))


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory right under /tmp: pytest's own are under a 0700 directory (/tmp/pytest-of-root)."""
    path = Path(tempfile.mkdtemp(prefix="vmorch-qemuaccess-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def tree(tmp_path: Path, mode: int) -> tuple[Path, Path]:
    """``tmp_path/root/x`` (mode ``mode``) holding ``home/hosts/h1/disks`` (0755 all)."""
    private = tmp_path / "root" / "x"
    disks = private / "home" / "hosts" / "h1" / "disks"
    disks.mkdir(parents=True)
    tmp_path.chmod(0o755)
    (tmp_path / "root").chmod(0o755)
    private.chmod(mode)
    return private, disks


def test_a_0700_directory_on_the_way_blocks_the_qemu_user(tmp_path: Path) -> None:
    private, disks = tree(tmp_path, 0o700)
    assert untraversable(disks, QEMU) == [private]
    assert chmod_for(private, QEMU) == f"chmod o+x {private}"
    private.chmod(0o711)
    assert untraversable(disks, QEMU) == []
    # root passes everywhere; the owner's and the group's bits apply to them, not the others'
    assert untraversable(disks, User("root", 0, frozenset({0}))) == []
    owner, member = User("owner", 1001, frozenset({1001})), User("member", 1002, frozenset({1002, 2000}))
    assert not can_traverse(0o607, 1001, 2000, owner) and can_traverse(0o700, 1001, 2000, owner)
    assert not can_traverse(0o767, 1001, 2000, member) and can_traverse(0o010, 1001, 2000, member)
    assert not can_traverse(0o770, 1001, 2000, QEMU) and can_traverse(0o001, 1001, 2000, QEMU)
    st = private.stat()
    assert chmod_for(private, User("member", 1002, frozenset({st.st_gid}))) == f"chmod g+x {private}"


def test_a_symlink_on_the_way_is_judged_along_its_target_too(tmp_path: Path) -> None:
    private, disks = tree(tmp_path, 0o700)
    (tmp_path / "link").symlink_to(disks)
    assert untraversable(tmp_path / "link", QEMU) == [private]


def test_system_qemu_uris() -> None:
    assert is_system_qemu("qemu:///system") and is_system_qemu("qemu+unix:///system")
    assert not is_system_qemu("qemu:///session") and not is_system_qemu("qemu+tcp://other/system")
    assert not is_system_qemu("qemu:///embed?root=/x") and not is_system_qemu("test:///default")


def host(name: str, uri: str, hostname: str) -> Host:
    now = datetime.now(UTC)
    return Host(name=name, state=HostState.UP, heartbeat_at=now, started_at=now, pid=1, libvirt_uri=uri, cpus=4,
                memory_mib=4096, vms=0, hostname=hostname, libvirt_ok=True)


def test_the_doctor_fails_a_system_libvirt_host_whose_disks_qemu_cannot_reach(tmp_path: Path) -> None:
    """VMORCH_HOME under a 0700 directory, --libvirt-uri qemu:///system: every launch fails 'Permission denied'."""
    private, disks = tree(tmp_path, 0o700)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", home=private / "home")
    here = socket.gethostname()
    hosts = [host("h1", "qemu:///system", here),
             host("h2", "qemu:///system", "elsewhere"),  # another machine: its disks are not here to look at
             host("h3", "test:///default", here)]  # no system libvirtd
    [check] = d._system_qemu_storage(settings, hosts)
    assert (check.name, check.status) == ("storage h1", d.Status.FAIL)
    assert str(private) in check.message and "Permission denied" in check.message
    assert f"chmod o+x {private}" in check.fix and "/var/lib/vmorch" in check.fix
    private.chmod(0o711)
    [check] = d._system_qemu_storage(settings, hosts)
    assert check.status is d.Status.OK and str(disks) in check.message
    # a worker given another --storage-dir: the default one doesn't exist, and nothing is judged
    assert d._system_qemu_storage(settings.model_copy(update={"home": tmp_path / "other"}), hosts) == []


def test_the_qemu_user_is_the_one_qemu_conf_names(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "nobody"\nuser = "root"\n')
    assert qemu_user(conf=conf).uid == 0  # root traverses everything: nothing to report
    conf.write_text('# user = "root"\n')
    assert qemu_user(("no-such-user-here",), conf=conf) == User("no-such-user-here", None, frozenset())
    assert qemu_user(conf=tmp_path / "absent").name in ("libvirt-qemu", "qemu")
    assert is_system_qemu("qemu:///system?socket=/tmp/x/libvirt-sock") is False  # a daemon of its own
