"""API ↔ kernel device names, and the device map built on kernel names (no appliance)."""

from __future__ import annotations

from snapfs.guestfs import extents
from snapfs.guestfs.devnames import DeviceNames, Probe, probe
from snapfs.guestfs.tree import btrfsvol_api_names, simple_filesystems

# The appliance scanned its disks out of order: the API's sda (first drive) is the kernel's sdb.
SWAPPED = DeviceNames({"/dev/sda": "/dev/sdb", "/dev/sdb": "/dev/sdc", "/dev/sdc": "/dev/sda"})


def test_disks_and_partitions_translate_both_ways() -> None:
    assert SWAPPED.to_kernel("/dev/sda") == "/dev/sdb"
    assert SWAPPED.to_kernel("/dev/sda12") == "/dev/sdb12"
    assert SWAPPED.to_api("/dev/sdb12") == "/dev/sda12"
    assert SWAPPED.to_api("/dev/sda1") == "/dev/sdc1"
    for dev in ("/dev/sda", "/dev/sdb3", "/dev/sdc1"):
        kernel = SWAPPED.to_kernel(dev)
        assert kernel is not None and SWAPPED.to_api(kernel) == dev


def test_unknown_disks_and_other_devices() -> None:
    assert SWAPPED.to_kernel("/dev/sdd1") is None  # not one of ours (the appliance's disk)
    assert SWAPPED.to_api("/dev/sdd") is None
    # LVM and device-mapper names are the same on both sides
    assert SWAPPED.to_kernel("/dev/vg0/lv0") == "/dev/vg0/lv0"
    assert SWAPPED.to_kernel("/dev/mapper/vg0-lv0") == "/dev/mapper/vg0-lv0"
    assert SWAPPED.to_kernel("/dev/md127") == "/dev/md127"
    assert SWAPPED.to_kernel("btrfsvol:/dev/sda1/home") is None


def test_kernel_disk_index_follows_drive_order() -> None:
    assert SWAPPED.kernel_disk_index(["/dev/sda", "/dev/sdb", "/dev/sdc"]) == {
        "sdb": 0, "sdc": 1, "sda": 2,
    }


class _FakeAppliance:
    """Stands in for the handle's ``debug sh`` (the real one is tested in test_tree.py)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.commands: list[str] = []

    def debug(self, _sub: str, argv: list[str]) -> str:
        self.commands.append(argv[0])
        return self.answer


def test_probe_reads_label_links_partitions_and_blkid() -> None:
    out = "K /dev/sdb /dev/sda\nP /dev/sdb1 /dev/sdb2\n=== snapfs blkid ===\nDEVNAME=/dev/sdb1\n"
    g = _FakeAppliance(out)
    found = probe(g, {"da": "/dev/sda", "db": "/dev/sdb", "da1": "/dev/sda1"})
    assert found.names is not None and found.names.to_kernel("/dev/sda1") == "/dev/sdb1"
    assert found.partitions == ["/dev/sdb1", "/dev/sdb2"]
    assert found.blkid == "DEVNAME=/dev/sdb1\n"
    assert "readlink -f /dev/disk/guestfs/da /dev/disk/guestfs/db" in g.commands[0]


def test_probe_refuses_missing_links() -> None:
    labels = {"da": "/dev/sda", "db": "/dev/sdb"}
    # readlink -f prints the link's own path when it does not exist, nothing for a bad dir
    assert probe(_FakeAppliance("K /dev/sdb /dev/disk/guestfs/db\nP\n"), labels).names is None
    assert probe(_FakeAppliance("K /dev/sdb\nP\n"), labels).names is None
    assert probe(_FakeAppliance(""), {}).names is None


def test_simple_filesystems_translate_blkid_names() -> None:
    """blkid's kernel names come back as the API's; an untyped partition or LVM sends
    discovery to list_filesystems."""
    blkid = "\n\n".join([
        "DEVNAME=/dev/sdb\nPTTYPE=gpt",
        "DEVNAME=/dev/sdb1\nTYPE=ext4",
        "DEVNAME=/dev/sdb2\nTYPE=xfs",
        "DEVNAME=/dev/sda\nTYPE=vfat",
    ])
    names = DeviceNames({"/dev/sda": "/dev/sdb", "/dev/sdb": "/dev/sda"})
    found = Probe(names, ["/dev/sdb1", "/dev/sdb2"], blkid)
    assert simple_filesystems(["/dev/sda", "/dev/sdb"], found) == {
        "/dev/sda1": "ext4", "/dev/sda2": "xfs", "/dev/sdb": "vfat",
    }
    untyped = Probe(names, ["/dev/sdb1", "/dev/sdb2", "/dev/sdb3"], blkid)
    assert simple_filesystems(["/dev/sda", "/dev/sdb"], untyped) is None
    lvm = Probe(names, ["/dev/sdb1"], blkid.replace("TYPE=ext4", "TYPE=LVM2_member"))
    assert simple_filesystems(["/dev/sda"], lvm) is None
    assert simple_filesystems(["/dev/sda"], Probe(None)) is None


def test_devmap_on_kernel_names_lands_on_the_right_drive() -> None:
    # Kernel sdb (drive 0) has partition sdb1 at sector 2048; kernel sda (drive 2) is a PV.
    out = b"\n".join([
        b"B sda 8:0 - 2097152",
        b"B sdb 8:16 - 2097152",
        b"B sdb1 8:17 2048 1000000",
        b"R /dev/sdb1",
    ])
    kernel = SWAPPED.to_kernel("/dev/sda1")
    assert kernel == "/dev/sdb1"
    devmap = extents.parse_devmap(out, SWAPPED.kernel_disk_index(["/dev/sda", "/dev/sdb",
                                                                   "/dev/sdc"]))
    assert devmap == (extents.Segment(0, 1000000 * 512, 0, 2048 * 512),)


def test_btrfs_subvolume_devices_get_api_names() -> None:
    # The appliance kernel named the drives in reverse: the btrfs disk (API /dev/sdb) is the
    # kernel's sda, and libguestfs's list_filesystems left that name in its btrfsvol entries.
    names = DeviceNames({"/dev/sda": "/dev/sdb", "/dev/sdb": "/dev/sda"})
    listed = {
        "/dev/sda1": "ext4",
        "/dev/sdb": "btrfs",
        "btrfsvol:/dev/sda/data": "btrfs",
        "btrfsvol:/dev/sda/vols/inner": "btrfs",
    }
    assert btrfsvol_api_names(listed, names) == {
        "/dev/sda1": "ext4",
        "/dev/sdb": "btrfs",
        "btrfsvol:/dev/sdb/data": "btrfs",
        "btrfsvol:/dev/sdb/vols/inner": "btrfs",
    }
    # Already in API names (a libguestfs that translates), or in order: unchanged.
    fine = {"/dev/sda1": "ext4", "/dev/sdb": "btrfs", "btrfsvol:/dev/sdb/data": "btrfs"}
    assert btrfsvol_api_names(fine, names) == fine
    assert btrfsvol_api_names(listed, None) == listed
