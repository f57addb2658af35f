"""The baseline of B7–B9: test guests defined, started and reached through their agents on a direct
libvirt connection, with no vmorch in between, in a process of its own.

    python -m bench.direct_guests ROOT STORAGE IMAGE VIRT_TYPE

A process of its own because libvirt allows one embedded QEMU root per process (a worker is a
process too). It makes each guest as vmorch's launch does, without the queue, locks or records: a
qcow2 overlay of the image (``qemu-img create``), a cloud-init seed (``worker.cloudinit``), the
domain XML from ``worker.domxml`` with the same arguments, ``defineXML`` + ``create``; then it polls
``guest-ping`` (``libvirt_qemu.qemuAgentCommand``) every ``PING_EVERY_S``, as ``worker.agent`` does.

It reads one JSON request a line on stdin and answers each with one JSON line on stdout
(``{"error": ...}`` if it failed):

* ``{"op": "boot", "names": [...], "memory_mib": M, "timeout": S}`` -> ``{"took": s, "started": s,
  "ready": {name: s}}``: from the first disk made to the last agent that answered (``started``: to
  the last domain started; ``ready``: each agent's first answer);
* ``{"op": "exec", "name": N, "argv": [...]}`` -> ``{"took": s, "exit_code": c}``: ``guest-exec``,
  then ``guest-exec-status`` at once and on ``worker.execs``' schedule until it exited;
* ``{"op": "delete", "names": [...]}`` -> ``{}``: destroyed, undefined, files removed.

On end of input or SIGTERM every domain it made is destroyed and undefined.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from orchestrator.model.errors import VmorchError
from worker import agent, cloudinit, domxml, execs
from worker.eventloop import ensure_event_loop

#: as ``worker.agent`` polls ``guest-ping`` while it waits for an agent
PING_EVERY_S = 0.25
#: the shortest interval of ``worker.execs`` between two ``guest-exec-status``
#: the disk vmorch's launch makes by default (``LaunchParams.disk_gib``), if the image is smaller
DISK_GIB = 1
_QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'
_UNDEFINE = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE


def _agent(dom: libvirt.virDomain, execute: str, **arguments: Any) -> Any:
    message = {"execute": execute, "arguments": arguments} if arguments else {"execute": execute}
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), 5, 0))["return"]


class Guests:
    def __init__(self, root: Path, storage: Path, image: Path, virt_type: str) -> None:
        ensure_event_loop()
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "qemu.conf").write_text(_QEMU_CONF)
        self.uri = f"qemu:///embed?root={root}"
        # the agent sockets where a worker with this root would put them (a deep root's do not fit)
        self.sockets = agent.socket_dir(self.uri)
        domxml.use_agent_socket_dir(self.sockets)
        self.conn = libvirt.open(self.uri)
        self.storage = storage
        (storage / "images").mkdir(parents=True, exist_ok=True)
        # a copy made now, as vmorch's import makes one: both sides boot from a file just written
        self.image = storage / "images" / "guest.qcow2"
        shutil.copyfile(image, self.image)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(self.image)], check=True,
                                         capture_output=True, text=True).stdout)
        self.size = max(DISK_GIB * 1024**3, int(info["virtual-size"]))
        self.virt_type = virt_type
        self.doms: dict[str, libvirt.virDomain] = {}

    def _start(self, name: str, memory_mib: int) -> libvirt.virDomain:
        disk = self.storage / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image), "-F", "qcow2", str(disk),
                        str(self.size)], check=True, stdin=subprocess.DEVNULL)
        seed = cloudinit.build_seed(domxml.seed_for(disk), instance_id=f"direct-{name}", hostname=name)
        xml = domxml.domain_xml(name=name, virt_type=self.virt_type, memory_mib=memory_mib, vcpus=1, disk=str(disk),
                                meta=domxml.VmorchMeta("direct", name, disk=str(disk)), seed=str(seed),
                                console_log=str(domxml.console_log_path(self.storage, name)))
        dom = self.conn.defineXML(xml)
        self.doms[name] = dom
        dom.create()
        return dom

    def boot(self, names: list[str], memory_mib: int, timeout: float) -> dict[str, Any]:
        t = time.perf_counter()
        pending = {name: self._start(name, memory_mib) for name in names}
        started = time.perf_counter() - t
        ready: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while True:
            for name, dom in list(pending.items()):
                with contextlib.suppress(libvirt.libvirtError):
                    _agent(dom, "guest-ping")
                    ready[name] = time.perf_counter() - t
                    del pending[name]
            if not pending:
                return {"took": time.perf_counter() - t, "started": started, "ready": ready}
            if time.monotonic() > deadline:
                raise TimeoutError(f"no agent answered in {sorted(pending)} within {timeout:g} s")
            time.sleep(PING_EVERY_S)

    def exec(self, name: str, argv: list[str]) -> dict[str, Any]:
        dom = self.doms[name]
        t = time.perf_counter()
        pid = _agent(dom, "guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})["pid"]
        poll = execs.POLL_MIN_S  # the worker's schedule: the comparison is of everything else
        while not (status := _agent(dom, "guest-exec-status", pid=pid))["exited"]:
            time.sleep(poll)
            poll = min(poll * 1.5, execs.POLL_MAX_S)
        return {"took": time.perf_counter() - t, "exit_code": status.get("exitcode")}

    def delete(self, names: list[str]) -> dict[str, Any]:
        for name in names:
            dom = self.doms.pop(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefineFlags(_UNDEFINE)
            disk = self.storage / f"{name}.qcow2"
            for path in (disk, domxml.seed_for(disk), domxml.console_log_path(self.storage, name)):
                path.unlink(missing_ok=True)
        return {}

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError, KeyError):
            self.delete(list(self.doms))
        self.conn.close()
        if self.sockets is not None:
            with contextlib.suppress(OSError):
                self.sockets.rmdir()


def serve(guests: Guests) -> None:
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "boot":
                reply = guests.boot(req["names"], req["memory_mib"], req["timeout"])
            elif req["op"] == "exec":
                reply = guests.exec(req["name"], req["argv"])
            else:
                reply = guests.delete(req["names"])
        except (libvirt.libvirtError, VmorchError, OSError, subprocess.SubprocessError, TimeoutError, KeyError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


def _terminate(_sig: int, _frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> None:
    root, storage, image, virt_type = argv
    signal.signal(signal.SIGTERM, _terminate)
    guests = Guests(Path(root), Path(storage), Path(image), virt_type)
    try:
        print(json.dumps({"ready": True}), flush=True)
        serve(guests)
    finally:
        guests.close()


if __name__ == "__main__":
    main(sys.argv[1:])
