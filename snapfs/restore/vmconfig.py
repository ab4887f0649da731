"""The configuration of a new VM built on restore disks, from the one captured at backup time.

This module owns ``render_vm_config``: it reads a captured libvirt domain XML or oVirt OVF,
gives the VM a new name and new ids, points its disks at restore disk images, applies
memory and CPU overrides, drops what must not be copied to a second VM (MAC addresses,
runtime ids, snapshot history, disks that were not restored) and keeps everything else
verbatim. Pure: it reads one file and returns bytes; no libvirt or oVirt is contacted.

Disks of the captured configuration are matched to restore disks by a key: the libvirt
target device (``vda``), or for OVF the disk id, image group id, ``disk-alias``, or (when
nothing matches by name) the position of the disk among the snapshot's disks. A disk
without a restore disk is removed, not kept: it would point at the original VM's live
image, and two VMs writing one disk destroys it.
"""

from __future__ import annotations

import contextlib
import io
import math
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from snapfs.errors import SnapfsUserError
from snapfs.restore.model import RestoreDisk

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1/"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
# CIM resource types of OVF hardware items.
_RT_CPU, _RT_MEMORY, _RT_NIC, _RT_DISK = "3", "4", "10", "17"
# How oVirt names the qcow2 ("COW") image format in an OVF.
_OVF_QCOW2 = "http://www.gnome.org/~markmc/qcow-image-format.html"
_GIB = 1 << 30
_WELL_KNOWN = [
    ("ovf", OVF_NS),
    ("rasd", RASD_NS),
    ("vssd", "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"),
    ("xsi", XSI_NS),
]


@dataclass(frozen=True)
class Overrides:
    """What ``snapfs restore vm-config`` changes besides the disks."""

    name: str | None = None  # default: the captured name + "-restored"
    memory_mib: int | None = None
    cpus: int | None = None
    # Makes new ids; tests pass a deterministic one.
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class RenderedConfig:
    filename: str  # suggested file name: NEW_NAME.xml or NEW_NAME.ovf
    data: bytes
    kind: str  # "libvirt" or "ovf"
    notes: tuple[str, ...] = ()  # what was dropped or could not be matched, for the user


def _ovf(tag: str) -> str:
    return f"{{{OVF_NS}}}{tag}"


def _rasd(tag: str) -> str:
    return f"{{{RASD_NS}}}{tag}"


# --- parsing and writing, keeping what ElementTree would lose -----------------------------


@dataclass
class _Document:
    root: ET.Element
    namespaces: list[tuple[str, str]]  # (prefix, uri) as declared in the source
    declaration: bool


def _parse(path: Path) -> _Document:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SnapfsUserError(f"{path}: cannot read: {exc.strerror}") from None
    namespaces: list[tuple[str, str]] = []
    try:
        for _event, item in ET.iterparse(io.BytesIO(raw), events=("start-ns",)):
            prefix, uri = cast("tuple[str, str]", item)  # start-ns events carry a pair
            if (prefix, uri) not in namespaces:
                namespaces.append((prefix, uri))
        # Comments and processing instructions are part of "the rest", kept verbatim.
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True, insert_pis=True))
        root = ET.fromstring(raw, parser=parser)
    except ET.ParseError as exc:
        raise SnapfsUserError(f"{path}: not well-formed XML: {exc}") from None
    return _Document(root, namespaces, raw.lstrip().startswith(b"<?xml"))


