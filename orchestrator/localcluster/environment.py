"""What every part of the local cluster shares: its settings, its children's environment, its reports."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.model.errors import ClusterUnavailable
from orchestrator.model.settings import Settings

#: where each step reports what it does, one line at a time
OnEvent = Callable[[str], None]

_NO_REDIS_HINT = "install it: apt-get install redis-server (or run scripts/install.sh)"
# The code this package is part of (<root>/orchestrator/localcluster/): children must import
# the same orchestrator/worker packages.
_CODE_ROOT = Path(__file__).resolve().parents[2]


def resolved(settings: Settings) -> Settings:
    # Children run in another cwd and embedded QEMU roots must be absolute.
    return settings.model_copy(update={"home": Path(settings.home).expanduser().resolve()})


def redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ClusterUnavailable("redis-server not found", hint=_NO_REDIS_HINT)
    return path


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child: this process's, plus ``settings`` as VMORCH_* variables.

    ``settings`` may have been built from keywords (tests, the CLI's options), which a child
    would not see otherwise.
    """
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if name != "redis_url" and value is not None:
            env[f"VMORCH_{name.upper()}"] = str(value)
    env.pop("VMORCH_REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_CODE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def own_command(*args: str) -> list[str]:
    """The command line of this package's entry points (``__main__.py``), for a child process."""
    return [sys.executable, "-m", "orchestrator.localcluster", *args]
