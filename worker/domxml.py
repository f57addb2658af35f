"""Domain and snapshot XML, built and parsed with ElementTree only (never by string formatting).

vmorch keeps its own facts about a domain in ``<metadata>`` under :data:`NS`::

    <vmorch:domain xmlns:vmorch="https://vmorch.dev/xmlns/domain/1">
      <vmorch:namespace>web</vmorch:namespace>
      <vmorch:vm>db1</vmorch:vm>
      <vmorch:job>42</vmorch:job>
      <vmorch:fence>7</vmorch:fence>
      <vmorch:disk>/var/lib/vmorch/web.db1.qcow2</vmorch:disk>
      <vmorch:tags><vmorch:tag key="role" value="db"/></vmorch:tags>
    </vmorch:domain>

Tag values live in attributes: libvirt re-parses and re-indents metadata, and XML
parsers normalise attribute whitespace only after unescaping, so ``&#10;`` and friends
round-trip where whitespace-only text content would not.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.model.errors import InvalidInput

NS = "https://vmorch.dev/xmlns/domain/1"
#: the virtio-serial port the QEMU guest agent listens on (libvirt's ``qemuAgentCommand`` uses it)
AGENT_CHANNEL = "org.qemu.guest_agent.0"
_agent_socket_dir: Path | None = None
#: a domain's vCPU maximum is at least this (``max_vcpus_for``), and never above ``MAX_VCPUS``
DEFAULT_MAX_VCPUS = 8
MAX_VCPUS = 255
PREFIX = "vmorch"
ROOT = "domain"

# Module-global in ElementTree; only makes serialised names read ``vmorch:`` instead of ``ns0:``.
ET.register_namespace(PREFIX, NS)

# XML 1.0 "Char": anything else makes the document unparsable (ElementTree writes it as is).
_NOT_XML_CHAR = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}  # fmt: skip


@dataclass(frozen=True)
class VmorchMeta:
    """What vmorch stores in a domain's ``<metadata>``."""

    namespace: str
    vm: str
    tags: Mapping[str, str] = field(default_factory=dict)
    job_id: int = 0
    fence: int = 0
    disk: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "vm": self.vm,
            "tags": dict(self.tags),
            "job_id": self.job_id,
            "fence": self.fence,
            "disk": self.disk,
        }


@dataclass(frozen=True)
class NicDevice:
    """One NIC on a vmorch network: the host's bridge it plugs into, its MAC, its tap's name."""

    bridge: str
    mac: str
    tap: str


def check_xml_text(value: str, what: str) -> str:
    """Refuse characters no XML document can carry (escaping can't help with those)."""
    bad = _NOT_XML_CHAR.search(value)
    if bad:
        raise InvalidInput(f"{what} contains the character {bad.group()!r}, which XML can't carry")
    return value


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def metadata_element(meta: VmorchMeta, *, qualified: bool = True) -> ET.Element:
    """The ``<domain>`` element of vmorch's metadata.

    ``qualified=False`` gives the form ``virDomainSetMetadata`` wants: libvirt puts the
    element and all its descendants in the namespace itself and fails ("failed to create
    a new XML namespace") if the fragment already declares it.
    """

    def q(name: str) -> str:
        return f"{{{NS}}}{name}" if qualified else name

    root = ET.Element(q(ROOT))
    _sub(root, q("namespace"), check_xml_text(meta.namespace, "namespace"))
    _sub(root, q("vm"), check_xml_text(meta.vm, "VM name"))
    _sub(root, q("job"), str(int(meta.job_id)))
    _sub(root, q("fence"), str(int(meta.fence)))
    if meta.disk:
        _sub(root, q("disk"), check_xml_text(meta.disk, "disk path"))
    tags = _sub(root, q("tags"))
    for key, value in sorted(meta.tags.items()):
        _sub(tags, q("tag"), key=check_xml_text(key, "tag key"), value=check_xml_text(value, f"tag {key!r}"))
    return root


def metadata_fragment(meta: VmorchMeta) -> str:
    """Serialised metadata for ``virDomain.setMetadata(VIR_DOMAIN_METADATA_ELEMENT, ..., PREFIX, NS)``."""
    return ET.tostring(metadata_element(meta, qualified=False), encoding="unicode")


def console_log_path(storage_dir: str | Path, domain: str) -> Path:
    """Where QEMU keeps a domain's serial console output on its host (``worker.console`` caps it)."""
    return Path(storage_dir) / f"{domain}.console.log"


def use_agent_socket_dir(path: Path | None) -> None:
    """Put the guest agents' channel sockets in ``path`` (None: where libvirt puts them, under its own
    state directory). A socket's path must fit in 107 bytes: an embedded QEMU root deep in a tree
    leaves libvirt's default too long (``worker.agent.socket_dir``). One libvirt root per process."""
    global _agent_socket_dir
    _agent_socket_dir = path