def _serialize(doc: _Document) -> bytes:
    # ElementTree writes ns0, ns1, ... unless prefixes are registered, and the OVF's
    # xsi:type values ("ovf:DiskSection_Type") only make sense with the original prefixes.
    prefixed = {uri for prefix, uri in doc.namespaces if prefix}
    for prefix, uri in [*doc.namespaces, *_WELL_KNOWN]:
        # A namespace declared only as the default (xmlns="...") gets its usual prefix:
        # ElementTree's default_namespace would write namespaced attributes unprefixed,
        # which changes their meaning.
        if prefix and (uri not in prefixed or (prefix, uri) in doc.namespaces):
            # "ns0"-style prefixes are ElementTree's own and refused; it renames those.
            with contextlib.suppress(ValueError):
                ET.register_namespace(prefix, uri)
            prefixed.add(uri)
    used = set(_uris_in_use(doc.root))
    for prefix, uri in doc.namespaces:
        # Declarations only referred to from attribute values would otherwise vanish.
        if prefix and uri not in used:
            doc.root.set(f"xmlns:{prefix}", uri)
    body = ET.tostring(doc.root, encoding="unicode")
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if doc.declaration else ""
    return (head + body + "\n").encode("utf-8")


def _uris_in_use(root: ET.Element) -> set[str]:
    uris = set()
    for element in root.iter():
        names = [element.tag] if isinstance(element.tag, str) else []
        for name in [*names, *element.attrib]:
            if name.startswith("{"):
                uris.add(name[1:].split("}", 1)[0])
    return uris


def _set_text(parent: ET.Element, tag: str, text: str, **attrib: str) -> ET.Element:
    child = parent.find(tag)
    if child is None:
        child = ET.SubElement(parent, tag)
    child.text = text
    for key, value in attrib.items():
        child.set(key, value)
    return child


def _split_cpus(cpus: int, per_socket: int) -> tuple[int, int]:
    """(sockets, cores x threads per socket): keep the captured per-socket shape if it
    divides the new count, else one CPU per socket (always valid)."""
    if per_socket > 0 and cpus % per_socket == 0:
        return cpus // per_socket, per_socket
    return cpus, 1


# --- libvirt ------------------------------------------------------------------------------


def _render_libvirt(
    doc: _Document, disks: Mapping[str, RestoreDisk], overrides: Overrides
) -> RenderedConfig:
    root = doc.root
    notes: list[str] = []
    old_name = (root.findtext("name") or "vm").strip()
    new_name = overrides.name or f"{old_name}-restored"
    _set_text(root, "name", new_name)
    _set_text(root, "uuid", overrides.new_id())
    # The id of a running domain, present in live XML dumps; a defined domain has none.
    root.attrib.pop("id", None)
    if overrides.memory_mib is not None:
        for tag in ("memory", "currentMemory"):
            element = root.find(tag)
            if element is not None or tag == "memory":
                _set_text(root, tag, str(overrides.memory_mib), unit="MiB")
    if overrides.cpus is not None:
        vcpu = _set_text(root, "vcpu", str(overrides.cpus))
        vcpu.attrib.pop("current", None)
        topology = root.find("cpu/topology")
        if topology is not None:
            per_socket = 1
            for key in ("dies", "clusters", "cores", "threads"):
                per_socket *= int(topology.get(key, "1"))
            sockets, kept = _split_cpus(overrides.cpus, per_socket)
            topology.set("sockets", str(sockets))
            if kept == 1:
                for key in ("dies", "clusters", "cores", "threads"):
                    if key in topology.attrib:
                        topology.set(key, "1")
    nvram = root.find("os/nvram")
    if nvram is not None and (nvram.text or "").strip():
        # The path names the old VM's UEFI variable store; without it libvirt creates one
        # for the new VM from the template (boot entries fall back to the default loader).
        nvram.text = None
        notes.append("UEFI NVRAM path dropped (libvirt creates a new one)")
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":
            # Labels generated for the running original; reusing them breaks sVirt isolation.
            for child in list(seclabel):
                if child.tag in ("label", "imagelabel"):
                    seclabel.remove(child)
    devices = root.find("devices")
    used: set[str] = set()
    for disk in list(devices) if devices is not None else []:
        if disk.tag != "disk" or disk.get("device", "disk") not in ("disk", "lun"):
            continue
        assert devices is not None
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        restore = disks.get(dev)
        if restore is None:
            devices.remove(disk)
            notes.append(f"disk {dev or '?'} dropped (no restore disk given for it)")
            continue
        used.add(dev)
        disk.set("type", "file")
        if disk.get("device") == "lun":
            disk.set("device", "disk")
        disk.attrib.pop("snapshot", None)
        source = disk.find("source")
        index = list(disk).index(source) if source is not None else 0
        if source is not None:
            disk.remove(source)
        new_source = ET.Element("source", {"file": str(restore.path)})
        new_source.tail = source.tail if source is not None else None
        disk.insert(index, new_source)
        for child in disk.findall("backingStore"):
            # The captured chain belongs to the original image; the restore disk's own
            # chain is in its qcow2 header.
            disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("type", restore.format)
    for interface in root.iterfind("devices/interface"):
        for mac in interface.findall("mac"):
            # Two VMs with one MAC address break the network; libvirt generates a new one.
            interface.remove(mac)
            notes.append("MAC address of an interface dropped (libvirt generates a new one)")
    _unused(disks, used, notes)
    return RenderedConfig(f"{new_name}.xml", _serialize(doc), "libvirt", tuple(notes))


