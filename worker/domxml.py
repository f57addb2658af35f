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

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.model.errors import InvalidInput

NS = "https://vmorch.dev/xmlns/domain/1"
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


def domain_xml(
    *,
    name: str,
    virt_type: str,
    memory_mib: int,
    vcpus: int,
    disk: str | None,
    meta: VmorchMeta,
) -> str:
    """A persistent domain definition for a software-emulated x86_64 PC."""
    dom = ET.Element("domain", type=virt_type)
    _sub(dom, "name", check_xml_text(name, "domain name"))
    ET.SubElement(dom, "metadata").append(metadata_element(meta))
    _sub(dom, "memory", str(memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(_sub(dom, "features"), "acpi")
    devices = _sub(dom, "devices")
    if disk:
        disk_el = _sub(devices, "disk", type="file", device="disk")
        _sub(disk_el, "driver", name="qemu", type="qcow2")
        _sub(disk_el, "source", file=check_xml_text(disk, "disk path"))
        _sub(disk_el, "target", dev="vda", bus="virtio")
    # <graphics type='none'/> is not valid libvirt XML: no graphics element = headless.
    nic = _sub(devices, "interface", type="user")
    _sub(nic, "model", type="virtio")
    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


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