def agent_socket(name: str) -> str | None:
    """The agent channel's socket of domain ``name`` (None: libvirt's default place)."""
    if _agent_socket_dir is None:
        return None
    return str(_agent_socket_dir / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.qga")


def max_vcpus_for(vcpus: int) -> int:
    """The vCPU maximum a domain is defined with: room to add vCPUs to the running VM later."""
    return min(max(vcpus, DEFAULT_MAX_VCPUS), MAX_VCPUS)


def domain_xml(
    *,
    name: str,
    virt_type: str,
    memory_mib: int,
    vcpus: int,
    disk: str | None,
    meta: VmorchMeta,
    console_log: str | None = None,
    max_vcpus: int | None = None,
    seed: str | None = None,
    nics: Sequence[NicDevice] = (),
) -> str:
    """A persistent domain definition for an x86_64 PC: ``virt_type`` ``kvm`` (hardware accelerated),
    ``qemu`` (software emulation, TCG) or ``test``.

    Every domain gets a serial console (a pty; QEMU copies all it prints to ``console_log``, by
    default beside the disk) and a virtio-serial channel for the QEMU guest agent. Its NICs: one on each
    of ``nics`` (a bridge; the tap named, so link emulation finds it), or else one user-mode NIC
    (outbound only, nothing reaches the guest). vCPUs are
    ``<vcpu current='vcpus'>max_vcpus</vcpu>`` (default :func:`max_vcpus_for`).
    """
    dom = ET.Element("domain", type=virt_type)
    _sub(dom, "name", check_xml_text(name, "domain name"))
    ET.SubElement(dom, "metadata").append(metadata_element(meta))
    _sub(dom, "memory", str(memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(max(vcpus, max_vcpus or max_vcpus_for(vcpus))), current=str(vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(_sub(dom, "features"), "acpi")
    devices = _sub(dom, "devices")
    if disk:
        disk_el = _sub(devices, "disk", type="file", device="disk")
        _sub(disk_el, "driver", name="qemu", type="qcow2")
        _no_relabel(_sub(disk_el, "source", file=check_xml_text(disk, "disk path")))
        _sub(disk_el, "target", dev="vda", bus="virtio")
        _seed_cdrom(devices, seed if seed is not None else seed_beside(disk))
    # <graphics type='none'/> is not valid libvirt XML: no graphics element = headless.
    for dev in nics:
        nic = _sub(devices, "interface", type="bridge")
        _sub(nic, "source", bridge=dev.bridge)
        _sub(nic, "mac", address=dev.mac)
        _sub(nic, "target", dev=dev.tap)
        _sub(nic, "model", type="virtio")
    if not nics:
        nic = _sub(devices, "interface", type="user")
        _sub(nic, "model", type="virtio")
    if console_log is None and disk:
        console_log = str(console_log_path(Path(disk).parent, name))
    _console_devices(devices, console_log, agent_socket(name))
    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


def _console_devices(devices: ET.Element, console_log: str | None, socket: str | None) -> None:
    """The serial console (ttyS0 on a pty, its output also in ``console_log``) and the agent's channel."""
    serial = _sub(devices, "serial", type="pty")
    if console_log:
        _sub(serial, "log", file=check_xml_text(console_log, "console log path"), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", **({"path": socket} if socket else {}))
    _sub(channel, "target", type="virtio", name=AGENT_CHANNEL)


def localize(xml: str, *, virt_type: str, console_log: str | None) -> str:
    """A definition made on another host (or under another accelerator), fit for this one.

    The domain type follows this host's accelerator (a VM defined on a KVM host still starts on a
    TCG one), the serial console's log goes where this host keeps it (``None``: no log), and the
    agent's socket where this process puts them (``use_agent_socket_dir``).
    A ``test`` definition, or one for a ``test`` host, keeps its type.
    """
    root = ET.fromstring(xml)
    socket = agent_socket(root.findtext("name") or "")
    for source in root.iterfind("./devices/channel/source"):
        if source.get("mode") == "bind":
            if socket:
                source.set("path", socket)
            else:
                source.attrib.pop("path", None)
    if root.get("type") in ("qemu", "kvm") and virt_type in ("qemu", "kvm"):
        root.set("type", virt_type)
    for chardev in root.iterfind("./devices/serial"):
        for log in chardev.findall("log"):
            chardev.remove(log)
        if console_log and chardev.get("type") == "pty":
            log_el = ET.Element("log", file=check_xml_text(console_log, "console log path"), append="on")
            chardev.insert(0, log_el)
    for console in root.iterfind("./devices/console"):  # libvirt mirrors the serial's log here
        for log in console.findall("log"):
            console.remove(log)
    return ET.tostring(root, encoding="unicode")


def console_of(xml: str) -> tuple[str | None, str | None]:
    """``(log file, pty)`` of a domain's serial console: the pty only in a running domain's XML."""
    serial = ET.fromstring(xml).find("./devices/serial")
    if serial is None:
        return None, None
    log, source = serial.find("log"), serial.find("source")
    return (log.get("file") if log is not None else None), (source.get("path") if source is not None else None)


def domain_type(xml: str) -> str:
    return ET.fromstring(xml).get("type", "")


def seed_for(disk: str | Path) -> Path:
    """The cloud-init seed that belongs to a VM disk: ``<id>.seed.iso`` beside ``<id>.qcow2``."""
    path = Path(disk)
    return path.with_name(path.name.removesuffix(".qcow2") + ".seed.iso")


def seed_beside(disk: str) -> str | None:
    """The seed beside ``disk`` if the launch built one (the launch handler does, before the domain is
    defined): so every definition of a VM made from an image carries its seed, whoever builds it."""
    seed = seed_for(disk)
    return str(seed) if disk.endswith(".qcow2") and seed.is_file() else None


def _no_relabel(source: ET.Element) -> ET.Element:
    """libvirt's DAC driver must not chown vmorch's files (nor, through this, the image behind a disk):
    QEMU runs as root here, and a changed owner was never given back for a backing file."""
    _sub(source, "seclabel", model="dac", relabel="no")
    return source


def _seed_cdrom(devices: ET.Element, seed: str | None) -> None:
    """The NoCloud seed as a read-only IDE CD-ROM (the guest finds it by its label, ``cidata``)."""
    if not seed:
        return
    cdrom = _sub(devices, "disk", type="file", device="cdrom")
    _sub(cdrom, "driver", name="qemu", type="raw")
    _no_relabel(_sub(cdrom, "source", file=check_xml_text(seed, "seed path")))
    _sub(cdrom, "target", dev="hdc", bus="ide")
    _sub(cdrom, "readonly")


def sources_of(xml: str) -> list[str]:
    """Every file a definition's disks and CD-ROMs name (the disk first)."""
    return [s.get("file", "") for s in ET.fromstring(xml).iterfind("./devices/disk/source") if s.get("file")]


def snapshot_xml(name: str, description: str) -> str:
    snap = ET.Element("domainsnapshot")
    _sub(snap, "name", check_xml_text(name, "snapshot name"))
    _sub(snap, "description", check_xml_text(description, "snapshot description"))
    return ET.tostring(snap, encoding="unicode")


def job_description(job_id: int) -> str:
    """The snapshot description that records which job took it (the idempotency key)."""
    return f"vmorch job {int(job_id)}"


# -- parsing ----------------------------------------------------------------------------


def _child_text(el: ET.Element, name: str) -> str | None:
    # Accept the local name in our namespace or in none: libvirt's getter returns the
    # element stripped of its namespace, the domain XML returns it qualified.
    found = el.find(f"{{{NS}}}{name}")
    if found is None:
        found = el.find(name)
    return None if found is None else (found.text or "")


def parse_metadata_element(el: ET.Element) -> VmorchMeta:
    """vmorch metadata from its ``<domain>`` element, namespaced or not."""
    tags: dict[str, str] = {}
    tags_el = el.find(f"{{{NS}}}tags")
    if tags_el is None:
        tags_el = el.find("tags")
    if tags_el is not None:
        for tag in tags_el:
            if tag.tag in (f"{{{NS}}}tag", "tag") and tag.get("key") is not None:
                tags[tag.get("key", "")] = tag.get("value", "")
    return VmorchMeta(
        namespace=_child_text(el, "namespace") or "",
        vm=_child_text(el, "vm") or "",
        tags=tags,
        job_id=int(_child_text(el, "job") or 0),
        fence=int(_child_text(el, "fence") or 0),
        disk=_child_text(el, "disk") or None,
    )


def parse_metadata(xml: str) -> VmorchMeta | None:
    """vmorch metadata from a full domain XML, or None if the domain isn't vmorch's."""
    el = ET.fromstring(xml).find(f"metadata/{{{NS}}}{ROOT}")
    return None if el is None else parse_metadata_element(el)


def parse_fragment(xml: str) -> VmorchMeta:
    """vmorch metadata from ``virDomain.metadata()``'s answer (or :func:`metadata_fragment`)."""
    return parse_metadata_element(ET.fromstring(xml))


def _mib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    factor = _UNITS.get(el.get("unit", "KiB").lower())
    if factor is None:
        raise ValueError(f"unknown memory unit {el.get('unit')!r}")
    return int(el.text or 0) * factor // 1024**2


def parse_resources(xml: str) -> tuple[int, int, int, int]:
    """``(memory_mib, max_memory_mib, vcpus, max_vcpus)`` of a domain definition."""
    dom = ET.fromstring(xml)
    max_mem = _mib(dom.find("memory"))
    cur = dom.find("currentMemory")
    vcpu = dom.find("vcpu")
    max_vcpus = int((vcpu.text if vcpu is not None else None) or 1)
    vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else max_vcpus
    return (_mib(cur) if cur is not None else max_mem), max_mem, vcpus, max_vcpus


def parse_description(snapshot_xml_text: str) -> str:
    el = ET.fromstring(snapshot_xml_text).find("description")
    return "" if el is None else (el.text or "")


def relocate_disk(xml: str, old: str, new: str) -> str:
    """The same definition with the disk file ``old`` at ``new`` (for a VM moved to another host)."""
    root = ET.fromstring(xml)
    for source in root.iterfind("./devices/disk/source"):
        if source.get("file") == old:
            source.set("file", check_xml_text(new, "disk path"))
    return ET.tostring(root, encoding="unicode")
