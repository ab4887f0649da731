"""Restore disks through the mount: create by mkdir, write disk.img through NBD, durability."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from snapfs.catalog.repo import load_repository
from snapfs.sample import build_sample_repository
from tests import imaging
from tests.fusemount import mounted, needs_fuse, start_mount, stop_mount

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return build_sample_repository(tmp_path / "repo").path


def test_cow_restore_disk_write_read_durable(repo: Path, tmp_path: Path) -> None:
    before = digest_tree(repo / "vms")
    payload = os.urandom(3 * MiB + 123)
    with mounted(repo, tmp_path / "m") as m:
        restore = m.path / "restore" / "web-01@latest@vda"
        restore.mkdir()
        disk = restore / "disk.img"
        snapshot_disk = m.path / "web-01" / "latest" / "disks" / "vda.img"
        original = snapshot_disk.read_bytes()
        # Copy-on-write: it starts as the snapshot disk.
        assert disk.read_bytes() == original
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pwrite(fd, payload, 5 * MiB) == len(payload)
            os.fsync(fd)
            assert os.pread(fd, len(payload), 5 * MiB) == payload
            # Past the end of the disk: no space, like a block device.
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", len(original))
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as info:
                os.ftruncate(fd, 2 * len(original))
            assert info.value.errno == errno.EFBIG
        finally:
            os.close(fd)
        # The snapshot is untouched, through the mount too.
        assert snapshot_disk.read_bytes() == original
        # Snapshot paths stay read-only.
        with pytest.raises(OSError) as info:
            open(snapshot_disk, "r+b")
        assert info.value.errno == errno.EROFS
    image = repo / "restore" / "web-01@latest@vda" / "disk.qcow2"
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    data = imaging.to_raw(image, tmp_path / "r.raw")
    assert data[5 * MiB : 5 * MiB + len(payload)] == payload
    assert data[: 5 * MiB] == original[: 5 * MiB]
    assert digest_tree(repo / "vms") == before, "snapshot data changed"


def test_empty_restore_disk_and_truncate_zeroes(repo: Path, tmp_path: Path) -> None:
    with mounted(repo, tmp_path / "m") as m:
        disk_dir = m.path / "restore" / "scratch@8M"
        disk_dir.mkdir()
        disk = disk_dir / "disk.img"
        assert disk.stat().st_size == 8 * MiB
        assert disk.read_bytes() == bytes(8 * MiB)
        with open(disk, "r+b") as f:
            f.seek(MiB)
            f.write(b"\x5a" * MiB)
        assert disk.read_bytes()[MiB : 2 * MiB] == b"\x5a" * MiB
        # cp/`>` open with O_TRUNC: the disk keeps its size and reads as zeros.
        with open(disk, "wb") as f:
            f.write(b"\x11" * 4096)
        data = disk.read_bytes()
        assert len(data) == 8 * MiB
        assert data[:4096] == b"\x11" * 4096 and data[4096:] == bytes(8 * MiB - 4096)
        # Bad names get EINVAL, never a half-made disk.
        with pytest.raises(OSError) as info:
            (m.path / "restore" / "nonsense").mkdir()
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            (m.path / "restore" / "no-such-vm@latest@vda").mkdir()
        assert info.value.errno in (errno.ENOENT, errno.EINVAL)
        assert sorted(os.listdir(m.path / "restore")) == ["scratch@8M"]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_fsynced_writes_survive_daemon_death(repo: Path, tmp_path: Path, how: str) -> None:
    payload = os.urandom(MiB)
    m = start_mount(repo, tmp_path / "m")
    try:
        (m.path / "restore" / "db-01@latest@vda").mkdir()
        fd = os.open(m.path / "restore" / "db-01@latest@vda" / "disk.img", os.O_RDWR)
        os.pwrite(fd, payload, 2 * MiB)
        os.fsync(fd)
        os.close(fd)
        m.proc.send_signal(getattr(signal, how))
        m.proc.wait(30)
    finally:
        stop_mount(m)
    image = repo / "restore" / "db-01@latest@vda" / "disk.qcow2"
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    assert imaging.to_raw(image, tmp_path / "r.raw")[2 * MiB : 3 * MiB] == payload
    # Remount: the data is there.
    with (
        mounted(repo, tmp_path / "m2") as m2,
        open(m2.path / "restore" / "db-01@latest@vda" / "disk.img", "rb") as f,
    ):
        f.seek(2 * MiB)
        assert f.read(MiB) == payload


def test_restore_create_cli_and_listing_while_mounted(repo: Path, tmp_path: Path) -> None:
    with mounted(repo, tmp_path / "m") as m:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "snapfs",
                "restore",
                "create",
                str(m.path),
                "--vm",
                "db-01",
                "--disk",
                "vda",
                "--name",
                "from-cli",
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert "from-cli" in os.listdir(m.path / "restore")
        assert (m.path / "restore" / "from-cli" / "disk.img").read_bytes() == (
            m.path / "db-01" / "latest" / "disks" / "vda.img"
        ).read_bytes()
    catalog = load_repository(repo)
    assert not catalog.problems


def test_host_disk_full_is_enospc_and_keeps_what_was_written(tmp_path: Path) -> None:
    """The repository's own disk fills up under a restore disk being written: ENOSPC (from
    the write that failed or, written behind, the next write or the fsync), never EIO; what
    was fsynced before is intact, the mount stays up, and overwriting allocated space works."""
    from snapfs.catalog import writer

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        repo = small / "repo"
        writer.init_repository(repo)
        first = os.urandom(8 * MiB)
        with mounted(repo, tmp_path / "m") as m:
            (m.path / "restore" / "scratch@256M").mkdir()
            disk = m.path / "restore" / "scratch@256M" / "disk.img"
            fd = os.open(disk, os.O_RDWR)
            try:
                os.pwrite(fd, first, 0)
                os.fsync(fd)
                with pytest.raises(OSError) as info:
                    for off in range(8 * MiB, 64 * MiB, MiB):
                        os.pwrite(fd, os.urandom(MiB), off)
                    os.fsync(fd)
                assert info.value.errno == errno.ENOSPC, info.value
                # Reported once: the mount and the file go on.
                assert os.pread(fd, len(first), 0) == first
                again = os.urandom(MiB)
                os.pwrite(fd, again, 0)  # allocated clusters: no new space needed
                os.fsync(fd)
                assert os.pread(fd, MiB, 0) == again
            finally:
                os.close(fd)
            assert "ENOSPC" in m.log_text() or "No space" in m.log_text()
        image = repo / "restore" / "scratch@256M" / "disk.qcow2"
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaked clusters only
        raw = imaging.to_raw(image, tmp_path / "full.raw")
        assert raw[:MiB] == again and raw[MiB : 8 * MiB] == first[MiB:]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
