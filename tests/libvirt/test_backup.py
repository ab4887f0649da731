"""Backups of running libvirt domains into a repository: full, incremental, multi-disk,
interrupted, vanished checkpoint, busy and stopped domains (real libvirtd, TCG, no OS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest

from snapfs.catalog.repo import load_repository
from snapfs.errors import SnapfsUserError
from snapfs.libvirt import jobs
from snapfs.libvirt.backup import BackupError, DomainBackup, backup_domain
from tests import imaging

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB  # qcow2 default: the granularity of allocation and of dirty bitmaps


def image_bytes(path: Path, tmp: Path) -> bytes:
    return imaging.to_raw(path, tmp / f"{path.parent.parent.name}-{path.stem}.raw")


def snapshot_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("vms/*/snapshots/*"))


def no_job(dom: Any) -> bool:
    return jobs.active_job(dom) is None


def checkpoints(dom: Any) -> list[str]:
    return sorted(cp.getName() for cp in dom.listAllCheckpoints())


def test_full_then_incremental(make_domain, repo_dir: Path, tmp_path: Path) -> None:
    d = make_domain("full-incr", {"vda": 8 * MiB})
    d.write("vda", 1 * MiB, 64 * KiB, 0x41)
    d.write("vda", 5 * MiB, 128 * KiB, 0x42)
    at_begin = d.snapshot()
    notices: list[str] = []
    with DomainBackup(d.dom, repo_dir, notice=notices.append) as b:
        b.begin()
        # Written after backupBegin: must not be in this snapshot (point in time).
        d.write("vda", 1 * MiB, 64 * KiB, 0x43)
        d.write("vda", 7 * MiB, 4 * KiB, 0x44)
        b.copy()
        first = b.commit()
    assert any("first backup" in n for n in notices)
    assert first.parent is None and first.disks[0].mode == "full"
    # Full: only allocated data is copied (holes are not).
    assert first.disks[0].to_copy == 192 * KiB
    assert image_bytes(first.path / "disks/vda.qcow2", tmp_path) == at_begin["vda"]
    assert (first.path / "domain.xml").read_text().startswith("<domain")
    facts = json.loads((first.path / "libvirt.json").read_text())
    assert facts["checkpoint"] == first.checkpoint
    assert checkpoints(d.dom) == [first.checkpoint]
    assert no_job(d.dom)

    # Dirty since the first checkpoint: the two writes after its begin, then one more.
    d.write("vda", 3 * MiB + 512, 1024, 0x45)
    second = backup_domain(d.dom, repo_dir)
    assert second.parent == first.snapshot_id
    assert second.disks[0].mode == "incremental"
    # Only dirty clusters: 1 MiB (64 KiB), 7 MiB (4 KiB → one cluster), 3 MiB (one cluster).
    assert second.disks[0].to_copy == 3 * CLUSTER
    assert image_bytes(second.path / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]
    info = imaging.run("qemu-img", "info", "--output=json", second.path / "disks/vda.qcow2")
    assert json.loads(info)["backing-filename"] == f"../../{first.snapshot_id}/disks/vda.qcow2"
    # Only the newest checkpoint is kept.
    assert checkpoints(d.dom) == [second.checkpoint]

    catalog = load_repository(repo_dir)
    assert not catalog.problems
    (vm,) = catalog.vms
    assert vm.name == "full-incr"
    assert [s.id for s in vm.snapshots] == [first.snapshot_id, second.snapshot_id]
    assert vm.snapshots[1].parent == first.snapshot_id


def test_incremental_zeroed_range_is_written(make_domain, repo_dir: Path, tmp_path: Path) -> None:
    d = make_domain("zeroes", {"vda": 4 * MiB})
    d.write("vda", 0, 256 * KiB, 0x61)
    backup_domain(d.dom, repo_dir)
    qemu_io_zero = "write -z 65536 65536"
    from tests.libvirt.daemon import qemu_io

    qemu_io(d.dom, "vda", qemu_io_zero)
    d.model["vda"][65536 : 2 * 65536] = bytes(65536)
    second = backup_domain(d.dom, repo_dir)
    assert second.disks[0].to_copy + second.disks[0].to_zero == CLUSTER
    assert image_bytes(second.path / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]


def test_multi_disk_with_skipped_disk(make_domain, repo_dir: Path, tmp_path: Path) -> None:
    d = make_domain("multi", {"vda": 4 * MiB, "vdb": 2 * MiB, "vdc": 2 * MiB})
    d.write("vda", 0, 64 * KiB, 0x11)
    d.write("vdb", MiB, 64 * KiB, 0x22)
    d.write("vdc", 0, 64 * KiB, 0x33)
    result = backup_domain(d.dom, repo_dir, skip=frozenset({"vdc"}))
    assert [r.name for r in result.disks] == ["vda", "vdb"]
    assert result.skipped == (("vdc", "excluded (backup='no')"),)
    for target in ("vda", "vdb"):
        assert image_bytes(result.path / f"disks/{target}.qcow2", tmp_path) == d.snapshot()[target]
    assert not (result.path / "disks/vdc.qcow2").exists()
    d.write("vdb", 0, 4 * KiB, 0x23)
    second = backup_domain(d.dom, repo_dir, skip=frozenset({"vdc"}))
    copied = {r.name: r.to_copy for r in second.disks}
    assert copied == {"vda": 0, "vdb": CLUSTER}
    for target in ("vda", "vdb"):
        assert image_bytes(second.path / f"disks/{target}.qcow2", tmp_path) == d.snapshot()[target]


def assert_nothing_left(d: Any, repo_dir: Path, before: list[Path], cps: list[str]) -> None:
    assert snapshot_dirs(repo_dir) == before
    assert not [p for p in repo_dir.rglob(".tmp-*")], "work directory left behind"
    assert no_job(d.dom)
    assert checkpoints(d.dom) == cps
    mine = [p for p in Path("/tmp").glob("snapfs-job-*/owner") if int(p.read_text()) == os.getpid()]
    assert not mine


def test_interrupted_backups_leave_nothing(make_domain, repo_dir: Path, tmp_path: Path) -> None:
    d = make_domain("interrupt", {"vda": 8 * MiB})
    d.write("vda", 0, 6 * MiB, 0x51)  # several copy chunks

    def ctrl_c(disk: str, done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    # Interrupted first (full) backup: no VM directory appears at all.
    with pytest.raises(KeyboardInterrupt):
        backup_domain(d.dom, repo_dir, progress=ctrl_c)
    assert_nothing_left(d, repo_dir, [], [])
    assert list((repo_dir / "vms").iterdir()) == []

    first = backup_domain(d.dom, repo_dir)
    d.write("vda", 0, 6 * MiB, 0x52)

    # The local NBD server dies in the middle of an incremental copy.
    def kill_server(disk: str, done: int, total: int) -> None:
        if done > 0:
            pids = subprocess.run(
                ["pgrep", "-P", str(os.getpid()), "qemu-nbd"], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)

    before = snapshot_dirs(repo_dir)
    with pytest.raises(BackupError, match="copying disk vda failed"):
        backup_domain(d.dom, repo_dir, progress=kill_server)
    assert_nothing_left(d, repo_dir, before, [first.checkpoint])

    # The next run works, and is still incremental on the first backup.
    again = backup_domain(d.dom, repo_dir)
    assert again.parent == first.snapshot_id
    assert again.disks[0].to_copy == 6 * MiB
    assert image_bytes(again.path / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]


def test_vanished_checkpoint_falls_back_to_full(
    make_domain, repo_dir: Path, tmp_path: Path
) -> None:
    d = make_domain("vanished", {"vda": 4 * MiB})
    d.write("vda", 0, 128 * KiB, 0x71)
    first = backup_domain(d.dom, repo_dir)
    d.dom.checkpointLookupByName(first.checkpoint).delete(0)
    d.write("vda", MiB, 64 * KiB, 0x72)
    notices: list[str] = []
    second = backup_domain(d.dom, repo_dir, notice=notices.append)
    assert any("is gone: full backup" in n for n in notices), notices
    assert second.parent is None and second.disks[0].mode == "full"
    assert second.disks[0].to_copy == 192 * KiB
    assert image_bytes(second.path / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]
    # And the chain continues from the new full backup.
    d.write("vda", 2 * MiB, 4 * KiB, 0x73)
    third = backup_domain(d.dom, repo_dir)
    assert third.parent == second.snapshot_id and third.disks[0].to_copy == CLUSTER


def test_busy_and_stopped_domains(make_domain, conn, libvirtd, repo_dir: Path) -> None:
    d = make_domain("busy", {"vda": 2 * MiB})
    job = jobs.PullJob.begin(d.dom, [jobs.JobDisk("vda")], [])
    try:
        with pytest.raises(SnapfsUserError, match="already has a backup job"):
            backup_domain(d.dom, repo_dir)
    finally:
        job.end()
    assert no_job(d.dom)
    assert snapshot_dirs(repo_dir) == []

    from tests.libvirt.daemon import domain_xml

    image = repo_dir.parent / "off.qcow2"
    imaging.run("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
    off = conn.defineXML(domain_xml("off", [("vda", image)]))
    try:
        with pytest.raises(SnapfsUserError, match="is not running"):
            backup_domain(off, repo_dir)
    finally:
        off.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def test_stale_job_of_a_dead_process_is_ended(make_domain, repo_dir: Path) -> None:
    d = make_domain("stale", {"vda": 2 * MiB})
    job = jobs.PullJob.begin(d.dom, [jobs.JobDisk("vda")], [])
    dead = subprocess.Popen(["true"])
    dead.wait()
    (job.directory / jobs.OWNER_FILE).write_text(f"{dead.pid}\n")
    result = backup_domain(d.dom, repo_dir)
    assert result.disks[0].mode == "full"
    assert not job.directory.exists()
    assert no_job(d.dom)
