"""vm-config: a new VM's configuration from the captured one, on restore disks."""
# ruff: noqa: E501 (the captured configurations below are quoted as their tools write them)

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from snapfs import sample
from snapfs.errors import SnapfsUserError
from snapfs.restore.model import RestoreDisk
from snapfs.restore.vmconfig import OVF_NS, RASD_NS, XSI_NS, Overrides, render_vm_config

OVF = f"{{{OVF_NS}}}"
RASD = f"{{{RASD_NS}}}"
OLD_VM_ID = "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a"
GROUP = "11111111-2222-4333-8444-555555555555"
IMAGE = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
GROUP2 = "66666666-7777-4888-8999-000000000000"
IMAGE2 = "bbbbbbbb-cccc-4ddd-8eee-ffffffffffff"


def _ids() -> Overrides:
    counter = itertools.count(1)
    return Overrides(new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}")


def _restore(name: str, size: int = 32 << 20) -> RestoreDisk:
    return RestoreDisk(name, Path(f"/repo/restore/{name}/disk.qcow2"), size, 0.0)


# --- libvirt ------------------------------------------------------------------------------

LIBVIRT_LIVE = """<domain type='kvm' id='7'>
  <name>web-01</name>
  <uuid>6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f</uuid>
  <!-- managed by ops -->
  <metadata><app:owner xmlns:app="http://example.com/app">ops</app:owner></metadata>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web-01_VARS.fd</nvram>
  </os>
  <cpu mode='host-model'><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='rbd' name='pool/web-01-vda'><host name='ceph1' port='6789'/></source>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web-01-vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
  </devices>
  <seclabel type='dynamic' model='selinux' relabel='yes'>
    <label>system_u:system_r:svirt_t:s0:c1,c2</label>
    <imagelabel>system_u:object_r:svirt_image_t:s0:c1,c2</imagelabel>
  </seclabel>
</domain>
"""


def test_libvirt_sample(tmp_path: Path) -> None:
    cfg = tmp_path / "domain.xml"
    cfg.write_text(sample._DOMAIN_XML.format(name="web-01"))
    out = render_vm_config(
        {"vda": _restore("a"), "vdb": _restore("b")}, cfg, Overrides(name="web-new")
    )
    assert out.filename == "web-new.xml" and out.kind == "libvirt"
    root = ET.fromstring(out.data)
    assert root.findtext("name") == "web-new"
    new_uuid = root.findtext("uuid")
    assert new_uuid and new_uuid != "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"
    sources = {
        d.find("target").get("dev"): d.find("source").get("file")  # type: ignore[union-attr]
        for d in root.iter("disk")
    }
    assert sources == {
        "vda": "/repo/restore/a/disk.qcow2",
        "vdb": "/repo/restore/b/disk.qcow2",
    }
    assert root.findtext("memory") == "1024" and root.findtext("vcpu") == "2"
    assert root.find("os/type").text == "hvm"  # type: ignore[union-attr]


