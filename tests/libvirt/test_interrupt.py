"""Backups interrupted by a full repository disk (a small tmpfs) and by libvirtd killed with
SIGKILL mid-copy (a private libvirtd of its own, restarted afterwards): a clear error, no half
snapshot, no job or scratch files left, and the next run works byte for byte."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from click.testing import CliRunner

from snapfs.catalog import writer
from snapfs.libvirt import jobs
from snapfs.libvirt.backup import BackupError, backup_domain
from snapfs.libvirt_cli import backup_command
from tests import imaging
from tests.libvirt.daemon import LibvirtDaemon, domain_xml, qemu_io, why_unavailable
from tests.libvirt.test_backup import assert_nothing_left, checkpoints, snapshot_dirs

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_disk_full(make_domain, libvirtd, tmp_path: Path) -> None:
    d = make_domain("diskfull", {"vda": 16 * MiB})
    d.write("vda", 0, 256 * KiB, 0x31)
    with tmpfs(tmp_path / "small", "8m,nr_inodes=400") as root:
        writer.init_repository(root / "repo")
        repo_dir = root / "repo"
        first = backup_domain(d.dom, repo_dir)
        # Leave about 2 MiB free, then dirty 6 MiB: the incremental copy runs out of space.
        filler = root / "filler"
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        filler.write_bytes(b"\0" * (free - 2 * MiB))
        d.write("vda", MiB, 6 * MiB, 0x32)
        before = snapshot_dirs(repo_dir)

        result = CliRunner().invoke(backup_command, [libvirtd.uri, str(repo_dir)])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        assert "No space left on device" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert_nothing_left(d, repo_dir, before, [first.checkpoint])

        # Space freed: the next run is incremental on the first backup, byte for byte.
        filler.unlink()
        again = backup_domain(d.dom, repo_dir)
        assert again.parent == first.snapshot_id
        assert again.disks[0].to_copy == 6 * MiB
        raw = imaging.to_raw(again.path / "disks/vda.qcow2", tmp_path / "again.raw")
        assert raw == d.snapshot()["vda"]
        assert checkpoints(d.dom) == [again.checkpoint]

        # No inode left: the work directory cannot be made (an OSError, not an NBD error).
        fillers = root / "inodes"
        fillers.mkdir()
        with pytest.raises(OSError, match="No space left"):
            for i in range(1000):
                (fillers / str(i)).touch()
        d.write("vda", 15 * MiB, 4 * KiB, 0x33)
        before = snapshot_dirs(repo_dir)
        result = CliRunner().invoke(backup_command, [libvirtd.uri, str(repo_dir)])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        assert f"cannot write into {repo_dir}: [Errno 28] No space left" in result.stderr
        assert_nothing_left(d, repo_dir, before, [again.checkpoint])
        shutil.rmtree(fillers)
        third = backup_domain(d.dom, repo_dir)
        assert third.parent == again.snapshot_id and third.disks[0].to_copy == CLUSTER
        raw = imaging.to_raw(third.path / "disks/vda.qcow2", tmp_path / "third.raw")
        assert raw == d.snapshot()["vda"]


@pytest.fixture
def own_libvirtd() -> Iterator[LibvirtDaemon]:
    """A private libvirtd for one test (it gets killed: the session's must not be)."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    daemon = LibvirtDaemon()
    try:
        daemon.start()
        yield daemon
    finally:
        qemu_pids = [int(p.read_text()) for p in (daemon.dir / "run" / "qemu").glob("*.pid")]
        if daemon._proc is not None and daemon._proc.poll() is not None:
            with contextlib.suppress(RuntimeError):
                daemon.restart()  # a failed test left it killed: let it destroy its domains
        daemon.stop()
        left = [pid for pid in qemu_pids if _running(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"QEMU left running: {left}"


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


def test_libvirtd_killed_mid_copy(own_libvirtd: LibvirtDaemon, tmp_path: Path) -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    image = tmp_path / "vda.qcow2"
    imaging.run("qemu-img", "create", "-q", "-f", "qcow2", image, str(16 * MiB))
    model = bytearray(16 * MiB)

    def write(dom: Any, offset: int, length: int, pattern: int) -> None:
        qemu_io(dom, "vda", f"write -P {pattern:#x} {offset} {length}")
        model[offset : offset + length] = bytes([pattern]) * length

    repo_dir = tmp_path / "repo"
    writer.init_repository(repo_dir)
    conn = libvirt.open(own_libvirtd.uri)
    dom = conn.createXML(domain_xml("gone", [("vda", image)]), 0)
    write(dom, 0, 64 * KiB, 0x41)
    first = backup_domain(dom, repo_dir)
    write(dom, MiB, 8 * MiB, 0x42)  # two copy chunks and more
    before = snapshot_dirs(repo_dir)

    killed = []

    def kill_libvirtd(disk: str, done: int, total: int) -> None:
        if done > 0 and not killed:
            killed.append(done)
            own_libvirtd.kill()

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            backup_domain(dom, repo_dir, progress=kill_libvirtd)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the backup hangs after libvirtd died"
    assert killed, "libvirtd was not killed mid-copy"
    (exc,) = outcome
    assert isinstance(exc, BackupError), repr(exc)
    assert "libvirt" in exc.message, exc.message
    # Nothing visible in the repository, no job directory of ours.
    assert snapshot_dirs(repo_dir) == before
    assert not list(repo_dir.rglob(".tmp-*"))
    assert not [
        p for p in Path("/tmp").glob("snapfs-job-*/owner") if int(p.read_text()) == os.getpid()
    ]
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()

    # QEMU outlived libvirtd; the restarted daemon reconnects to it.
    own_libvirtd.restart()
    conn = libvirt.open(own_libvirtd.uri)
    try:
        dom = conn.lookupByName("gone")
        write(dom, 12 * MiB, 4 * KiB, 0x43)
        notices: list[str] = []
        again = backup_domain(dom, repo_dir, notice=notices.append)
        # The sweep ends the job the restarted libvirtd recovered from QEMU and deletes the
        # killed run's checkpoint; the chain goes on from the first backup.
        assert any("ended the backup job a snapfs process" in n for n in notices), notices
        assert any("made by a backup that never finished" in n for n in notices), notices
        assert again.parent == first.snapshot_id, notices
        assert again.disks[0].to_copy == 8 * MiB + CLUSTER
        raw = imaging.to_raw(again.path / "disks/vda.qcow2", tmp_path / "again.raw")
        assert raw == bytes(model)
        assert checkpoints(dom) == [again.checkpoint]
        assert jobs.active_job(dom) is None
    finally:
        conn.close()
