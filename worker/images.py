"""The host's image store: catalog images as standalone qcow2 files, content-addressed.

``<storage>/images/<sha256>.qcow2``, where the sha256 is of the bytes fetched from the image's
source. An import fetches into a temporary file of the store (an http(s) URL with httpx, streamed,
capped at ``VMORCH_IMAGE_MAX_MIB``; or ``file:///PATH``, which only an admin can ask for), checks
the sha256 if one was given, looks at the format with ``qemu-img info`` (never following a backing
file), converts raw to qcow2, and refuses an image that is anything but standalone: a backing file
(wherever it points), an external data file, or a format other than qcow2 and raw (a VMDK
descriptor, say, names files of its own). Only then is it published, read-only, under its name.

A VM's disk is an overlay whose backing file is one of these files (``worker.disks``): nothing from
outside the store reaches QEMU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from orchestrator.model.errors import ExecError, InvalidInput, InvalidState
from orchestrator.store.images import ImageRecords

from .disks import IMAGES_DIR, qemu_img

_SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 1024 * 1024
#: formats an import accepts: qcow2 as it is, raw converted; any other may name files of its own
FORMATS = ("qcow2", "raw")
_NOT_FILES = ("/proc/", "/sys/", "/dev/")
# one worker process per host writes its store: this orders publishing and removing within it
_store_lock = threading.Lock()


@dataclass(frozen=True)
class Prepared:
    """A checked, standalone qcow2 in the store's temporary space, ready to publish."""

    path: Path
    sha256: str
    source_format: str
    virtual_size: int


class HostImages:
    def __init__(self, storage_dir: Path) -> None:
        self.dir = Path(storage_dir) / IMAGES_DIR

    def path(self, sha256: str) -> Path:
        """Where the image with this sha256 lives in the store (it may not be there)."""
        if not _SHA256.fullmatch(sha256):
            raise InvalidState(f"not an image digest: {sha256[:80]!r}")
        return self.dir / f"{sha256}.qcow2"

    def resolve(self, sha256: str) -> Path:
        """The published image file, or a refusal: a regular file of the store, nothing else."""
        path = self.path(sha256)
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise InvalidState(f"image {sha256[:12]} is missing from this host's store ({self.dir})",
                               hint="import the image to this host again") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidState(f"{path} is not a regular file", hint="remove it and import the image again")
        return path

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # -- importing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary file name in the store (same filesystem: publishing is a rename), removed after."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self.dir / f".part-{secrets.token_hex(8)}"
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def fetch(self, source: str, into: Path, *, max_bytes: int, check: Callable[[], None]) -> str:
        """Copy ``source`` into ``into``; its sha256."""
        digest = hashlib.sha256()
        size = 0
        with into.open("wb") as out:
            for chunk in _read(source, max_bytes):
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInput(f"the image is larger than {max_bytes // 2**20} MiB",
                                       hint="raise VMORCH_IMAGE_MAX_MIB on the workers, or use a smaller image")
                digest.update(chunk)
                out.write(chunk)
                check()
        if size == 0:
            raise InvalidInput(f"{_shown(source)} is empty")
        return digest.hexdigest()

    def prepare(self, fetched: Path, sha256: str, out: Path, *, max_bytes: int) -> Prepared:
        """Check ``fetched`` and leave a standalone qcow2 of it at ``out`` (converted from raw)."""
        fmt, info = _probe(fetched)
        if fmt == "qcow2":
            _standalone(info, "the image")
            os.replace(fetched, out)
        else:
            qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(fetched), str(out))
            fetched.unlink(missing_ok=True)
        if out.stat().st_size > max_bytes:
            raise InvalidInput(f"the converted image is larger than {max_bytes // 2**20} MiB",
                               hint="raise VMORCH_IMAGE_MAX_MIB on the workers")
        chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", "-f", "qcow2", str(out)))
        if not isinstance(chain, list) or len(chain) != 1:
            raise InvalidInput("the image has a backing chain: imported images must be standalone",
                               hint="flatten it first ('qemu-img convert -O qcow2 IN OUT')")
        _standalone(chain[0], "the image")
        return Prepared(out, sha256, fmt, int(chain[0].get("virtual-size", 0)))

    def publish(self, prepared: Prepared) -> Path:
        """Put a prepared image in place, read-only (a file with its sha256 is already the same image)."""
        dest = self.path(prepared.sha256)
        with _store_lock:
            if dest.is_file():
                prepared.path.unlink(missing_ok=True)
            else:
                prepared.path.chmod(0o444)
                os.replace(prepared.path, dest)
        return dest

    def discard(self, sha256: str, still_needed: Callable[[], bool]) -> bool:
        """Remove the image file unless ``still_needed()`` (asked under the store's lock); whether it went."""
        if not _SHA256.fullmatch(sha256):
            return False
        with _store_lock:
            if still_needed():
                return False
            path = self.path(sha256)
            existed = path.exists()
            path.unlink(missing_ok=True)
            return existed


