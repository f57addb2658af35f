"""The guest's Debian packages: which ones and which versions (resolved with ``apt-cache``, remembered
until the apt lists change), fetching them with ``apt-get download`` into the cache, and unpacking
them with ``dpkg-deb -x``; nothing is installed on the host. Also the recipe hash of the cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .guesttools import GuestImageError, _run

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
AGENT = "qemu-guest-agent"


# --------------------------------------------------------------------------- package resolution


def _apt_depends(pkgs: Iterable[str]) -> dict[str, list[str]]:
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                "--no-replaces", "--no-enhances", *pkgs])
    deps: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = deps.setdefault(line.strip(), [])
            continue
        m = re.match(r"\s+\|?(?:Pre)?Depends:\s+(\S+)", line)
        if m and not m.group(1).startswith("<"):
            current.append(m.group(1))
    return deps


def _kernel_package() -> str:
    for dep in _apt_depends([KERNEL_META]).get(KERNEL_META, []):
        if re.fullmatch(r"linux-image-[0-9].*-amd64", dep):
            return dep
    raise GuestImageError(f"cannot resolve {KERNEL_META} to a versioned kernel package (run apt-get update)")


def _library_closure(root: str) -> list[str]:
    """The shared-library packages ``root`` needs, recursively (lib*, zlib*)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        deps = _apt_depends(todo)
        todo = []
        for dep in (d for ds in deps.values() for d in ds):
            if dep not in seen and re.match(r"(lib|zlib)", dep) and not dep.endswith(("-dev", "-perl")):
                seen.add(dep)
                todo.append(dep)
    return sorted(seen)


def _candidates(pkgs: Iterable[str]) -> dict[str, str]:
    names = sorted(set(pkgs))
    out = _run(["apt-cache", "policy", *names])
    versions: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        m = re.match(r"\s+Candidate:\s+(\S+)", line)
        if m and current:
            versions[current] = m.group(1)
    for name in names:
        if versions.get(name, "(none)") == "(none)":
            raise GuestImageError(f"Debian package {name} has no installable version (run apt-get update)")
    return versions


def _apt_fingerprint() -> str:
    """Changes whenever ``apt-get update`` changes the package lists."""
    h = hashlib.sha256()
    for base in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        with contextlib.suppress(OSError):
            for p in sorted(base.rglob("*")):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Plan:
    kernel: str
    libs: tuple[str, ...]
    versions: dict[str, str]

    @property
    def packages(self) -> list[str]:
        return [self.kernel, BUSYBOX, AGENT, *self.libs]

    def key(self) -> str:
        h = hashlib.sha256(_recipe_hash().encode())
        for name in sorted(self.versions):
            h.update(f"{name}={self.versions[name]}\n".encode())
        return h.hexdigest()[:16]


def _recipe_hash() -> str:
    """The builder's own source: every ``guest*.py`` module of this package, so that a change in any
    of them (not only in this file) makes a new image."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("guest*.py")):
        h.update(f"{path.name}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _resolve(cache: Path) -> _Plan:
    """Package names and versions; remembered until the apt lists change."""
    memo = cache / "resolved.json"
    fingerprint = _apt_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["fingerprint"] == fingerprint and saved["recipe"] == _recipe_hash():
            return _Plan(saved["kernel"], tuple(saved["libs"]), dict(saved["versions"]))
    kernel = _kernel_package()
    libs = tuple(_library_closure(AGENT))
    plan = _Plan(kernel, libs, _candidates([kernel, BUSYBOX, AGENT, *libs]))
    _write_atomic(memo, json.dumps({"fingerprint": fingerprint, "recipe": _recipe_hash(), "kernel": kernel,
                                    "libs": list(libs), "versions": plan.versions}, indent=1).encode())
    return plan


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _deb_path(debs: Path, name: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{_glob_escape(name)}_{_glob_escape(quoted)}_*.deb"))
    return found[0] if found else None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _download(plan: _Plan, debs: Path, tmp: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    missing = [n for n in plan.packages if _deb_path(debs, n, plan.versions[n]) is None]
    if missing:
        dl = tmp / "download"
        dl.mkdir()
        _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download",
              *(f"{n}={plan.versions[n]}" for n in missing)], cwd=dl)
        for deb in dl.glob("*.deb"):
            os.replace(deb, debs / deb.name)
    out: dict[str, Path] = {}
    for name in plan.packages:
        path = _deb_path(debs, name, plan.versions[name])
        if path is None:
            raise GuestImageError(f"apt-get download did not fetch {name}={plan.versions[name]}")
        out[name] = path
    # old versions of our packages are dead weight (a kernel is 70 MB)
    keep = set(out.values())
    for name in plan.packages:
        for old in debs.glob(f"{_glob_escape(name)}_*.deb"):
            if old not in keep and old.name.split("_")[0] == name:
                with contextlib.suppress(OSError):
                    old.unlink()
    return out


def _extract(plan: _Plan, debs: dict[str, Path], tmp: Path) -> Path:
    """Unpack the plan's packages into one root directory under ``tmp``."""
    root = tmp / "root"
    root.mkdir()
    for name in plan.packages:
        _run(["dpkg-deb", "-x", str(debs[name]), str(root)])
    return root