def _unused(disks: Mapping[str, RestoreDisk], used: set[str], notes: list[str]) -> None:
    missing = sorted(set(disks) - used)
    if missing:
        raise SnapfsUserError(
            f"the captured configuration has no disk {', '.join(map(repr, missing))}"
        )


# --- OVF ----------------------------------------------------------------------------------


def _xsi_type(element: ET.Element) -> str:
    return element.get(f"{{{XSI_NS}}}type", "").rsplit(":", 1)[-1]


def _sections(root: ET.Element, kind: str) -> list[tuple[ET.Element, ET.Element]]:
    """(parent, section) for every section of type ``kind``, anywhere: oVirt writes
    ``<Section xsi:type="ovf:DiskSection_Type">``, standard OVF ``<ovf:DiskSection>``."""
    plain = kind.removesuffix("_Type")
    found = []
    for parent in root.iter():
        for child in parent:
            if not isinstance(child.tag, str):
                continue
            local = child.tag.rsplit("}", 1)[-1]
            if (local == "Section" and _xsi_type(child) == kind) or local == plain:
                found.append((parent, child))
    return found


def _first(element: ET.Element, *tags: str) -> ET.Element | None:
    for tag in tags:
        found = element.find(tag)
        if found is not None:
            return found
    return None


def _replace_everywhere(root: ET.Element, old: str, new: str) -> None:
    """Replace an id in every attribute value and text (references stay consistent)."""
    if not old:
        return
    for element in root.iter():
        for key, value in element.attrib.items():
            if old in value:
                element.set(key, value.replace(old, new))
        if element.text and old in element.text:
            element.text = element.text.replace(old, new)


def _item_text(item: ET.Element, tag: str) -> str:
    child = item.find(_rasd(tag))
    return (child.text or "").strip() if child is not None else ""


