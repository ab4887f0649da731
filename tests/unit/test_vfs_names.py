"""The tree model without a mount: names, inode derivation, errno mapping."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from snapfs.catalog.model import Catalog, Disk, Snapshot, Vm
from snapfs.errors import SnapfsError, guess_errno
from snapfs.fuse_ops import Operations
from snapfs.vfs import ROOT_INODE, Dir, build_tree, clean_name, derive_inode, unique_names


def test_clean_name() -> None:
    assert clean_name("a/b") == "a_b"
    assert clean_name("a\0b") == "a_b"
    assert clean_name(".") == "_"
    assert clean_name("..") == "__"
    assert clean_name("") == "_"
    assert clean_name("ünï cödé") == "ünï cödé"


def test_unique_names_are_deterministic() -> None:
    names = unique_names([("web", "id1"), ("web", "id2"), ("db", "id3"), ("w/b", "id4")])
    assert names == ["web~id1", "web~id2", "db", "w_b"]


def test_inodes_are_stable_and_distinct() -> None:
    a = derive_inode(ROOT_INODE, b"vm")
    assert a == derive_inode(ROOT_INODE, b"vm")
    assert a != derive_inode(ROOT_INODE, b"vm2")
    assert a != derive_inode(a, b"vm")
    assert 0 < a < 1 << 63


def _catalog() -> Catalog:
    disk = Disk(
        "vda",
        path=__import__("pathlib").Path("/nonexistent.qcow2"),
        format="qcow2",
        virtual_size=1 << 20,
    )
    good = Snapshot("s1", "first", 1.0, disks=(disk,))
    bad = Snapshot("s2", "first", 2.0, error="snapshot.json: bad JSON")
    return Catalog(
        vms=(
            Vm("v1", "web", (good, bad)),
            Vm("v2", "web", (), error="vm.json: bad"),
            Vm("v3", "a/b"),
        )
    )


async def test_tree_shapes_and_errors() -> None:
    _tree, root = build_tree(_catalog(), None, uid=0, gid=0)
    names = sorted(name for name, _ in await root.entries())
    assert names == [b"a_b", b"web~v1", b"web~v2"]
    web = await root.lookup(b"web~v1")
    assert isinstance(web, Dir)
    snaps = await (await web.lookup(b"snapshots")).entries()  # type: ignore[attr-defined]
    assert sorted(name for name, _ in snaps) == [b"first~s1", b"first~s2"]
    latest = await web.lookup(b"latest")
    assert latest.target == b"snapshots/first~s1"  # type: ignore[attr-defined]
    broken = await root.lookup(b"web~v2")
    with pytest.raises(SnapfsError) as info:
        await broken.entries()  # type: ignore[attr-defined]
    assert info.value.errno == errno.EIO


async def test_adapter_maps_errors_to_errnos() -> None:
    tree, _root = build_tree(_catalog(), None, uid=0, gid=0)
    ops = Operations(tree)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(ROOT_INODE, b"missing")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.opendir(derive_inode(ROOT_INODE, b"web~v2"))
    assert info.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(ROOT_INODE, b"x", 0o755, None)
    assert info.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(12345)
    assert info.value.errno == errno.ENOENT


def test_guess_errno_from_guestfs_messages() -> None:
    assert guess_errno("lstat: /x: No such file or directory") == errno.ENOENT
    assert guess_errno("write: No space left on device") == errno.ENOSPC
    assert guess_errno("something odd") == errno.EIO
