"""Domain XML built and parsed with ElementTree: hostile tag values can't change its structure."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from orchestrator.model.errors import InvalidInput
from worker import domxml
from worker.domxml import NS, VmorchMeta

HOSTILE = "a<b>&c\"d'e]]>f<![CDATA[g]]></vmorch:tag><vmorch:fence>999</vmorch:fence>&amp;"


def _domain(meta: VmorchMeta, disk: str | None = "/var/lib/vmorch/ns.vm.qcow2") -> str:
    return domxml.domain_xml(name="ns.vm", virt_type="qemu", memory_mib=64, vcpus=2, disk=disk, meta=meta)


def test_hostile_tag_value_round_trips_and_cannot_alter_structure() -> None:
    meta = VmorchMeta("ns", "vm", {"role": HOSTILE, "plain": "x", "ws": "  two\nlines\t "}, job_id=5, fence=3)
    xml = _domain(meta)

    assert domxml.parse_metadata(xml) == meta
    root = ET.fromstring(xml)
    vm_el = root.find(f"metadata/{{{NS}}}domain")
    assert vm_el is not None
    # exactly one fence (the real one), three tags, nothing injected anywhere in the document
    assert [el.text for el in root.iter(f"{{{NS}}}fence")] == ["3"]
    assert len(list(root.iter(f"{{{NS}}}tag"))) == 3
    assert [child.tag for child in root] == [
        "name", "metadata", "memory", "currentMemory", "vcpu", "os", "features", "devices",
    ]  # fmt: skip
    assert "<![CDATA[" not in xml


def test_hostile_values_in_the_set_metadata_fragment() -> None:
    meta = VmorchMeta("ns", "vm", {HOSTILE[:20]: HOSTILE}, job_id=1)
    fragment = domxml.metadata_fragment(meta)
    assert "xmlns" not in fragment  # libvirt refuses a fragment that declares the namespace itself
    assert domxml.parse_fragment(fragment) == meta


@pytest.mark.parametrize("bad", ["\x00", "\x01", "a\x1fb", "\ufffe", "\ud800"])
def test_characters_xml_cannot_carry_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="XML can't carry"):
        _domain(VmorchMeta("ns", "vm", {"k": bad}))


def test_domain_without_disk_and_foreign_domain() -> None:
    xml = _domain(VmorchMeta("ns", "vm"), disk=None)
    root = ET.fromstring(xml)
    assert root.find("devices/disk") is None
    assert root.find("devices/interface[@type='user']/model").get("type") == "virtio"  # type: ignore[union-attr]
    assert root.find("devices/graphics") is None
    assert root.get("type") == "qemu"
    assert domxml.parse_metadata("<domain type='test'><name>test</name></domain>") is None


def test_disk_path_is_an_attribute_not_markup() -> None:
    xml = _domain(VmorchMeta("ns", "vm"), disk="/tmp/x'/><source file='/etc/shadow")
    sources = ET.fromstring(xml).findall("devices/disk/source")
    assert [s.get("file") for s in sources] == ["/tmp/x'/><source file='/etc/shadow"]


def test_parse_resources_units_and_current_vcpus() -> None:
    xml = (
        "<domain><memory unit='GiB'>1</memory><currentMemory unit='KiB'>524288</currentMemory>"
        "<vcpu placement='static' current='2'>4</vcpu></domain>"
    )
    assert domxml.parse_resources(xml) == (512, 1024, 2, 4)
    assert domxml.parse_resources("<domain><memory>65536</memory><vcpu>1</vcpu></domain>") == (64, 64, 1, 1)


def test_snapshot_xml_and_description() -> None:
    xml = domxml.snapshot_xml("s<1>", domxml.job_description(7))
    assert ET.fromstring(xml).findtext("name") == "s<1>"
    assert domxml.parse_description(xml) == "vmorch job 7"


@pytest.mark.parametrize("virt_type", ["qemu", "kvm", "test"])
@pytest.mark.parametrize("disk", [None, "/var/lib/vmorch/a dir/ns.vm.qcow2"])
def test_every_shape_of_domain_xml_validates_against_libvirts_schema(virt_type: str, disk: str | None) -> None:
    # The driver defines without VIR_DOMAIN_DEFINE_VALIDATE (it cost ~13 ms per launch); the check is here.
    import libvirt

    conn = libvirt.open("test:///default")
    try:
        xml = domxml.domain_xml(name="ns.vm", virt_type=virt_type, memory_mib=64, vcpus=2, disk=disk,
                                meta=VmorchMeta("ns", "vm", {"role": HOSTILE}, 7, 3, disk))
        conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE).undefine()
        with pytest.raises(libvirt.libvirtError, match="schema"):
            conn.defineXMLFlags(xml.replace("<vcpu ", "<vcpus ").replace("</vcpu>", "</vcpus>"),
                                libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    finally:
        conn.close()
