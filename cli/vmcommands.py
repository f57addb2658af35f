"""``vmorch vm``: the VM commands (vms.py) and the commands into the guest (guest.py), one group."""

from __future__ import annotations

from . import guest, vms

guest.register(vms.app)  # vm log, console, exec, cp
app = vms.app
