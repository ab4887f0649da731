"""A small sample repository, and the disk-building helpers behind it (also used by tests).

This module owns ``build_sample_repository`` (``snapfs repo sample DIR``): two VMs with three
snapshots each, real partitioned ext4 guest filesystems, later snapshots stored as qcow2
overlays. It needs no appliance, no root and no mount: filesystems are built with
``mkfs.ext4 -d`` from a directory tree, partition tables with ``sfdisk`` on a plain file,
and later changes are written with ``debugfs -w`` straight into the disk image (e2fsprogs
accepts ``image?offset=N`` to address a partition inside a whole-disk image).

Everything is blocking and takes a few seconds.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from snapfs.catalog import writer
from snapfs.errors import SnapfsUserError

# The first partition starts at 1 MiB, as every modern partitioning tool aligns it.
PARTITION_OFFSET = 1 << 20
# GPT keeps a backup header in the last 33 sectors; leaving 1 MiB free at the end keeps the
# filesystem clear of it (and looks like what installers do).
_TAIL_RESERVE = 1 << 20
_GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# External tools get a generous bound: each call here takes milliseconds on a healthy host.
_TOOL_TIMEOUT = 60.0
_MIB = 1 << 20


def _run(args: list[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SnapfsUserError(
            f"{args[0]} is not installed (needed to build sample disks)"
        ) from None
    if proc.returncode != 0:
        raise SnapfsUserError(f"{args[0]} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset`` without writing its zero blocks (like
    ``dd conv=notrunc,sparse``), so the disk stays sparse and the copy is fast."""
    block = 64 * 1024
    zero = bytes(block)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        pos = 0
        while chunk := fin.read(block):
            if chunk != zero[: len(chunk)]:
                fout.seek(offset + pos)
                fout.write(chunk)
            pos += len(chunk)


def make_ext4_fs(tree: Path, out: Path, size: int, *, label: str = "root") -> None:
    """Create ``out``, a ``size``-byte ext4 filesystem image holding a copy of ``tree``."""
    out.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), str(out), f"{size // 1024}k"])


def make_ext4_disk(
    tree: Path, out: Path, size: int, partitioned: bool = True, *, table: str = "gpt"
) -> int:
    """Create the raw disk ``out`` of ``size`` bytes holding an ext4 copy of ``tree``.

    With ``partitioned``, the disk gets a ``table`` ("gpt" or "dos") partition table with one
    Linux partition at ``PARTITION_OFFSET``; otherwise the filesystem is the whole disk.
    Returns the byte offset of the filesystem in the disk.
    """
    if not partitioned:
        make_ext4_fs(tree, out, size)
        return 0
    if table not in ("gpt", "dos"):
        raise ValueError(f"unknown partition table {table!r}")
    part_size = size - PARTITION_OFFSET - _TAIL_RESERVE
    if part_size < 4 * _MIB:
        raise ValueError("disk too small for a partitioned ext4 filesystem")
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    kind = _GPT_LINUX if table == "gpt" else "83"
    script = (
        f"label: {table}\nstart={PARTITION_OFFSET // 512}, size={part_size // 512}, type={kind}\n"
    )
    _run(["sfdisk", "-q", str(out)], input=script)
    with tempfile.TemporaryDirectory(prefix="snapfs-part-", dir=out.parent) as tmp:
        part = Path(tmp) / "part.raw"
        make_ext4_fs(tree, part, part_size)
        _copy_sparse(part, out, PARTITION_OFFSET)
    return PARTITION_OFFSET


def _debugfs_target(disk: Path, offset: int) -> str:
    return f"{disk}?offset={offset}" if offset else str(disk)


def _quote(path: str) -> str:
    if '"' in path or "\n" in path:
        raise ValueError(f"debugfs cannot address {path!r}")
    return f'"{path}"'


