"""``python -m orchestrator.localcluster``: the processes ``vmorch up`` and ``vmorch down`` start.

* ``supervise``       -- the supervisor of ``up --detach`` (control.py starts it).
* ``destroy-domains`` -- powers off one embedded QEMU root's domains (stopping.py starts one per host).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from orchestrator.localcluster.environment import resolved
from orchestrator.localcluster.supervisor import Supervisor
from orchestrator.localcluster.timeouts import DOMAINS_STOP_TIMEOUT
from orchestrator.model.errors import VmorchError
from orchestrator.model.records import VmState
from orchestrator.model.settings import Settings


def _log_event(line: str) -> None:
    print(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}", flush=True)


def _host_arg(value: str) -> tuple[str, str]:
    name, sep, uri = value.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=URI, got {value!r}")
    return name, uri


def _supervise(args: argparse.Namespace) -> int:
    Supervisor(Settings(), args.host, api_port=args.api_port, on_event=_log_event).run()
    return 0


def _destroy_domains(args: argparse.Namespace) -> int:
    """One embedded root per process: stop that root's running domains, print how many."""
    from worker.driver import Driver  # libvirt stays out of every other process of this package
    from worker.main import default_storage

    active = {VmState.RUNNING, VmState.PAUSED}
    driver = Driver(args.libvirt_uri, default_storage(resolved(Settings()), args.host))
    try:
        running = [s.domain for s in driver.list_domains() if s.state in active]
        # Opening a root makes libvirt reconnect to surviving QEMUs in background threads; a
        # destroy racing that kills QEMU yet reports "not running". Trust the state, not the count.
        deadline = time.monotonic() + DOMAINS_STOP_TIMEOUT / 2
        while True:
            driver.destroy_all()
            left = [s.domain for s in driver.list_domains() if s.state in active]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    finally:
        driver.close()
    if os.geteuid() == 0:  # the bridges and DHCP servers of its networks (a worker made them as root)
        from worker import vmnet

        vmnet.take_down_all(default_storage(resolved(Settings()), args.host).parent / "net")
    if left:
        print(f"still running: {', '.join(left)}", file=sys.stderr)
        return 1
    print(len(running), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.localcluster",
                                     description="internal entry points of 'vmorch up' (home: VMORCH_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="run the supervisor in the foreground")
    sup.add_argument("--host", type=_host_arg, action="append", required=True, metavar="NAME=URI")
    sup.add_argument("--api-port", type=int)
    sup.set_defaults(func=_supervise)
    dom = sub.add_parser("destroy-domains", help="power off the running domains of one embedded QEMU root")
    dom.add_argument("--host", required=True)
    dom.add_argument("--libvirt-uri", required=True)
    dom.set_defaults(func=_destroy_domains)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VmorchError as exc:
        _log_event(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return 1


if __name__ == "__main__":
    sys.exit(main())