def _render_ovf(
    doc: _Document,
    disks: Mapping[str, RestoreDisk],
    overrides: Overrides,
    positional: Sequence[str],
) -> RenderedConfig:
    root = doc.root
    notes: list[str] = []
    content = _first(root, "Content", _ovf("Content"), _ovf("VirtualSystem"))
    if content is None:
        raise SnapfsUserError("OVF has no Content (VirtualSystem) element")
    name_tag = _ovf("Name") if content.find(_ovf("Name")) is not None else "Name"
    old_name = (content.findtext(name_tag) or "vm").strip()
    new_name = overrides.name or f"{old_name}-restored"
    _set_text(content, name_tag, new_name)
    # oVirt keeps the VM id on the OperatingSystemSection; everything referring to it
    # (and to the disks' ids below) is rewritten at once, so references stay intact.
    for _parent, section in _sections(content, "OperatingSystemSection_Type"):
        old_id = section.get(_ovf("id"), "")
        if old_id:
            _replace_everywhere(root, old_id, overrides.new_id())
    for parent, section in _sections(root, "SnapshotsSection_Type"):
        # The original VM's snapshot history; a new VM starts without snapshots.
        parent.remove(section)
        notes.append("snapshot history dropped")

    references = _first(root, "References", _ovf("References"))
    files = list(references) if references is not None else []
    ovf_disks = [
        (section, disk)
        for _parent, section in _sections(root, "DiskSection_Type")
        for disk in section
        if disk.tag in ("Disk", _ovf("Disk"))
    ]
    hardware = [s for _p, s in _sections(root, "VirtualHardwareSection_Type")]
    items = [(h, item) for h in hardware for item in h if item.tag in ("Item", _ovf("Item"))]

    def keys(disk: ET.Element) -> list[str]:
        disk_id = disk.get(_ovf("diskId"), "")
        file_ref = disk.get(_ovf("fileRef"), "")
        return [
            k
            for k in (disk_id, file_ref, file_ref.split("/")[0], disk.get(_ovf("disk-alias"), ""))
            if k
        ]

    assignment: dict[int, str] = {}
    for index, (_section, disk) in enumerate(ovf_disks):
        for key in keys(disk):
            if key in disks:
                assignment[index] = key
                break
    if not assignment and len(positional) == len(ovf_disks):
        # Nothing matched by id or alias: the repository names disks like vda, the OVF by
        # uuid. The snapshot's disks (in name order) then pair with the OVF's, in order.
        assignment = {i: key for i, key in enumerate(positional) if key in disks}

    used: set[str] = set()
    for index, (section, disk) in enumerate(ovf_disks):
        old_keys = keys(disk)
        chosen = assignment.get(index)
        linked = [
            f for f in files if f.get(_ovf("id")) in old_keys or f.get(_ovf("href")) in old_keys
        ]
        linked_items = [
            (h, item)
            for h, item in items
            if _item_text(item, "ResourceType") == _RT_DISK
            and (
                _item_text(item, "HostResource") in old_keys
                or _item_text(item, "HostResource").removeprefix("ovf:/disk/") in old_keys
                or _item_text(item, "InstanceId") in old_keys
            )
        ]
        if chosen is None:
            section.remove(disk)
            for f in linked:
                assert references is not None
                references.remove(f)
            for h, item in linked_items:
                h.remove(item)
            notes.append(
                f"disk {disk.get(_ovf('disk-alias')) or disk.get(_ovf('diskId'))} dropped "
                "(no restore disk given for it)"
            )
            continue
        used.add(chosen)
        restore = disks[chosen]
        # New image ids: oVirt's "group/image" pairs, or a plain disk id.
        file_ref = disk.get(_ovf("fileRef"), "")
        for old in dict.fromkeys([*file_ref.split("/"), disk.get(_ovf("diskId"), "")]):
            if _looks_like_uuid(old):
                _replace_everywhere(root, old, overrides.new_id())
        for f in linked:
            f.set(_ovf("href"), str(restore.path))
            if _ovf("size") in f.attrib:
                f.set(_ovf("size"), str(_file_size(restore.path)))
        if _ovf("capacity") in disk.attrib:
            disk.set(_ovf("capacity"), str(restore.virtual_size))
            disk.attrib.pop(_ovf("capacityAllocationUnits"), None)
        elif _ovf("size") in disk.attrib:
            disk.set(_ovf("size"), str(max(1, math.ceil(restore.virtual_size / _GIB))))
        if _ovf("format") in disk.attrib:
            disk.set(_ovf("format"), _OVF_QCOW2)
        if _ovf("volume-format") in disk.attrib:
            disk.set(_ovf("volume-format"), "COW")
        # Position in the original VM's snapshot chain; the restore disk is a new base.
        disk.attrib.pop(_ovf("vm_snapshot_id"), None)
        if _ovf("parentRef") in disk.attrib:
            disk.set(_ovf("parentRef"), "")

    for _hw, item in items:
        kind = _item_text(item, "ResourceType")
        if kind == _RT_NIC:
            for mac in item.findall(_rasd("MACAddress")):
                # A copied MAC clashes with the original VM; oVirt assigns one from its pool.
                item.remove(mac)
                notes.append("MAC address of a network interface dropped")
        elif kind == _RT_MEMORY and overrides.memory_mib is not None:
            _set_text(item, _rasd("VirtualQuantity"), str(overrides.memory_mib))
            if item.find(_rasd("AllocationUnits")) is not None:
                _set_text(item, _rasd("AllocationUnits"), "MegaBytes")
            if item.find(_rasd("Caption")) is not None:
                _set_text(item, _rasd("Caption"), f"{overrides.memory_mib} MB of memory")
        elif kind == _RT_CPU and overrides.cpus is not None:
            per_socket = 1
            for tag in ("cpu_per_socket", "threads_per_cpu"):
                per_socket *= int(_item_text(item, tag) or "1")
            sockets, kept = _split_cpus(overrides.cpus, per_socket)
            _set_text(item, _rasd("num_of_sockets"), str(sockets))
            if kept == 1:
                for tag in ("cpu_per_socket", "threads_per_cpu"):
                    if item.find(_rasd(tag)) is not None:
                        _set_text(item, _rasd(tag), "1")
            for tag in ("VirtualQuantity", "Caption"):
                if item.find(_rasd(tag)) is not None:
                    text = str(overrides.cpus) + (" virtual cpu" if tag == "Caption" else "")
                    _set_text(item, _rasd(tag), text)
    if overrides.memory_mib is not None:
        # oVirt's own limits must admit the new size.
        for tag, bigger in (("MaxMemorySizeMb", True), ("MinAllocatedMem", False)):
            element = content.find(tag)
            if element is not None and (element.text or "").strip().isdigit():
                value = int(element.text or "0")
                if (value < overrides.memory_mib) if bigger else (value > overrides.memory_mib):
                    element.text = str(overrides.memory_mib)
    _unused(disks, used, notes)
    return RenderedConfig(f"{new_name}.ovf", _serialize(doc), "ovf", tuple(notes))


