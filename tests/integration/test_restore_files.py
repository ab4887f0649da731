"""Single-file restore through the mount: cp/rsync from a snapshot's files/ into a restore
disk's files/, the raw-disk guard, and durability across remounts (real appliances)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from snapfs.sample import build_sample_repository
from tests.fusemount import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.guestfs, pytest.mark.slow]


def test_cp_and_rsync_into_restore_files(tmp_path: Path) -> None:
    repo = build_sample_repository(tmp_path / "repo").path
    config = tmp_path / "tcg.toml"
    config.write_text('[guestfs]\nbackend = "tcg"\n')
    name = "db-01@latest@vda"
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        source = m.path / "db-01" / "latest" / "files"
        restore = m.path / "restore" / name
        restore.mkdir()
        target = restore / "files"
        # The single-file restore flow, default options.
        (target / "restored").mkdir()
        subprocess.run(["cp", "-a", str(source / "etc"), str(target / "restored")], check=True)
        res = subprocess.run(
            ["rsync", "-a", f"{source}/home/", f"{target}/restored/home/"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        with open(target / "restored" / "note.txt", "wb") as f:
            f.write(b"written during the restore\n")
            os.fsync(f.fileno())
        diff = subprocess.run(
            ["diff", "-r", str(source / "home"), str(target / "restored" / "home")],
            capture_output=True,
            text=True,
        )
        assert diff.returncode == 0, diff.stdout
        # While its filesystem is mounted read-write, disk.img is read-only for writers.
        with pytest.raises(OSError) as info:
            open(restore / "disk.img", "r+b")
        assert info.value.errno == errno.EBUSY
        # The snapshot itself stays read-only.
        with pytest.raises(OSError) as info:
            (source / "x").write_text("x")
        assert info.value.errno == errno.EROFS
        hostname = (source / "etc" / "hostname").read_bytes()
    image = repo / "restore" / name / "disk.qcow2"
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    # Remount: what was written is in the restore disk.
    with mounted(repo, tmp_path / "m2", "--config", str(config)) as m2:
        files = m2.path / "restore" / name / "files"
        assert (files / "restored" / "etc" / "hostname").read_bytes() == hostname
        assert (files / "restored" / "note.txt").read_bytes() == b"written during the restore\n"
