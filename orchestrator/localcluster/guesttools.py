"""The guest image builder's host tools (Debian packages it runs, never installs) and its one error."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: host tool -> the Debian package that provides it
HOST_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "qemu-img": "qemu-utils",
}

_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class GuestImageError(RuntimeError):
    """The image cannot be built; the message says why in one line."""


def _which(tool: str) -> str:
    found = shutil.which(tool, path=_TOOL_PATH)
    if found is None:
        pkg = HOST_TOOLS.get(tool, tool)
        raise GuestImageError(f"host tool {tool!r} is missing: install the Debian package {pkg} "
                              f"(apt-get install {pkg})")
    return found


def _check_tools() -> None:
    for tool in HOST_TOOLS:
        _which(tool)


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    argv = [_which(argv[0]), *argv[1:]]
    merged = {**os.environ, "LC_ALL": "C", **(env or {})}
    proc = subprocess.run(argv, cwd=cwd, env=merged, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise GuestImageError(f"{' '.join(argv[:3])}... failed (exit {proc.returncode}): {err}")
    return proc.stdout