def _looks_like_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- entry point --------------------------------------------------------------------------


def config_kind(path: Path) -> str | None:
    """``"libvirt"``, ``"ovf"`` or None: what kind of VM configuration ``path`` holds."""
    try:
        for _event, element in ET.iterparse(str(path), events=("start",)):
            if element.tag == "domain":
                return "libvirt"
            if element.tag == _ovf("Envelope"):
                return "ovf"
            return None
    except (ET.ParseError, OSError):
        return None
    return None


def render_vm_config(
    disks: Mapping[str, RestoreDisk],
    config: Path,
    overrides: Overrides,
    *,
    snapshot_disks: Sequence[str] = (),
) -> RenderedConfig:
    """The configuration of a new VM from ``config`` (libvirt domain XML or OVF), its disks
    replaced by the restore disks in ``disks`` (keyed by the configuration's disk names).

    ``snapshot_disks`` (the snapshot's disk names, in order) pairs OVF disks with restore
    disks by position when no OVF disk id or alias matches a key. Raises
    ``SnapfsUserError`` for an unknown format or a key the configuration does not have.
    """
    if overrides.memory_mib is not None and overrides.memory_mib <= 0:
        raise SnapfsUserError("--memory must be a positive number of MiB")
    if overrides.cpus is not None and overrides.cpus <= 0:
        raise SnapfsUserError("--cpus must be a positive number")
    if overrides.name is not None and (not overrides.name.strip() or "/" in overrides.name):
        raise SnapfsUserError("a VM name must be non-empty and contain no '/'")
    doc = _parse(config)
    if doc.root.tag == "domain":
        return _render_libvirt(doc, disks, overrides)
    if doc.root.tag == _ovf("Envelope"):
        return _render_ovf(doc, disks, overrides, sorted(snapshot_disks))
    raise SnapfsUserError(
        f"{config}: not a libvirt domain or an OVF envelope (root element {doc.root.tag!r})"
    )
