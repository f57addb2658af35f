"""A VM's cloud-init NoCloud seed: an ISO 9660 image labelled ``cidata`` with ``meta-data`` and
``user-data``, built on the VM's host with Debian's ``genisoimage``.

``meta-data`` has the ``instance-id`` (new at each launch) and ``local-hostname`` (the VM's name),
and the SSH keys as ``public-keys``; ``user-data`` is what the user gave, or else a ``#cloud-config``
with the keys as ``ssh_authorized_keys``. Both are written line by line, every string JSON-quoted
(valid YAML), so nothing a user gives can change their structure. The seed sits beside the VM's
disk (``worker.disks``: ``<id>.seed.iso``), is attached read-only for the VM's whole life and goes
with it.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from orchestrator.model.errors import HypervisorError
from orchestrator.model.guestdata import check_ssh_key, check_user_data

from .domxml import NS

VOLUME_ID = "cidata"
INSTALL_HINT = "install Debian's genisoimage on this host (apt-get install genisoimage)"


def meta_data(*, instance_id: str, hostname: str, ssh_keys: Sequence[str] = ()) -> str:
    lines = [f"instance-id: {json.dumps(instance_id)}", f"local-hostname: {json.dumps(hostname)}"]
    if ssh_keys:
        lines.append("public-keys:")
        lines += [f"  - {json.dumps(check_ssh_key(k))}" for k in ssh_keys]
    return "\n".join(lines) + "\n"


def user_data(given: str | None, ssh_keys: Sequence[str] = ()) -> str:
    if given is not None:
        return check_user_data(given)
    lines = ["#cloud-config"]
    if ssh_keys:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {json.dumps(check_ssh_key(k))}" for k in ssh_keys]
    return "\n".join(lines) + "\n"


def build_seed(path: Path, *, instance_id: str, hostname: str, given_user_data: str | None = None,
               ssh_keys: Sequence[str] = ()) -> Path:
    """Write the seed ISO at ``path`` (atomically, read-only)."""
    exe = shutil.which("genisoimage")
    if exe is None:
        raise HypervisorError("genisoimage is not installed on this host: it builds cloud-init seeds",
                              hint=INSTALL_HINT)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.part")
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as work:
        files = {"meta-data": meta_data(instance_id=instance_id, hostname=hostname, ssh_keys=ssh_keys),
                 "user-data": user_data(given_user_data, ssh_keys)}
        for name, text in files.items():
            Path(work, name).write_text(text, encoding="utf-8")
        proc = subprocess.run([exe, "-quiet", "-output", str(tmp), "-volid", VOLUME_ID, "-joliet", "-rock",
                               "-input-charset", "utf-8", *files], cwd=work, capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HypervisorError(f"genisoimage failed: {proc.stderr.strip()[:500]}")
    tmp.chmod(0o444)
    os.replace(tmp, path)
    return path


# -- a seed on the move: inside the exported definition (``worker.moving``) --------------------------

_SEED_EL = f"{{{NS}}}seed"


def with_seed(xml: str, content: bytes) -> str:
    """A definition carrying its seed's bytes (gzipped, base64) in ``<metadata>``: only while it moves."""
    root = ET.fromstring(xml)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    carried = ET.SubElement(meta, _SEED_EL, encoding="gzip+base64")
    carried.text = base64.b64encode(gzip.compress(content, mtime=0)).decode()
    return ET.tostring(root, encoding="unicode")


def take_seed(xml: str) -> tuple[str, bytes | None]:
    """The definition without a carried seed, and the seed's bytes (None: it carried none)."""
    root = ET.fromstring(xml)
    meta = root.find("metadata")
    found = meta.find(_SEED_EL) if meta is not None else None
    if meta is None or found is None:
        return xml, None
    meta.remove(found)
    return ET.tostring(root, encoding="unicode"), gzip.decompress(base64.b64decode(found.text or ""))
