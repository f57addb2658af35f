"""Whether the QEMU of a system libvirtd can reach a directory: which of its parents it can't traverse.

libvirtd on ``qemu:///system`` runs QEMU as an unprivileged user (``libvirt-qemu`` on Debian,
``qemu`` on Fedora). It chowns the disk files it is given, but not the directories above them:
a disk under a 0700 directory (``/root/...``) can't be opened, and every launch fails with
"Permission denied". The answer is computed from the directories' modes and the user's uid and
groups, not with ``os.access`` (which answers for the caller, root here). ACLs are not read.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

#: the users libvirt's QEMU driver runs QEMU as, by distribution (qemu.conf's ``user``)
QEMU_USERS = ("libvirt-qemu", "qemu")


@dataclass(frozen=True)
class User:
    name: str
    #: None: no such user here; judged as "others" (a uid and groups no directory has)
    uid: int | None
    gids: frozenset[int]


#: where the system libvirtd's QEMU driver reads the user it runs QEMU as
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
_CONF_USER = re.compile(r'^\s*user\s*=\s*"([^"]+)"', re.MULTILINE)


def qemu_user(candidates: tuple[str, ...] = QEMU_USERS, conf: Path = QEMU_CONF) -> User:
    """The user QEMU runs as: qemu.conf's ``user`` if set, else the first of ``candidates`` that
    exists, with its groups; else an unknown user, judged as "others"."""
    try:
        configured = _CONF_USER.search(conf.read_text())
    except OSError:
        configured = None
    names = (configured[1],) if configured else candidates
    for name in names:
        try:
            entry = pwd.getpwuid(int(name[1:])) if name.startswith("+") else pwd.getpwnam(name)
        except (KeyError, ValueError):
            continue
        gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
        return User(entry.pw_name, entry.pw_uid, frozenset(gids))
    return User(names[0], None, frozenset())


def is_system_qemu(uri: str) -> bool:
    """Whether ``uri`` is the local system libvirtd's QEMU driver: ``qemu:///system``, and not one
    on a socket of its own (``?socket=``), whose daemon has a configuration we can't see."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.netloc and parts.path.rstrip("/") == "/system" \
        and "socket=" not in parts.query


def can_traverse(mode: int, owner: int, group: int, user: User) -> bool:
    """Whether ``user`` may search (x) a directory of ``mode`` owned by ``owner``:``group``."""
    if user.uid == 0:
        return True
    if user.uid is not None and owner == user.uid:
        return bool(mode & stat.S_IXUSR)
    if group in user.gids:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def untraversable(path: Path, user: User) -> list[Path]:
    """The directories from ``/`` down to ``path`` (those that exist) that ``user`` can't traverse:
    along the path as written and, if a symlink is on the way, along the real path too."""
    blocked: list[Path] = []
    for way in dict.fromkeys((Path(os.path.abspath(path)), Path(path).resolve())):
        for directory in [*reversed(way.parents), way]:
            try:
                st = directory.stat()
            except OSError:
                break  # not there (yet): what exists above it has been judged
            if stat.S_ISDIR(st.st_mode) and not can_traverse(st.st_mode, st.st_uid, st.st_gid, user) \
                    and directory not in blocked:
                blocked.append(directory)
    return blocked


def chmod_for(directory: Path, user: User) -> str:
    """The ``chmod`` that lets ``user`` traverse ``directory``: the x bit of the class it falls in."""
    st = directory.stat()
    who = "u" if user.uid is not None and st.st_uid == user.uid else "g" if st.st_gid in user.gids else "o"
    return f"chmod {who}+x {directory}"