def _shown(source: str) -> str:
    return source if len(source) <= 120 else source[:120] + "..."


def _read(source: str, max_bytes: int) -> Iterator[bytes]:
    parts = urlsplit(source)
    if parts.scheme.lower() == "file":
        yield from _read_file(Path(unquote(parts.path)))
        return
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidInput(f"cannot fetch {_shown(source)}: not an http(s) or file URL")
    import httpx  # only an import pays for it

    timeout = httpx.Timeout(60.0, connect=10.0)
    try:
        with httpx.stream("GET", source, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ExecError(f"fetching {_shown(source)} answered HTTP {response.status_code}",
                                hint="check the URL, and that this host can reach it")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise InvalidInput(f"the image is {int(length) // 2**20} MiB, more than {max_bytes // 2**20} MiB",
                                   hint="raise VMORCH_IMAGE_MAX_MIB on the workers, or use a smaller image")
            yield from response.iter_bytes(CHUNK)
    except httpx.HTTPError as exc:
        raise ExecError(f"cannot fetch {_shown(source)}: {exc}", hint="check the URL, and that this host "
                                                                      "can reach it") from None


def _read_file(path: Path) -> Iterator[bytes]:
    if not path.is_absolute() or str(path).startswith(_NOT_FILES):
        raise InvalidInput(f"cannot import {path}: not a regular file of this host")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ExecError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidInput(f"cannot import {path}: not a regular file")
        while chunk := f.read(CHUNK):
            yield chunk


def _probe(path: Path) -> tuple[str, dict[str, Any]]:
    """The format qemu-img sees, without opening any backing file (no --backing-chain here)."""
    info = json.loads(qemu_img("info", "--output=json", str(path)))
    fmt = str(info.get("format", ""))
    if fmt not in FORMATS:
        raise InvalidInput(f"the image's format is {fmt or 'unknown'}: vmorch imports {' and '.join(FORMATS)}",
                           hint="convert it first ('qemu-img convert -O qcow2 IN OUT')")
    return fmt, info


def _standalone(info: dict[str, Any], what: str) -> None:
    """Refuse a backing file (wherever it points) or an external data file."""
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise InvalidInput(f"{what} has a backing file ({str(backing)[:200]}): imported images must be "
                           f"standalone", hint="flatten it first ('qemu-img convert -O qcow2 IN OUT')")
    data = ((info.get("format-specific") or {}).get("data") or {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise InvalidInput(f"{what} keeps its data in another file ({data.get('data-file')}): imported images "
                           f"must be standalone", hint="flatten it first ('qemu-img convert -O qcow2 IN OUT')")


def catalog_image(records: ImageRecords, storage_dir: Path, host: str, name: str) -> Path:
    """The store file of catalog image ``name`` on this host, where a VM's disk may be made from it."""
    image = records.get(name)
    if image is None:
        raise InvalidState(f"image {name!r} is not in the catalog any more",
                           hint="see 'vmorch image list'; an admin adds one with 'vmorch image import'")
    if image.hosts.get(host) != "ready" or not image.sha256:
        raise InvalidState(f"image {name!r} is not ready on host {host} ({image.hosts.get(host, 'not imported')})",
                           hint=f"import it there ('vmorch image import {name} SOURCE --host {host}')")
    return HostImages(storage_dir).resolve(image.sha256)