def edit_ext4(
    disk: Path,
    offset: int,
    *,
    writes: Mapping[str, bytes] | None = None,
    removes: Iterable[str] = (),
) -> None:
    """Change files of the ext4 filesystem at ``offset`` in ``disk``, in place, unmounted.

    ``writes`` maps absolute guest paths to new contents (parent directories are created);
    ``removes`` lists guest paths to delete.
    """
    commands: list[str] = []
    made: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="snapfs-edit-") as tmp:
        for path in removes:
            commands.append(f"rm {_quote(path)}")
        for i, (path, data) in enumerate((writes or {}).items()):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                parent = "/" + "/".join(parts[:depth])
                if parent not in made:
                    made.add(parent)
                    # Fails harmlessly ("File exists") when the directory is already there.
                    commands.append(f"mkdir {_quote(parent)}")
            host = Path(tmp) / f"f{i}"
            host.write_bytes(data)
            commands.append(f"rm {_quote(path)}")
            commands.append(f"write {_quote(str(host))} {_quote(path)}")
        script = Path(tmp) / "cmds"
        script.write_text("\n".join(commands) + "\n", encoding="utf-8")
        _run(["debugfs", "-w", "-f", str(script), _debugfs_target(disk, offset)])


def read_guest_file(disk: Path, path: str, offset: int = PARTITION_OFFSET) -> bytes:
    """The content of ``path`` in the ext4 filesystem at ``offset`` of the raw ``disk``.

    Raises ``FileNotFoundError`` when the file does not exist.
    """
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {_quote(path)}", _debugfs_target(disk, offset)],
        capture_output=True,
        timeout=_TOOL_TIMEOUT,
        check=False,
    )
    if b"not found" in proc.stderr or proc.returncode != 0:
        raise FileNotFoundError(path)
    return proc.stdout


# --- the sample ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleDisk:
    name: str
    size: int
    table: str  # "gpt" or "dos"


@dataclass
class SampleRepository:
    """What ``build_sample_repository`` wrote, for tests and the CLI summary."""

    path: Path
    # (vm name, snapshot name, disk name) -> guest path -> expected content, or None when
    # the file must not exist in that snapshot.
    expected: dict[tuple[str, str, str], dict[str, bytes | None]] = field(default_factory=dict)
    partition_offset: int = PARTITION_OFFSET


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _base_tree(hostname: str, seed: int) -> dict[str, bytes]:
    return {
        "/etc/hostname": f"{hostname}\n".encode(),
        "/etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n',
        "/etc/fstab": b"LABEL=root / ext4 defaults 0 1\n",
        "/home/alice/notes.txt": b"buy milk\n",
        "/home/alice/My Documents/résumé.txt": b"Alice, engineer\n",
        "/var/log/messages": b"".join(f"boot {i}\n".encode() for i in range(200)),
        "/opt/app/data.bin": _blob(seed, 256 * 1024),
    }


def _write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for path, data in files.items():
        host = root / path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data)
    (root / "var" / "empty").mkdir(parents=True, exist_ok=True)


_DOMAIN_XML = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f</uuid>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}-vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""

_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.4.0.0">
  <References>
    <File ovf:href="{disk_id}" ovf:id="{disk_id}" ovf:size="{size}"/>
  </References>
  <Section xsi:type="ovf:DiskSection_Type">
    <Disk ovf:diskId="{disk_id}" ovf:size="{size_gib}" ovf:fileRef="{disk_id}"
        ovf:format="http://www.vmware.com/specifications/vmdk.html#sparse"/>
  </Section>
  <Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type">
    <Name>{name}</Name>
    <Section xsi:type="ovf:OperatingSystemSection_Type" ovf:id="{vm_uuid}">
      <Description>debian_12</Description>
    </Section>
    <Section xsi:type="ovf:VirtualHardwareSection_Type">
      <Item>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:num_of_sockets>1</rasd:num_of_sockets>
        <rasd:cpu_per_socket>2</rasd:cpu_per_socket>
      </Item>
      <Item>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:ResourceType>17</rasd:ResourceType>
        <rasd:HostResource>{disk_id}</rasd:HostResource>
      </Item>
    </Section>
  </Content>
