"""A loopback HTTP server for image imports in tests, and the images it serves (the real guest, and
hostile ones made with qemu-img)."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class ImageServer:
    url: str
    dir: Path

    def add(self, name: str, path: Path) -> str:
        """Serve a copy of ``path`` as ``name``; its URL."""
        shutil.copyfile(path, self.dir / name)
        return f"{self.url}/{name}"


@contextmanager
def serving(directory: Path) -> Iterator[ImageServer]:
    directory.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, name="image-server", daemon=True)
    thread.start()
    try:
        yield ImageServer(f"http://127.0.0.1:{server.server_address[1]}", directory)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def hostile_backed(directory: Path, name: str, backing: str = "/etc/hostname", fmt: str = "raw") -> Path:
    """A qcow2 whose backing file is a host file: what an import must refuse."""
    path = directory / name
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, str(path), "64M")
    return path
