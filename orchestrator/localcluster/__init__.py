"""The embedded local cluster behind ``vmorch up`` / ``vmorch down``.

One *supervisor* process owns everything it starts: a private ``redis-server`` on a free
loopback port and one worker per host (``python -m worker --host hostK``). It restarts
what crashes, keeps ``<home>/cluster.json`` current (that file is how every other
``vmorch`` command with the same ``VMORCH_HOME`` finds the cluster), and on SIGTERM or
SIGINT stops everything in reverse order: workers, their QEMU domains, Redis.

Files under ``<home>``:

* ``cluster.json``     -- URLs and PIDs of the running cluster; written atomically, removed on stop.
* ``supervisor.lock``  -- flock held by the supervisor for its whole life; holds "<pid> <start ticks>".
* ``.vmorch-home``     -- marker: vmorch created this directory, so ``down --purge`` may delete it.
* ``logs/``, ``redis/`` (AOF), ``hosts/<name>/`` (embedded QEMU roots, disks).

Only processes this package started are ever signalled: PIDs are recorded together with
their start time (``/proc/<pid>/stat``), so a recycled PID is never mistaken for ours.

The names below are the public API; the modules of this package are its internals.
"""

from orchestrator.localcluster.control import down, status, up
from orchestrator.localcluster.plan import default_libvirt_uri
from orchestrator.localcluster.state import ClusterHost, ClusterInfo
from orchestrator.localcluster.supervisor import Supervisor

__all__ = ["ClusterHost", "ClusterInfo", "Supervisor", "default_libvirt_uri", "down", "status", "up"]