def test_libvirt_live_xml(tmp_path: Path) -> None:
    cfg = tmp_path / "web.xml"
    cfg.write_text(LIBVIRT_LIVE)
    out = render_vm_config({"vda": _restore("a")}, cfg, Overrides(memory_mib=2048, cpus=8))
    text = out.data.decode()
    root = ET.fromstring(out.data)
    assert root.findtext("name") == "web-01-restored"
    assert "id" not in root.attrib
    assert root.find("memory").attrib == {"unit": "MiB"}  # type: ignore[union-attr]
    assert root.findtext("memory") == "2048" and root.findtext("currentMemory") == "2048"
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.text == "8" and "current" not in vcpu.attrib
    topology = root.find("cpu/topology")
    assert topology is not None and topology.get("sockets") == "2"
    assert topology.get("cores") == "2" and topology.get("threads") == "2"
    disks = root.findall("devices/disk")
    # vdb was not restored: dropped, never left pointing at the original's image.
    assert [d.find("target").get("dev") for d in disks] == ["vda", "sda"]  # type: ignore[union-attr]
    vda = disks[0]
    assert vda.get("type") == "file"
    assert vda.find("source").attrib == {"file": "/repo/restore/a/disk.qcow2"}  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert vda.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}  # type: ignore[union-attr]
    assert vda.find("boot") is not None
    assert disks[1].find("source").get("file") == "/isos/debian.iso"  # type: ignore[union-attr]
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"  # type: ignore[union-attr]
    nvram = root.find("os/nvram")
    assert nvram is not None and not nvram.text and nvram.get("template")
    assert root.find("seclabel/label") is None and root.find("seclabel").get("model") == "selinux"  # type: ignore[union-attr]
    # The rest is kept: comment, foreign metadata with its own namespace.
    assert "<!-- managed by ops -->" in text
    assert 'xmlns:app="http://example.com/app"' in text and "<app:owner" in text
    assert any("vdb dropped" in n for n in out.notes)
    assert any("MAC" in n for n in out.notes)


def test_libvirt_unknown_disk_key(tmp_path: Path) -> None:
    cfg = tmp_path / "web.xml"
    cfg.write_text(LIBVIRT_LIVE)
    with pytest.raises(SnapfsUserError, match="no disk 'vdq'"):
        render_vm_config({"vdq": _restore("a")}, cfg, Overrides())


# --- OVF ----------------------------------------------------------------------------------

OVIRT_OVF = f"""<?xml version='1.0' encoding='UTF-8'?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/"
  xmlns:rasd="{RASD_NS}"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:xsi="{XSI_NS}" ovf:version="4.4.0.0">
  <References>
    <File ovf:href="{GROUP}/{IMAGE}" ovf:id="{IMAGE}" ovf:size="10737418240" ovf:description="Active VM"/>
    <File ovf:href="{GROUP2}/{IMAGE2}" ovf:id="{IMAGE2}" ovf:size="1073741824"/>
  </References>
  <Section xsi:type="ovf:NetworkSection_Type"><Info>networks</Info><Network ovf:name="ovirtmgmt"/></Section>
  <Section xsi:type="ovf:DiskSection_Type">
    <Info>List of Virtual Disks</Info>
    <Disk ovf:diskId="{IMAGE}" ovf:size="10" ovf:actual_size="2" ovf:vm_snapshot_id="99999999-0000-4000-8000-000000000001"
      ovf:parentRef="" ovf:fileRef="{GROUP}/{IMAGE}" ovf:format="http://www.vmware.com/specifications/vmdk.html#sparse"
      ovf:volume-format="RAW" ovf:volume-type="Preallocated" ovf:disk-interface="VirtIO_SCSI"
      ovf:boot="true" ovf:disk-alias="db-01_Disk1" ovf:wipe-after-delete="false"/>
    <Disk ovf:diskId="{IMAGE2}" ovf:size="1" ovf:fileRef="{GROUP2}/{IMAGE2}"
      ovf:volume-format="COW" ovf:disk-alias="db-01_Disk2"/>
  </Section>
  <Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">
    <Name>db-01</Name>
    <TemplateId>00000000-0000-0000-0000-000000000000</TemplateId>
    <MaxMemorySizeMb>4096</MaxMemorySizeMb>
    <MinAllocatedMem>1024</MinAllocatedMem>
    <!-- exported by engine -->
    <Section ovf:id="{OLD_VM_ID}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type">
      <Info>Guest Operating System</Info>
      <Description>rhel_8x64</Description>
    </Section>
    <Section xsi:type="ovf:VirtualHardwareSection_Type">
      <Info>2 CPU, 1024 Memory</Info>
      <Item>
        <rasd:Caption>2 virtual cpu</rasd:Caption>
        <rasd:InstanceId>1</rasd:InstanceId>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:num_of_sockets>2</rasd:num_of_sockets>
        <rasd:cpu_per_socket>1</rasd:cpu_per_socket>
        <rasd:threads_per_cpu>1</rasd:threads_per_cpu>
      </Item>
      <Item>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:InstanceId>2</rasd:InstanceId>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Caption>db-01_Disk1</rasd:Caption>
        <rasd:InstanceId>{IMAGE}</rasd:InstanceId>
        <rasd:ResourceType>17</rasd:ResourceType>
        <rasd:HostResource>{GROUP}/{IMAGE}</rasd:HostResource>
        <rasd:Parent>00000000-0000-0000-0000-000000000000</rasd:Parent>
      </Item>
      <Item>
        <rasd:Caption>db-01_Disk2</rasd:Caption>
        <rasd:InstanceId>{IMAGE2}</rasd:InstanceId>
        <rasd:ResourceType>17</rasd:ResourceType>
        <rasd:HostResource>{GROUP2}/{IMAGE2}</rasd:HostResource>
      </Item>
      <Item>
        <rasd:Caption>Ethernet adapter on ovirtmgmt</rasd:Caption>
        <rasd:InstanceId>c0ffee00-0000-4000-8000-000000000010</rasd:InstanceId>
        <rasd:ResourceType>10</rasd:ResourceType>
        <rasd:Connection>ovirtmgmt</rasd:Connection>
        <rasd:Name>nic1</rasd:Name>
        <rasd:MACAddress>56:6f:1a:2b:00:01</rasd:MACAddress>
      </Item>
    </Section>
    <Section xsi:type="ovf:SnapshotsSection_Type">
      <Snapshot ovf:id="99999999-0000-4000-8000-000000000001"><Type>ACTIVE</Type></Snapshot>
    </Section>
  </Content>
</ovf:Envelope>
"""


