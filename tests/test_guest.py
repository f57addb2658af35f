"""Into the guest, on real QEMU: the boot in ``vm log``, the agent's addresses in ``vm show``,
``vm exec`` (output, exit codes, a timeout, after ``vm set``) and ``vm cp``, all as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.model.settings import Settings

from .conftest import run_cli
from .guestvm import BOOT_MARKER, GuestCluster, domain_xml_file, guest_cluster

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

VM = "g1"
IMAGE = f"img{os.getpid() % 10000}"  # not containing the namespace: the image is not the namespace's


@pytest.fixture(scope="module")
def booted(base_settings: Settings, guest_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[GuestCluster]:
    """One host (its accelerator probed, not forced) and one test guest on it, booted once for the module."""
    with guest_cluster(base_settings, tmp_path_factory.mktemp("guest"), f"guest{os.getpid() % 10000}",
                       {"gh1": {}}) as cluster:
        cluster.import_image(IMAGE, guest_image)
        launched = time.monotonic()
        cluster.launch(VM, host="gh1", image=IMAGE)
        to_marker = cluster.wait_console(VM, BOOT_MARKER)
        to_agent = cluster.wait_agent(VM)
        print(f"\nboot through vmorch: console marker {to_marker:.1f}s after the launch job, agent connected "
              f"{to_agent:.1f}s later ({time.monotonic() - launched:.1f}s from submitting the launch)")
        yield cluster


def cli(cluster: GuestCluster, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    done = run_cli(cluster.settings, *args, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_the_boot_shows_in_vm_log(booted: GuestCluster) -> None:
    code, out, err = cli(booted, "vm", "log", VM)
    assert code == 0, err
    assert BOOT_MARKER in out and "SYSLINUX" in out
    code, out, _ = cli(booted, "vm", "log", VM, "--tail", "2")
    assert code == 0 and 1 <= len(out.splitlines()) <= 2 and BOOT_MARKER not in out
    assert cli(booted, "vm", "log", "nosuchvm")[0] == 3


def test_host_reports_its_accelerator_and_the_domain_has_its_type(booted: GuestCluster) -> None:
    code, out, _ = cli(booted, "--json", "host", "list")
    [host] = [h for h in json.loads(out) if h["name"] == "gh1"]
    assert host["accel"] in ("kvm", "tcg") and host["accel_reason"] and "forced" not in host["accel_reason"]
    xml = domain_xml_file(booted.workers[0], f"{booted.namespace}.{VM}")
    assert f"<domain type='{'kvm' if host['accel'] == 'kvm' else 'qemu'}'" in xml
    assert "<vcpu placement='static' current='1'>8</vcpu>" in xml
    assert "org.qemu.guest_agent.0" in xml and "<serial type='pty'>" in xml
    code, out, _ = cli(booted, "host", "show", "gh1")
    assert code == 0 and any(line.split()[:2] == ["accel", host["accel"]] for line in out.splitlines())


def test_vm_show_reports_the_agent_and_the_guests_addresses(booted: GuestCluster) -> None:
    deadline = time.monotonic() + 60
    while True:
        code, out, _ = cli(booted, "--json", "vm", "show", VM)
        shown = json.loads(out)
        if shown["addresses"] or time.monotonic() > deadline:
            break
        time.sleep(1)  # udhcpc may take a few seconds more than the agent
    assert shown["agent"] == "connected"
    assert {"ip": "10.0.2.15", "mac": shown["addresses"][0]["mac"]} in shown["addresses"]
    assert shown["addresses"][0]["mac"].startswith("52:54:00:")
    code, out, _ = cli(booted, "vm", "show", VM)
    assert code == 0 and "connected" in out and "10.0.2.15" in out


def test_exec_prints_the_output_and_exits_with_the_commands_code(booted: GuestCluster) -> None:
    code, out, err = cli(booted, "vm", "exec", VM, "--", "echo", "hello from", "the guest")
    assert (code, out) == (0, "hello from the guest\n"), err
    code, out, err = cli(booted, "vm", "exec", VM, "--", "sh", "-c", "echo out; echo oops >&2; exit 3")
    assert (code, out, err) == (3, "out\n", "oops\n")
    code, out, _ = cli(booted, "vm", "exec", VM, "--input", "fed on stdin", "--", "cat")
    assert (code, out) == (0, "fed on stdin")
    code, out, _ = cli(booted, "--json", "vm", "exec", VM, "--", "sh", "-c", "head -c 70000 /dev/zero | tr '\\0' x")
    result = json.loads(out)["result"]
    assert code == 0 and len(result["stdout"]) == 64 * 1024 and result["stdout_truncated"]
    assert not result["stderr_truncated"] and result["exit_code"] == 0


def test_exec_fails_clearly_on_timeout_and_on_a_missing_program(booted: GuestCluster) -> None:
    started = time.monotonic()
    code, _, err = cli(booted, "vm", "exec", VM, "--timeout", "2", "--", "sleep", "30")
    assert code == 1 and "did not finish within 2s" in err and "still runs in the guest" in err
    assert time.monotonic() - started < 25
    code, _, err = cli(booted, "vm", "exec", VM, "--", "no-such-program")
    assert code == 1 and "cannot run 'no-such-program'" in err
    # the sleep still runs: the agent can't stop it (said so in the error)
    code, out, _ = cli(booted, "vm", "exec", VM, "--", "ps")
    assert code == 0 and "sleep 30" in out, out


def test_exec_over_a_range_gives_a_summary(booted: GuestCluster) -> None:
    booted.launch("plain", host="gh1", image=None, memory_mib=64, disk_gib=0)  # no OS: no agent
    try:
        code, out, _ = cli(booted, "vm", "exec", f"{VM},plain", "--timeout", "3", "--", "echo", "hi")
        assert code == 1
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert rows[VM].split()[2:4] == ["0", "hi"] and "did not answer" in rows["plain"], out
    finally:
        assert cli(booted, "vm", "delete", "plain", "--wait")[0] == 0


def test_cp_copies_files_in_and_out(booted: GuestCluster, tmp_path: Path) -> None:
    local = tmp_path / "notes.txt"
    local.write_bytes(bytes(range(256)) * 300)  # binary, 75 KiB: more than one chunk
    code, _, err = cli(booted, "vm", "cp", str(local), f"{VM}:/tmp/")
    assert code == 0, err
    code, out, _ = cli(booted, "vm", "exec", VM, "--", "md5sum", "/tmp/notes.txt")
    assert code == 0 and out.split()[0] == __import__("hashlib").md5(local.read_bytes()).hexdigest()
    back = tmp_path / "back"
    back.mkdir()
    code, _, err = cli(booted, "vm", "cp", f"{VM}:/tmp/notes.txt", str(back))
    assert code == 0, err
    assert (back / "notes.txt").read_bytes() == local.read_bytes()
    code, _, err = cli(booted, "vm", "cp", f"{VM}:/no/such/file", str(back))
    assert code == 1 and "cannot open /no/such/file" in err
    assert cli(booted, "vm", "cp", str(local), str(back))[0] == 2  # neither side in a guest


def test_set_memory_then_exec_free_sees_it_live_and_after_a_restart(booted: GuestCluster) -> None:
    """``set`` and ``exec`` run in their order: the exec sees the new memory. Shrinking a running
    guest goes through its balloon driver (virtio_balloon, in the test image), so ``free`` in the
    guest shows it at once; the next boot has it too (the definition changed)."""
    assert run_cli(booted.settings, "vm", "set", VM, "--memory", "200").returncode == 0  # no --wait
    code, out, err = cli(booted, "vm", "exec", VM, "--", "free", "-m")
    assert code == 0, err
    live_total = int(out.splitlines()[1].split()[1])
    assert booted.client.vm(booted.namespace, VM).memory_mib == 200
    # the kernel keeps some 50 MiB to itself: 256 MiB shows about 204 in free, 200 MiB about 148
    assert 100 < live_total < 180, live_total
    for args in (("kill", VM, "--wait"), ("start", VM, "--wait")):
        assert cli(booted, "vm", *args)[0] == 0
    booted.wait_console(VM, BOOT_MARKER, count=2)
    code, out, err = cli(booted, "vm", "exec", VM, "--timeout", "120", "--", "free", "-m")
    assert code == 0, err
    total = int(out.splitlines()[1].split()[1])
    assert abs(total - live_total) < 20, (live_total, total)


def test_experiment_steps_may_exec() -> None:
    from orchestrator.model.experiment import parse

    text = ("name: x\nvms:\n  - name: web[1-2]\nsteps:\n  - op: exec\n    target: web[1-2]\n"
            "    params: {command: [uname, -a], timeout_s: 30}\n"
            "  - op: exec\n    target: web1\n    params: {command: []}\n")
    _, problems = parse(text)
    assert [(p.line, p.field) for p in problems] == [(10, "steps[1].params")]
    assert "at least 1 item" in problems[0].message
