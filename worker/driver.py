"""The libvirt driver of the host agent: the only class that operates domains.

``Driver`` is assembled from one part per concern, each its own module:

* ``libvirtconn`` -- the connection (one per process, reopened after a libvirtd restart),
  looking at domains, vmorch's metadata in them, libvirt errors as vmorch errors;
* ``lifecycle`` -- launch, start, stop, kill, pause, resume, reboot, delete, resizing;
* ``disks`` -- the qcow2 disks vmorch creates, and snapshots;
* ``moving`` -- export, import and live migration for ``vm move``.

Every operation is idempotent (a redelivered job must change the VM at most once), never lets
a ``libvirtError`` escape, and returns a typed result (``worker.results``).
"""

from __future__ import annotations

from .disks import Snapshots
from .libvirtconn import DomainStatus
from .lifecycle import DomainSpec, Lifecycle
from .moving import Moving
from .results import DriverResult

__all__ = ["DomainSpec", "DomainStatus", "Driver", "DriverResult"]


class Driver(Lifecycle, Snapshots, Moving):
    """One libvirt connection per process, shared by the worker's threads, and every operation on domains."""
