"""An inspected guest OS through a real mount: files/ is the guest's / with /home (a second
partition, mounted by UUID= in the guest's fstab) at its place; the same snapshot has a btrfs
disk with subvolumes and an ntfs disk under volumes/. One TCG appliance for the mount (and
the session's one that built the subvolumes)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

from snapfs.catalog import writer
from tests.fusemount import mounted, needs_fuse
from tests.guestfs import osimages as oi
from tests.integration.test_guest_files import orphan_appliances

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.guestfs, pytest.mark.slow]


def test_files_is_the_guest_root(tmp_path: Path, btrfs_ntfs_images: oi.BtrfsNtfs) -> None:
    missing = oi.os_tools_missing()
    if missing:
        pytest.skip(missing)
    disk = oi.build_os_disk(tmp_path / "img")
    other = btrfs_ntfs_images
    sources = [
        writer.DiskSource("vda", disk.raw, "raw"),
        writer.DiskSource("vdb", other.btrfs, "raw"),
    ]
    volumes = ["vda1", "vda2", "vdb", "vdb@data", "vdb@vols_inner"]
    if other.ntfs is not None:
        sources.append(writer.DiskSource("vdc", other.ntfs, "raw"))
        volumes.append("vdc1")
    else:
        print(f"no ntfs disk: {other.ntfs_missing}")
    repo = tmp_path / "repo"
    writer.init_repository(repo)
    writer.add_snapshot(repo, "guest", sources, name="s1")
    with mounted(repo, tmp_path / "m") as m:
        snap = m.path / "guest" / "latest"
        assert sorted(os.listdir(snap / "volumes")) == volumes
        files = snap / "files"
        assert (files / "etc" / "fstab").read_bytes() == oi.FSTAB
        assert (files / "etc" / "os-release").read_bytes() == oi.OS_RELEASE
        assert sorted(os.listdir(files / "home")) == ["alice", "bob", "lost+found"]
        assert (files / "home" / oi.USER_FILE.decode()).read_bytes() == (
            disk.home / oi.USER_FILE.decode()
        ).read_bytes()
        report = files / "home" / "alice" / "docs" / "report.bin"
        assert report.read_bytes() == (disk.home / "alice" / "docs" / "report.bin").read_bytes()
        assert (files / "home" / "alice" / oi.NONASCII).read_bytes() == b"non-ascii name\n"
        assert os.readlink(files / "home" / "bob" / "alices-notes") == "../alice/notes.txt"
        assert os.stat(files / "home" / "alice").st_uid == 1000
        # The same bytes under volumes/: vda2 is the home filesystem, vda1 the root one
        # (whose own /home is an empty directory).
        vda2 = snap / "volumes" / "vda2"
        assert (vda2 / oi.USER_FILE.decode()).read_bytes() == (
            files / "home" / oi.USER_FILE.decode()
        ).read_bytes()
        assert os.listdir(snap / "volumes" / "vda1" / "home") == []
        cmp = filecmp.dircmp(files / "home" / "alice", disk.home / "alice")
        assert cmp.left_only == cmp.right_only == cmp.diff_files == [], cmp.report()
        with pytest.raises(OSError):
            (files / "home" / "new").write_text("x")
        assert "OS mountpoints /=vda1, /home=vda2" in m.log_text()
        # btrfs: the top level without its subvolumes; each subvolume a volume of its own.
        vols = snap / "volumes"
        assert sorted(os.listdir(vols / "vdb")) == ["top.txt", "vols"]
        assert os.listdir(vols / "vdb" / "vols") == []
        for sub, contents in oi.SUBVOL_FILES.items():
            for name, data in contents.items():
                assert (vols / f"vdb@{sub.replace('/', '_')}" / name).read_bytes() == data
        assert (vols / "vdb@data" / "big.bin").read_bytes() == other.big.read_bytes()
        if other.ntfs is not None:
            ntfs = vols / "vdc1"
            assert sorted(os.listdir(ntfs / "Dir")) == sorted(["Sub", "hello.txt", oi.NONASCII])
            for name, data in oi.NTFS_SMALL.items():
                assert (ntfs / name).read_bytes() == data
            assert (ntfs / oi.NTFS_BIG).read_bytes() == other.ntfs_big.read_bytes()
    assert orphan_appliances() == []