def _content(root: ET.Element) -> ET.Element:
    content = root.find("Content")
    assert content is not None
    return content


def test_ovf_sample_by_position(tmp_path: Path) -> None:
    cfg = tmp_path / "config.ovf"
    disk_id = "5b1e9a3c-2f4d-4e6a-9b8c-7d6e5f4a3b2c"
    cfg.write_text(
        sample._OVF.format(
            name="db-01", disk_id=disk_id, size=32 << 20, size_gib=1, vm_uuid=OLD_VM_ID
        )
    )
    out = render_vm_config({"vda": _restore("a", 3 << 30)}, cfg, _ids(), snapshot_disks=["vda"])
    assert out.filename == "db-01-restored.ovf" and out.kind == "ovf"
    text = out.data.decode()
    assert text.startswith("<?xml") and "<ovf:Envelope" in text and "ns0" not in text
    assert OLD_VM_ID not in text and disk_id not in text
    root = ET.fromstring(out.data)
    content = _content(root)
    assert content.findtext("Name") == "db-01-restored"
    (file,) = root.iter("File")
    assert file.get(f"{OVF}href") == "/repo/restore/a/disk.qcow2"
    (disk,) = root.iter("Disk")
    assert disk.get(f"{OVF}size") == "3"
    assert disk.get(f"{OVF}fileRef") == file.get(f"{OVF}id")
    items = [i.findtext(f"{RASD}HostResource") for i in root.iter("Item")]
    assert disk.get(f"{OVF}diskId") in items
    # xsi:type values keep their prefix: the xsi namespace must still be declared.
    assert 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"' in text