</ovf:Envelope>
"""

# Each VM: its disks (the first holds the OS tree, the others a data tree), its configuration
# file, and the changes each later snapshot makes: (description, writes, removes) per disk.
_Change = tuple[dict[str, bytes], list[str]]


def build_sample_repository(dest: Path, *, now: float | None = None) -> SampleRepository:
    """Create a repository at ``dest`` (new or empty) with two VMs of three snapshots each.

    * ``web-01``: disks ``vda`` (GPT, OS tree) and ``vdb`` (MBR, data), libvirt domain XML;
    * ``db-01``: disk ``vda`` (GPT), oVirt OVF.

    Snapshots are a day apart, ending ``now``; the second and third are incremental.
    """
    end = time.time() if now is None else now
    writer.init_repository(dest)
    sample = SampleRepository(path=dest)
    with tempfile.TemporaryDirectory(prefix="snapfs-sample-") as tmp_name:
        tmp = Path(tmp_name)
        vms = [
            ("web-01", [SampleDisk("vda", 32 * _MIB, "gpt"), SampleDisk("vdb", 16 * _MIB, "dos")]),
            ("db-01", [SampleDisk("vda", 32 * _MIB, "gpt")]),
        ]
        for vm_index, (vm_name, disks) in enumerate(vms):
            config = tmp / f"{vm_name}-config"
            config.mkdir()
            if vm_name.startswith("web"):
                cfg = config / "domain.xml"
                cfg.write_text(_DOMAIN_XML.format(name=vm_name), encoding="utf-8")
            else:
                cfg = config / "config.ovf"
                cfg.write_text(
                    _OVF.format(
                        name=vm_name,
                        disk_id="5b1e9a3c-2f4d-4e6a-9b8c-7d6e5f4a3b2c",
                        size=32 * _MIB,
                        size_gib=1,
                        vm_uuid="0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
                    ),
                    encoding="utf-8",
                )
            contents: dict[str, dict[str, bytes]] = {}
            raws: dict[str, Path] = {}
            for disk_index, disk in enumerate(disks):
                files = (
                    _base_tree(vm_name, seed=vm_index * 10 + disk_index)
                    if disk_index == 0
                    else {
                        "/README": f"data disk {disk.name} of {vm_name}\n".encode(),
                        "/archive/2025.tar": _blob(100 + vm_index, 512 * 1024),
                    }
                )
                tree = tmp / f"{vm_name}-{disk.name}-tree"
                _write_tree(tree, files)
                raw = tmp / f"{vm_name}-{disk.name}.raw"
                make_ext4_disk(tree, raw, disk.size, table=disk.table)
                raws[disk.name] = raw
                contents[disk.name] = dict(files)
            changes = _changes(vm_name, [d.name for d in disks])
            descriptions = ["initial install", "package updates", "new user data"]
            for snap_index, description in enumerate(descriptions):
                if snap_index > 0:
                    for disk_name, (writes, removes) in changes[snap_index - 1].items():
                        edit_ext4(raws[disk_name], PARTITION_OFFSET, writes=writes, removes=removes)
                        for path in removes:
                            contents[disk_name].pop(path, None)
                        contents[disk_name].update(writes)
                added = writer.add_snapshot(
                    dest,
                    vm_name,
                    [writer.DiskSource(d.name, raws[d.name], "raw") for d in disks],
                    config_files=[cfg],
                    incremental=snap_index > 0,
                    description=description,
                    created=end - (len(descriptions) - 1 - snap_index) * 86400.0,
                )
                for d in disks:
                    # Every path a change touches is listed, so removed files are checked too.
                    expected: dict[str, bytes | None] = dict.fromkeys(
                        path
                        for change in changes
                        for writes, removes in [change.get(d.name, ({}, []))]
                        for path in [*writes, *removes]
                    )
                    expected.update(contents[d.name])
                    sample.expected[(vm_name, added.name, d.name)] = expected
            for raw in raws.values():
                raw.unlink()
            shutil.rmtree(config)
    return sample


def _changes(vm_name: str, disk_names: list[str]) -> list[dict[str, _Change]]:
    """The edits of snapshot 2 and 3: modified, added and removed files on each disk."""
    first = disk_names[0]
    snap2: dict[str, _Change] = {
        first: (
            {
                "/etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12.5 (bookworm)"\nID=debian\n',
                "/usr/local/bin/backup.sh": b"#!/bin/sh\nexec true\n",
            },
            ["/var/log/messages"],
        )
    }
    snap3: dict[str, _Change] = {
        first: (
            {
                "/home/alice/notes.txt": b"buy milk\nbuy eggs\n",
                "/home/bob/hello.txt": f"hello from {vm_name}\n".encode(),
                "/opt/app/data.bin": _blob(7, 300 * 1024),
            },
            ["/usr/local/bin/backup.sh"],
        )
    }
    for other in disk_names[1:]:
        snap2[other] = ({"/archive/2026.tar": _blob(200, 128 * 1024)}, [])
        snap3[other] = ({"/README": b"data disk, reorganised\n"}, ["/archive/2025.tar"])
    return [snap2, snap3]
