"""``vm stop`` and ``vm reboot`` on a real guest, as a user runs them: the request repeated until the
guest acts (a press made while it boots is lost), ``--force`` at once, ``--timeout 0``, a reboot that
really happened (a second boot in ``vm log``, the guest's uptime reset), and a guest that ignores the
request (no OS) failing clearly."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.model.records import VmState
from orchestrator.model.settings import Settings

from .conftest import run_cli
from .guestvm import BOOT_MARKER, GuestCluster, guest_cluster

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

VM = "lc1"
IMAGE = f"lcimg{os.getpid() % 10000}"
BOOT_BANNER = "SYSLINUX"  # the boot loader's, once per boot (the marker comes only at the end of /init)


@pytest.fixture(scope="module")
def guests(base_settings: Settings, guest_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[GuestCluster]:
    with guest_cluster(base_settings, tmp_path_factory.mktemp("lifecycle"), f"lc{os.getpid() % 10000}",
                       {"lh1": {}}) as cluster:
        cluster.import_image(IMAGE, guest_image)
        yield cluster


def cli(cluster: GuestCluster, *args: str, timeout: float = 150) -> tuple[int, str, str]:
    done = run_cli(cluster.settings, *args, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def job_of(cluster: GuestCluster, *args: str) -> tuple[int, dict[str, Any], float]:
    """Run ``vmorch --json vm ARGS --wait``: its exit code, the final job, and the job's run time."""
    code, out, err = cli(cluster, "--json", "vm", *args, "--wait")
    assert out, err
    job = json.loads(out)
    job = job[0] if isinstance(job, list) else job
    ran = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    return code, job, ran


def state(cluster: GuestCluster, name: str = VM) -> VmState:
    return cluster.client.vm(cluster.namespace, name).state


def uptime(cluster: GuestCluster) -> float:
    code, out, err = cli(cluster, "vm", "exec", VM, "--timeout", "120", "--", "cat", "/proc/uptime")
    assert code == 0, err
    return float(out.split()[0])


def test_a_graceful_stop_right_after_the_launch_succeeds(guests: GuestCluster) -> None:
    """The launch job ends as QEMU starts: the first presses come while the guest boots, and are lost.
    The press is repeated until one lands."""
    guests.launch(VM, host="lh1", image=IMAGE)
    code, job, ran = job_of(guests, "stop", VM)
    assert code == 0 and job["state"] == "succeeded", job["error"]
    assert job["result"]["state"] == "shutoff" and "shutdown request" in job["result"]["note"]
    assert state(guests) is VmState.SHUTOFF
    print(f"\ngraceful stop right after launch: {ran:.1f}s, {job['result']['note']}")


def test_force_stop_is_immediate_whatever_the_timeout(guests: GuestCluster) -> None:
    assert cli(guests, "vm", "start", VM, "--wait")[0] == 0
    code, job, ran = job_of(guests, "stop", VM, "--force", "--timeout", "60")
    assert code == 0 and job["result"] == {"state": "shutoff", "changed": True, "note": "forced off"}, job
    assert ran < 5, f"--force took {ran:.1f}s: it must not wait out --timeout"
    print(f"\nstop --force --timeout 60: {ran:.2f}s")


def test_reboot_right_after_the_start_happens(guests: GuestCluster) -> None:
    """The request made while the guest boots is lost too: repeated, the reboot happens."""
    banners = guests.console_text(VM).count(BOOT_BANNER)
    assert cli(guests, "vm", "start", VM, "--wait")[0] == 0
    code, job, ran = job_of(guests, "reboot", VM)
    assert code == 0 and job["state"] == "succeeded", job["error"]
    assert job["result"]["note"].startswith("rebooted: the guest reset"), job["result"]
    guests.wait_console(VM, BOOT_BANNER, count=banners + 2)  # the start's boot, and the reboot's
    print(f"\nreboot right after start: {ran:.1f}s, {job['result']['note']}")


def wait_booted(cluster: GuestCluster, timeout: float = 120) -> None:
    """Until the guest's latest boot (its boot loader's banner) reached the marker."""
    deadline = time.monotonic() + timeout
    while BOOT_MARKER not in cluster.console_text(VM).rpartition(BOOT_BANNER)[2]:
        assert time.monotonic() < deadline, cluster.console_text(VM)[-2000:]
        time.sleep(0.2)


def test_reboot_of_a_booted_guest_really_reboots(guests: GuestCluster) -> None:
    wait_booted(guests)
    time.sleep(3)  # up a while: a reset uptime shows
    before, measured = uptime(guests), time.monotonic()
    markers = guests.console_text(VM).count(BOOT_MARKER)
    code, job, ran = job_of(guests, "reboot", VM)
    assert code == 0 and job["result"]["state"] == "running", job["error"]
    guests.wait_console(VM, BOOT_MARKER, count=markers + 1)
    code, out, _ = cli(guests, "vm", "log", VM)
    assert code == 0 and out.count(BOOT_MARKER) == markers + 1
    after = uptime(guests)
    not_rebooted = before + (time.monotonic() - measured)  # what uptime would say without a reboot
    assert after < not_rebooted - 5, (before, after, not_rebooted)
    print(f"\nreboot of a booted guest: {ran:.1f}s ({job['result']['note']}), uptime {before:.1f}s -> {after:.1f}s")


def test_stop_with_timeout_0_presses_once_and_does_not_wait(guests: GuestCluster) -> None:
    wait_booted(guests)
    code, job, ran = job_of(guests, "stop", VM, "--timeout", "0")
    assert code == 0, job["error"]
    assert job["result"]["state"] == "shutoff" or \
        job["result"]["note"] == "shutdown requested; not waited for (--timeout 0)", job["result"]
    assert ran < 3
    deadline = time.monotonic() + 30  # the one press lands on a booted guest: it powers off by itself
    while state(guests) is not VmState.SHUTOFF:
        assert time.monotonic() < deadline, "the guest did not power off after the press"
        time.sleep(0.5)
    print(f"\nstop --timeout 0: {ran:.2f}s, then off on its own")


def test_reboot_of_a_vm_without_an_os_fails_clearly(guests: GuestCluster) -> None:
    guests.launch("empty", host="lh1", image=None, memory_mib=64, disk_gib=0)
    try:
        started = time.monotonic()
        code, out, err = cli(guests, "vm", "reboot", "empty", "--timeout", "5", "--wait")
        took = time.monotonic() - started
        said = out + err
        assert code == 1
        assert ("reboot did not happen: the guest did not react to the reboot request within 5s "
                "(2 reboot requests, 3s apart)") in said, said
        assert "vm reboot --force" in said and "vm stop --force" in said
        code, job, ran = job_of(guests, "reboot", "empty", "--force")
        assert code == 0 and job["result"]["note"].startswith("reset"), job
        print(f"\nreboot of an OS-less VM: failed after {took:.1f}s (CLI); reboot --force: {ran:.2f}s")
    finally:
        assert cli(guests, "vm", "delete", "empty", "--wait")[0] == 0


def test_refusals_name_the_cli_options(guests: GuestCluster) -> None:
    for args in (("stop", VM, "--timeout", "-1"), ("reboot", VM, "--timeout", "3601")):
        code, _, err = cli(guests, "vm", *args)
        assert code == 2 and "--timeout" in err and "timeout_s" not in err, err
    code, _, err = cli(guests, "vm", "stop", VM, "--force", "--force-after-timeout")
    assert code == 2 and "give --force (at once) or --force-after-timeout" in err, err