def test_ovirt_ovf(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.ovf"
    cfg.write_text(OVIRT_OVF)
    out = render_vm_config(
        {"db-01_Disk1": _restore("a", 20 << 30)},
        cfg,
        Overrides(name="db-02", memory_mib=8192, cpus=4, new_id=_ids().new_id),
    )
    text = out.data.decode()
    root = ET.fromstring(out.data)
    content = _content(root)
    assert content.findtext("Name") == "db-02"
    for old in (OLD_VM_ID, GROUP, IMAGE, GROUP2, IMAGE2, "56:6f:1a:2b:00:01"):
        assert old not in text
    assert "SnapshotsSection_Type" not in text and "99999999" not in text
    os_section = [s for s in content.iter("Section") if "OperatingSystem" in str(s.attrib)]
    assert os_section[0].get(f"{OVF}id", "").startswith("00000000-0000-4000-8000-")
    (file,) = root.iter("File")
    assert file.get(f"{OVF}href") == "/repo/restore/a/disk.qcow2"
    (disk,) = root.iter("Disk")
    new_ref = disk.get(f"{OVF}fileRef", "")
    assert new_ref.endswith("/" + disk.get(f"{OVF}diskId", "")) and file.get(
        f"{OVF}id"
    ) == disk.get(f"{OVF}diskId")
    assert disk.get(f"{OVF}size") == "20" and disk.get(f"{OVF}volume-format") == "COW"
    assert f"{OVF}vm_snapshot_id" not in disk.attrib
    assert disk.get(f"{OVF}disk-alias") == "db-01_Disk1"
    items = list(root.iter("Item"))
    by_type = {i.findtext(f"{RASD}ResourceType"): i for i in items}
    assert [
        i.findtext(f"{RASD}HostResource")
        for i in items
        if i.findtext(f"{RASD}ResourceType") == "17"
    ] == [new_ref]
    assert by_type["4"].findtext(f"{RASD}VirtualQuantity") == "8192"
    assert by_type["3"].findtext(f"{RASD}num_of_sockets") == "4"
    assert by_type["3"].findtext(f"{RASD}Caption") == "4 virtual cpu"
    assert by_type["10"].find(f"{RASD}MACAddress") is None
    assert by_type["10"].findtext(f"{RASD}Connection") == "ovirtmgmt"
    assert content.findtext("MaxMemorySizeMb") == "8192"
    assert content.findtext("TemplateId") == "00000000-0000-0000-0000-000000000000"
    # Kept verbatim: comments, the network section, the vssd declaration (used nowhere).
    assert "<!-- exported by engine -->" in text and "ovirtmgmt" in text
    assert "xmlns:vssd=" in text
    assert any("db-01_Disk2 dropped" in n for n in out.notes)


def test_standard_ovf_with_default_namespace(tmp_path: Path) -> None:
    cfg = tmp_path / "std.ovf"
    cfg.write_text(
        f"""<?xml version="1.0"?>
<Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}" xmlns:rasd="{RASD_NS}">
  <References><File ovf:id="file1" ovf:href="disk1.vmdk"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^30"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance"><Name>appliance</Name>
    <VirtualHardwareSection><Item>
      <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType>
    </Item></VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
    )
    out = render_vm_config({"vmdisk1": _restore("a", 1 << 30)}, cfg, Overrides(name="app2"))
    root = ET.fromstring(out.data)
    assert root.tag == f"{OVF}Envelope"
    assert root.findtext(f"{OVF}VirtualSystem/{OVF}Name") == "app2"
    (disk,) = root.iter(f"{OVF}Disk")
    assert disk.get(f"{OVF}capacity") == str(1 << 30)
    assert f"{OVF}capacityAllocationUnits" not in disk.attrib
    (file,) = root.iter(f"{OVF}File")
    assert file.get(f"{OVF}href") == "/repo/restore/a/disk.qcow2"


@pytest.mark.parametrize(
    ("text", "message"),
    [("<notes/>", "not a libvirt domain"), ("<domain>", "not well-formed")],
)
def test_bad_configs(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "x.xml"
    cfg.write_text(text)
    with pytest.raises(SnapfsUserError, match=message):
        render_vm_config({}, cfg, Overrides())


def test_bad_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "web.xml"
    cfg.write_text(LIBVIRT_LIVE)
    with pytest.raises(SnapfsUserError, match="--cpus"):
        render_vm_config({}, cfg, Overrides(cpus=0))
    with pytest.raises(SnapfsUserError, match="--memory"):
        render_vm_config({}, cfg, Overrides(memory_mib=-1))
