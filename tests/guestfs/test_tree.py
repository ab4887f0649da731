"""The guest view against a real TCG appliance: one shared launch for all tests here."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapfs.errors import GuestfsError, NotFound, SnapfsError
from snapfs.guestfs import GuestfsSettings, GuestSession, GuestTree, devnames
from snapfs.guestfs.session import find_qemu_pids
from snapfs.guestfs.tree import simple_filesystems

from .conftest import BIG_SIZE, LV_FILE, RawReader

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

TCG = GuestfsSettings(backend="tcg")


@pytest.fixture(scope="session")
def session(disks: list[tuple[str, str]]) -> Iterator[GuestSession]:
    s = GuestSession("test-snap", disks, TCG)
    yield s
    trio.run(s.aclose)
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == [], "qemu left after close"


@pytest.fixture(scope="session")
def tree(session: GuestSession, raw_reader: RawReader) -> GuestTree:
    return GuestTree(session, read_raw=raw_reader, ino_salt=b"snap-1")


@pytest.fixture(scope="session")
def slow_tree(session: GuestSession) -> GuestTree:
    """The same session without the fast path: every byte through the appliance."""
    return GuestTree(session, ino_salt=b"snap-1")


async def test_volumes_and_no_os(tree: GuestTree) -> None:
    vols = {v.name: v.fstype for v in await tree.volumes()}
    assert vols == {
        "vda1": "ext4", "vda2": "xfs", "vda3": "vfat", "vda4": "ext4", "vdb": "btrfs",
        "vg0-lv0": "ext4",
    }
    assert await tree.os_mountpoints() is None
    # No OS and several filesystems: files/ is absent.
    assert await tree.files_view() is None
    with pytest.raises(NotFound):
        await tree.volume_view("nope")


async def test_simple_discovery_equals_list_filesystems(tree: GuestTree) -> None:
    """One blkid run stands in for list_filesystems on plain layouts, with the same answer;
    LVM and btrfs send discovery to list_filesystems."""

    def simple_settled(g, devs):  # type: ignore[no-untyped-def]
        # blkid can race the appliance's udev probing (a partition without TYPE for a
        # moment): the product then falls back to list_filesystems; here, settle and retry.
        for _ in range(3):
            found = simple_filesystems(devs, devnames.probe(g, g.list_disk_labels()))
            if found is not None:
                return found
            g.debug("sh", ["udevadm settle; true"])
        return None

    def compare(g, _state):  # type: ignore[no-untyped-def]
        labels = g.list_disk_labels()
        devices = tree._devices_in_drive_order(g, labels)
        probe = devnames.probe(g, labels)
        names = probe.names
        assert names is not None
        assert sorted(devices) == sorted(g.list_devices())  # labels name every user disk
        # the shell's partition glob found what the API lists
        assert sorted(filter(None, map(names.to_api, probe.partitions))) == sorted(
            g.list_partitions()
        )
        full = g.list_filesystems()
        by_disk = {}
        for dev in devices:
            by_disk[dev] = (
                simple_settled(g, [dev]),
                {k: v for k, v in full.items() if k.rstrip("0123456789") == dev},
                g.debug("sh", [
                    f"blkid -c /dev/null -o export -s TYPE -s PTTYPE {names.to_kernel(dev)}*; true"
                ]),
            )
        return simple_filesystems(devices, probe), by_disk

    everything, by_disk = await tree.session.call(compare)
    assert everything is None  # this snapshot has btrfs and LVM
    simple = [dev for dev, (fast, _, _) in by_disk.items() if fast is not None]
    assert simple, by_disk  # the partitioned disk (ext4, xfs, vfat) qualifies
    for dev, (fast, full, raw) in by_disk.items():
        if fast is not None:
            assert fast == full, (dev, raw)
            assert {"ext4", "xfs", "vfat"} <= set(fast.values()) or fast


async def test_kernel_names_name_the_right_disks(
    tree: GuestTree, raw_reader: RawReader, disks: list[tuple[str, str]]
) -> None:
    """Shell scripts get the kernel's name for each drive, whatever order the appliance
    scanned its disks in: the first 64 KiB the appliance reads there are that drive's as its
    NBD export serves them (two GPTs with their own GUIDs and btrfs's zeroes before its
    superblock, which a btrfs mount in the appliance's overlay may change, at 64 KiB)."""

    def read_heads(g, _state):  # type: ignore[no-untyped-def]
        labels = g.list_disk_labels()
        devices = tree._devices_in_drive_order(g, labels)
        names = devnames.probe(g, labels).names
        assert names is not None
        out = []
        for dev in devices:
            kernel = names.to_kernel(dev)
            assert kernel is not None and names.to_api(kernel) == dev
            out.append(g.debug("sh", [f"head -c 65536 {kernel} | md5sum"]).split()[0])
        return out

    heads = await tree.session.call(read_heads)
    expected = [
        hashlib.md5(await raw_reader(name, 0, 65536)).hexdigest() for name, _ in disks
    ]
    assert len(set(expected)) == len(expected)
    assert heads == expected


async def _walk(tree: GuestTree, view_name: str, src: Path) -> None:
    """Every entry of the guest view equals the source tree: names, metadata, data."""
    view = await tree.volume_view(view_name)
    inodes: dict[int, int] = {}

    async def walk(gpath: bytes, spath: bytes) -> None:
        entries = {e.name: e.stat for e in await tree.listdir(view, gpath)}
        expected = set(os.listdir(spath))
        if gpath == b"/":
            entries.pop(b"lost+found", None)
        assert set(entries) == expected, gpath
        for name, st in entries.items():
            child_g = (gpath.rstrip(b"/")) + b"/" + name
            child_s = spath + b"/" + name
            ls = os.lstat(child_s)
            assert st.mode == ls.st_mode, child_g
            assert (st.uid, st.gid) == (ls.st_uid, ls.st_gid), child_g
            # mkfs.ext4 -d copies whole seconds only (debugfs shows :00000000): the guest
            # has no nanoseconds here; btrfs below checks them.
            assert st.mtime_ns // 10**9 == ls.st_mtime_ns // 10**9, child_g
            assert st.nlink == ls.st_nlink, child_g
            if not stat.S_ISDIR(ls.st_mode):
                assert st.size == ls.st_size, child_g
            assert await tree.getattr(view, child_g) == st
            inodes.setdefault(ls.st_ino, st.ino)
            assert inodes[ls.st_ino] == st.ino, f"hard links differ: {child_g!r}"
            if stat.S_ISLNK(ls.st_mode):
                assert await tree.readlink(view, child_g) == os.readlink(child_s)
            elif stat.S_ISCHR(ls.st_mode):
                assert st.rdev == ls.st_rdev
            elif stat.S_ISREG(ls.st_mode):
                with open(child_s, "rb") as f:
                    want = f.read()
                assert await tree.read(view, child_g, 0, len(want) + 10) == want, child_g
            elif stat.S_ISDIR(ls.st_mode):
                await walk(child_g, child_s)
            want_x = {n.encode(): os.getxattr(child_s, n, follow_symlinks=False)
                      for n in os.listxattr(child_s, follow_symlinks=False)}
            got_x = {n: await tree.getxattr(view, child_g, n)
                     for n in await tree.listxattr(view, child_g)}
            assert got_x == want_x, child_g

    await walk(b"/", bytes(src))


async def test_ext4_tree_matches_source(tree: GuestTree, images: dict[str, Path]) -> None:
    await _walk(tree, "vda1", images["tree"])
    assert tree.stats["mapped_reads"] > 0
    # ext4 extent maps were read on the host (ext4.py), not by FIEMAP in the appliance.
    assert tree.stats["host_extent_dirs"] > 0
    # The whole volume was listed by the walker (walk.c), its xattrs in the second pass.
    assert tree.stats["walker_passes"] >= 1
    assert tree.stats["xattr_passes"] >= 1


async def test_ext4_through_appliance_only(slow_tree: GuestTree, images: dict[str, Path]) -> None:
    view = await slow_tree.volume_view("vda1")
    src = images["tree"]
    for name in (b"small", b"sparse", b"bad\xff\xfename", b"new\nline", b"odd\xfcdir/inner"):
        want = (bytes(src) + b"/" + name)
        with open(want, "rb") as f:
            data = f.read()
        assert await slow_tree.read(view, b"/" + name, 0, len(data)) == data, name
    # The 24 MiB file in 128 KiB pieces (FUSE-sized), through the chunk cache.
    with open(src / "big", "rb") as f:
        f.seek(5 * 1024 * 1024 + 77)
        want = f.read(3 << 20)
    got = bytearray()
    pos = 5 * 1024 * 1024 + 77
    while len(got) < len(want):
        got += await slow_tree.read(view, b"/big", pos + len(got), 128 * 1024)
    assert bytes(got[: len(want)]) == want
    assert slow_tree.stats["mapped_reads"] == 0


async def test_mapped_equals_appliance(
    tree: GuestTree, slow_tree: GuestTree, images: dict[str, Path], raw_reader: RawReader
) -> None:
    view = await tree.volume_view("vda1")
    slow_view = await slow_tree.volume_view("vda1")
    src = (images["tree"] / "big").read_bytes()
    before = raw_reader.calls
    fast = await tree.read(view, b"/big", 0, BIG_SIZE)
    assert raw_reader.calls > before, "big file was not read from NBD"
    assert fast == src
    for off, n in ((0, 1), (4095, 2), (BIG_SIZE - 5000, 10000), (7 * 1024 * 1024 + 3, 1 << 20)):
        assert await tree.read(view, b"/big", off, n) == await slow_tree.read(
            slow_view, b"/big", off, n) == src[off : off + n]
    sparse = (images["tree"] / "sparse").read_bytes()
    assert await tree.read(view, b"/sparse", 0, len(sparse)) == sparse
    assert await tree.read(view, b"/sparse", 5 * 1024 * 1024 - 10, 100) == sparse[
        5 * 1024 * 1024 - 10 : 5 * 1024 * 1024 + 90]


async def test_xfs_vfat(tree: GuestTree, images: dict[str, Path]) -> None:
    xfs = await tree.volume_view("vda2")
    names = {e.name: e.stat for e in await tree.listdir(xfs, b"/")}
    assert set(names) == {b"big", b"sub"}
    assert stat.S_IMODE(names[b"sub"].mode) == 0o750 and names[b"sub"].uid == 42
    big = images["xfs-big"].read_bytes()
    before = tree.stats["mapped_reads"]
    assert await tree.read(xfs, b"/big", 0, len(big) + 1) == big
    assert tree.stats["mapped_reads"] > before
    assert await tree.read(xfs, b"/sub/small", 0, 100) == images["xfs-small"].read_bytes()
    fat = await tree.volume_view("vda3")
    data = images["fat-data"].read_bytes()
    assert [e.name for e in await tree.listdir(fat, b"/")] == [b"DATA.BIN"]
    assert await tree.read(fat, b"/DATA.BIN", 0, len(data)) == data


async def test_btrfs_whole_disk(tree: GuestTree, images: dict[str, Path]) -> None:
    view = await tree.volume_view("vdb")
    names = {e.name for e in await tree.listdir(view, b"/")}
    assert {b"a.txt", b"big", b"bad\xff\xfename", b"new\nline"} <= names
    st = await tree.getattr(view, b"/small")
    src = os.lstat(images["tree"] / "small")
    assert (st.uid, st.gid, st.mode) == (1234, 5678, src.st_mode)
    big = (images["tree"] / "big").read_bytes()
    # btrfs FIEMAP addresses are not device offsets: read through the appliance.
    before = tree.stats["mapped_reads"]
    assert await tree.read(view, b"/big", 1000, 3 << 20) == big[1000 : 1000 + (3 << 20)]
    assert tree.stats["mapped_reads"] == before


async def test_lvm(tree: GuestTree) -> None:
    view = await tree.volume_view("vg0-lv0")
    host_dirs = tree.stats["host_extent_dirs"]
    assert await tree.read(view, b"/lvfile", 0, 1 << 20) == LV_FILE
    assert (await tree.getattr(view, b"/lvfile")).mtime_ns == 1_500_000_000_987_654_321
    pattern = b"0123456789abcdef" * (20 * 1024 * 1024 // 16)
    before = tree.stats["mapped_reads"]
    assert await tree.read(view, b"/spanning", 0, len(pattern)) == pattern
    assert tree.stats["mapped_reads"] > before, "LV file not mapped through dmsetup"
    # The LV's inodes and extent blocks were read on the host, across both PVs' segments.
    assert tree.stats["host_extent_dirs"] > host_dirs


async def test_broken_filesystem_is_eio(tree: GuestTree) -> None:
    view = await tree.volume_view("vda4")
    with pytest.raises(GuestfsError) as info:
        await tree.listdir(view, b"/")
    assert info.value.errno == errno.EIO
    with pytest.raises(GuestfsError):  # remembered, still an error
        await tree.getattr(view, b"/")


async def test_errors(tree: GuestTree) -> None:
    view = await tree.volume_view("vda1")
    with pytest.raises(NotFound):
        await tree.getattr(view, b"/missing")
    with pytest.raises(SnapfsError) as info:
        await tree.listdir(view, b"/a.txt")
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(SnapfsError) as info:
        await tree.getxattr(view, b"/a.txt", b"user.none")
    assert info.value.errno == errno.ENODATA
    assert await tree.read(view, b"/a.txt", 100, 10) == b""


async def test_inodes_stable_and_salted(session: GuestSession, tree: GuestTree) -> None:
    view = await tree.volume_view("vda1")
    st = await tree.getattr(view, b"/a.txt")
    again = GuestTree(session, ino_salt=b"snap-1")
    assert (await again.getattr(await again.volume_view("vda1"), b"/a.txt")).ino == st.ino
    other = GuestTree(session, ino_salt=b"snap-2")
    assert (await other.getattr(await other.volume_view("vda1"), b"/a.txt")).ino != st.ino
    assert st.ino >= 1 << 32


async def test_relaunch_after_idle_shutdown(session: GuestSession, tree: GuestTree) -> None:
    """Caches survive an appliance shutdown; an uncached path relaunches and remounts."""
    view = await tree.volume_view("vda1")
    await tree.listdir(view, b"/")
    marker = session.qemu_marker
    assert marker is not None and find_qemu_pids(marker)
    await session.shutdown_appliance()
    assert find_qemu_pids(marker) == []
    launches = session.launch_count
    await tree.listdir(view, b"/")  # cached: no launch
    assert session.launch_count == launches
    fresh = GuestTree(session, ino_salt=b"snap-1")
    assert [e.name for e in await fresh.listdir(view, b"/dir")]
    assert session.launch_count == launches + 1
