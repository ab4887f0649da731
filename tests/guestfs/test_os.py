"""OS inspection, btrfs subvolumes and ntfs against a real TCG appliance.

One appliance builds the btrfs subvolumes and fills the ntfs partition; one more serves every
test here (three disks: the OS disk vda, the btrfs disk vdb, the ntfs disk vdc), shut down at
the end of the module.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from snapfs.guestfs import GuestfsSettings, GuestSession, GuestTree
from snapfs.guestfs.model import View
from snapfs.guestfs.session import find_qemu_pids

from . import osimages as oi
from .conftest import NbdServers, RawReader

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

TCG = GuestfsSettings(backend="tcg")


@dataclass
class Images:
    os: oi.OsDisk
    other: oi.BtrfsNtfs


@pytest.fixture(scope="module")
def os_images(tmp_path_factory: pytest.TempPathFactory, btrfs_ntfs_images: oi.BtrfsNtfs) -> Images:
    missing = oi.os_tools_missing()
    if missing:
        pytest.skip(missing)
    return Images(oi.build_os_disk(tmp_path_factory.mktemp("osimg")), btrfs_ntfs_images)


@pytest.fixture(scope="module")
def os_disks(
    os_images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[str, str]]]:
    work = tmp_path_factory.mktemp("osnbd")
    servers = NbdServers(work)
    raws = [("vda", os_images.os.raw), ("vdb", os_images.other.btrfs)]
    if os_images.other.ntfs is not None:
        raws.append(("vdc", os_images.other.ntfs))
    try:
        yield [(name, servers.serve(oi.to_qcow2(raw, work))) for name, raw in raws]
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def os_session(os_disks: list[tuple[str, str]]) -> Iterator[GuestSession]:
    s = GuestSession("os-snap", os_disks, TCG)
    yield s
    trio.run(s.aclose)
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == [], "qemu left after close"


@pytest.fixture(scope="module")
def os_reader(os_disks: list[tuple[str, str]]) -> Iterator[RawReader]:
    r = RawReader(os_disks)
    yield r
    r.close()


@pytest.fixture(scope="module")
def os_tree(os_session: GuestSession, os_reader: RawReader) -> GuestTree:
    return GuestTree(os_session, read_raw=os_reader, ino_salt=b"os-1")


async def _compare(tree: GuestTree, view: View, gpath: bytes, src: Path) -> int:
    """Every entry below ``gpath`` of ``view`` equals source directory ``src`` (names, types,
    sizes, link targets, bytes); lost+found left out at the top. Returns the files compared."""
    entries = {e.name: e.stat for e in await tree.listdir(view, gpath)}
    entries.pop(b"lost+found", None)
    assert set(entries) == set(os.listdir(bytes(src))), gpath
    count = 0
    for name, st in entries.items():
        child_g = gpath.rstrip(b"/") + b"/" + name
        child_s = Path(os.fsdecode(bytes(src) + b"/" + name))
        ls = os.lstat(child_s)
        assert stat.S_IFMT(st.mode) == stat.S_IFMT(ls.st_mode), child_g
        if stat.S_ISDIR(ls.st_mode):
            count += await _compare(tree, view, child_g, child_s)
        elif stat.S_ISLNK(ls.st_mode):
            assert await tree.readlink(view, child_g) == os.readlink(bytes(child_s))
        else:
            want = child_s.read_bytes()
            assert st.size == len(want), child_g
            assert await tree.read(view, child_g, 0, len(want) + 1) == want, child_g
            count += 1
    return count


async def test_os_inspection_finds_root_and_home(os_tree: GuestTree, os_images: Images) -> None:
    vols = {v.name: v for v in await os_tree.volumes()}
    expected = {
        "vda1": "ext4",
        "vda2": "ext4",
        "vdb": "btrfs",
        "vdb@data": "btrfs",
        "vdb@vols_inner": "btrfs",
    }
    if os_images.other.ntfs is not None:
        expected["vdc1"] = "ntfs"
    assert {n: v.fstype for n, v in vols.items()} == expected
    # The fstab's UUID= entries are resolved to the partitions; proc is not a volume.
    assert await os_tree.os_mountpoints() == {b"/": vols["vda1"], b"/home": vols["vda2"]}
    view = await os_tree.files_view()
    assert view is not None
    assert dict(view.mounts) == {b"/": vols["vda1"], b"/home": vols["vda2"]}


async def test_files_view_is_the_guest_root(os_tree: GuestTree, os_images: Images) -> None:
    view = await os_tree.files_view()
    assert view is not None
    src = os_images.os
    # files/ is the root filesystem with /home from the second partition.
    names = {e.name for e in await os_tree.listdir(view, b"/")}
    assert names == {b"lost+found", *(n.encode() for n in os.listdir(src.root))}
    assert await os_tree.read(view, b"/etc/fstab", 0, 4096) == oi.FSTAB
    assert await os_tree.read(view, b"/etc/os-release", 0, 4096) == oi.OS_RELEASE
    # /home shows the home volume's root, not the empty directory of the root filesystem.
    home = await os_tree.volume_view("vda2")
    home_root = await os_tree.getattr(home, b"/")
    assert await os_tree.getattr(view, b"/home") == home_root
    listed = {e.name: e.stat for e in await os_tree.listdir(view, b"/")}
    assert listed[b"home"] == home_root
    before = os_tree.stats["mapped_reads"]
    assert await _compare(os_tree, view, b"/home", src.home) == 3
    # report.bin (3 MiB) is read straight from NBD through partition 2's offset.
    assert os_tree.stats["mapped_reads"] > before
    st = await os_tree.getattr(view, b"/home/" + oi.USER_FILE)
    assert (st.uid, st.gid) == (1000, 1000)
    assert st == await os_tree.getattr(home, b"/" + oi.USER_FILE)  # one filesystem, one inode
    assert await _compare(os_tree, view, b"/etc", src.root / "etc") == 5


async def test_btrfs_subvolumes(os_tree: GuestTree, os_images: Images) -> None:
    for sub, files in oi.SUBVOL_FILES.items():
        view = await os_tree.volume_view("vdb@" + sub.replace("/", "_"))
        for name, data in files.items():
            assert await os_tree.read(view, b"/" + name.encode(), 0, 1 << 20) == data, name
        inodes = [e.stat.ino for e in await os_tree.listdir(view, b"/")]
        assert len(set(inodes)) == len(inodes)
    view = await os_tree.volume_view("vdb@data")
    assert {e.name for e in await os_tree.listdir(view, b"/")} == {b"d.txt", b"sub", b"big.bin"}
    big = os_images.other.big.read_bytes()
    before = os_tree.stats["mapped_reads"]
    assert await os_tree.read(view, b"/big.bin", 0, len(big) + 1) == big
    assert os_tree.stats["mapped_reads"] == before  # btrfs: through the appliance


async def test_btrfs_top_level_leaves_subvolumes_out(
    os_session: GuestSession, os_tree: GuestTree
) -> None:
    """The top-level volume shows its own files; nested subvolumes are volumes of their own
    (their inode numbers would collide in one view: every subvolume root is 256)."""
    # A fresh tree: its first listing is a per-directory one (the walker comes after it).
    for tree in (GuestTree(os_session, ino_salt=b"os-2"), os_tree):
        view = await tree.volume_view("vdb")
        assert {e.name for e in await tree.listdir(view, b"/")} == {b"top.txt", b"vols"}
        assert await tree.listdir(view, b"/vols") == []
        assert await tree.read(view, b"/top.txt", 0, 100) == oi.BTRFS_TOP["top.txt"]


async def test_ntfs(os_tree: GuestTree, os_images: Images) -> None:
    other = os_images.other
    if other.ntfs is None:
        print(f"SKIP ntfs: {other.ntfs_missing}")
        pytest.skip(str(other.ntfs_missing))
    view = await os_tree.volume_view("vdc1")
    top = {e.name for e in await os_tree.listdir(view, b"/")}
    assert b"Dir" in top
    assert {e.name for e in await os_tree.listdir(view, b"/Dir")} == {
        b"Sub",
        b"hello.txt",
        oi.NONASCII.encode(),
    }
    before = dict(os_tree.stats)
    for name, data in oi.NTFS_SMALL.items():
        assert await os_tree.read(view, b"/" + name.encode(), 0, 4096) == data, name
    big = other.ntfs_big.read_bytes()
    st = await os_tree.getattr(view, b"/" + oi.NTFS_BIG.encode())
    assert st.size == len(big) and stat.S_ISREG(st.mode)
    # ntfs-3g without a user mapping: everything root's, mode 0777 (docs/layout.md).
    assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (0o777, 0, 0)
    assert await os_tree.read(view, b"/" + oi.NTFS_BIG.encode(), 0, len(big) + 1) == big
    # In 128 KiB pieces across a chunk boundary, as FUSE asks.
    pos = (2 << 20) - 5000
    got = b"".join(
        [
            await os_tree.read(view, b"/" + oi.NTFS_BIG.encode(), pos + i * 131072, 131072)
            for i in range(3)
        ]
    )
    assert got == big[pos : pos + 3 * 131072]
    assert os_tree.stats["mapped_reads"] == before["mapped_reads"]  # no fast path for ntfs
    assert os_tree.stats["appliance_reads"] > before["appliance_reads"]


async def test_nested_subvolume_mountpoint_is_listed(os_tree: GuestTree) -> None:
    """A guest whose root is the btrfs top level and whose fstab mounts nested subvolumes
    (``subvol=data``): files/ lists their mountpoints, which the top-level listing leaves out.
    The view is the one files_view() composes from such inspection mountpoints."""
    vols = {v.name: v for v in await os_tree.volumes()}
    view = View(
        "files",
        (
            (b"/vols/inner", vols["vdb@vols_inner"]),
            (b"/data", vols["vdb@data"]),
            (b"/", vols["vdb"]),
        ),
    )
    top = {e.name: e.stat for e in await os_tree.listdir(view, b"/")}
    assert set(top) == {b"top.txt", b"vols", b"data"}
    data_root = await os_tree.getattr(await os_tree.volume_view("vdb@data"), b"/")
    assert top[b"data"] == await os_tree.getattr(view, b"/data") == data_root
    assert {e.name for e in await os_tree.listdir(view, b"/data/")} == {
        b"d.txt",
        b"sub",
        b"big.bin",
    }
    assert [e.name for e in await os_tree.listdir(view, b"//vols/")] == [b"inner"]
    assert await os_tree.read(view, b"/vols/inner/i.txt", 0, 100) == b"inner subvolume\n"
    assert await os_tree.read(view, b"/data/sub/deeper.txt", 0, 100) == b"deeper\n"
    inodes = [e.stat.ino for e in await os_tree.listdir(view, b"/")]
    assert len(set(inodes)) == len(inodes)
