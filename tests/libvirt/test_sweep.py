"""A backup process killed with SIGKILL in the middle of its copy leaves a running job, a
checkpoint no snapshot records (with its bitmap in the qcow2) and a ``.tmp-*`` directory;
the next ``snapfs backup`` sweeps them, says so, and the incremental chain stays right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt_qemu
from click.testing import CliRunner

from snapfs.libvirt import jobs
from snapfs.libvirt.backup import backup_domain
from snapfs.libvirt_cli import backup_command
from tests import imaging

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB


def checkpoints(dom: Any) -> list[str]:
    return sorted(cp.getName() for cp in dom.listAllCheckpoints())


def image_bitmaps(dom: Any, image: Path) -> list[str]:
    """The persistent bitmaps of a running disk image, as QEMU holds them (QEMU writes them
    into the qcow2 header only when it closes the image, so qemu-img cannot see them)."""
    reply = libvirt_qemu.qemuMonitorCommand(
        dom, json.dumps({"execute": "query-named-block-nodes"}), 0
    )
    names = set()
    for node in json.loads(reply)["return"]:
        if node.get("drv") == "qcow2" and node.get("file") == str(image):
            names |= {b["name"] for b in node.get("dirty-bitmaps", []) if b.get("persistent")}
    return sorted(names)


def wait_for(predicate: Any, timeout: float = 120.0, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def test_backup_killed_mid_copy_is_swept(make_domain, libvirtd, repo_dir: Path, tmp_path: Path):
    d = make_domain("killed", {"vda": 256 * MiB})
    d.write("vda", 0, 64 * KiB, 0x11)
    first = backup_domain(d.dom, repo_dir)
    assert image_bitmaps(d.dom, d.images["vda"]) == [first.checkpoint]
    # Enough dirty data that the copy takes a while.
    d.write("vda", 16 * MiB, 192 * MiB, 0x12)

    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "backup", libvirtd.uri, str(repo_dir), "--vm", "killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SNAPFS_CONFIG": str(tmp_path / "none.toml")},
    )
    snaps = repo_dir / "vms" / first.vm_id / "snapshots"
    try:
        # Mid-copy: the new image in the work directory already holds some data.
        def copying() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return any(p.stat().st_size > 8 * MiB for p in snaps.glob(".tmp-*/disks/vda.qcow2"))

        wait_for(copying)
        job_dirs = [
            p.parent
            for p in Path("/tmp").glob("snapfs-job-*/owner")
            if p.read_text().strip() == str(proc.pid)
        ]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # What the dead process left: a job, a checkpoint (and bitmap) no snapshot records,
    # an unfinished snapshot directory, its job directory.
    assert len(job_dirs) == 1 and job_dirs[0].exists()
    assert jobs.active_job(d.dom) == "a backup"
    (orphan,) = [c for c in checkpoints(d.dom) if c != first.checkpoint]
    assert image_bitmaps(d.dom, d.images["vda"]) == sorted([first.checkpoint, orphan])
    (work,) = snaps.glob(".tmp-*")
    assert sorted(p.name for p in snaps.iterdir()) == sorted([first.snapshot_id, work.name])
    # Its qemu-nbd (writing the new image) exits once its client is gone.
    wait_for(
        lambda: (
            not subprocess.run(
                ["pgrep", "-f", str(work)], capture_output=True, text=True
            ).stdout.strip()
        ),
        step=0.1,
    )

    d.write("vda", 240 * MiB, 4 * KiB, 0x13)
    result = CliRunner().invoke(backup_command, [libvirtd.uri, str(repo_dir), "--vm", "killed"])
    assert result.exit_code == 0, result.stderr
    out = result.stderr
    assert f"ended the backup job a snapfs process (pid {proc.pid}, gone)" in out, out
    assert f"removed {work}, left by an interrupted backup" in out, out
    assert f"deleted checkpoint {orphan}, made by a backup that never finished" in out, out
    assert f"incremental on {first.snapshot_id}" in out, out
    assert not job_dirs[0].exists()
    assert not work.exists()

    (second_dir,) = [p for p in snaps.iterdir() if p.name != first.snapshot_id]
    facts = json.loads((second_dir / "libvirt.json").read_text())
    assert facts["incremental_from"] == first.checkpoint
    # Everything dirty since the first checkpoint, the killed run's share included.
    assert facts["disks"]["vda"]["copied_bytes"] == 192 * MiB + CLUSTER
    assert checkpoints(d.dom) == [facts["checkpoint"]]
    assert image_bitmaps(d.dom, d.images["vda"]) == [facts["checkpoint"]]
    assert imaging.to_raw(second_dir / "disks/vda.qcow2", tmp_path / "2.raw") == bytes(
        d.model["vda"]
    )

    # The chain goes on from the swept state: only what changed since.
    d.write("vda", 100 * MiB, 4 * KiB, 0x14)
    third = backup_domain(d.dom, repo_dir)
    assert third.parent == second_dir.name and third.disks[0].to_copy == CLUSTER
    assert imaging.to_raw(third.path / "disks/vda.qcow2", tmp_path / "3.raw") == bytes(
        d.model["vda"]
    )
    assert jobs.active_job(d.dom) is None


def test_sweep_leaves_other_repositories_checkpoints(
    make_domain, repo_dir: Path, tmp_path: Path
) -> None:
    """A domain backed up into two repositories: each keeps its own chain; a superseded
    checkpoint of this repository (left by a --full backup) is deleted."""
    from snapfs.catalog import writer

    other = tmp_path / "other"
    writer.init_repository(other)
    d = make_domain("two-repos", {"vda": 4 * MiB})
    d.write("vda", 0, 64 * KiB, 0x21)
    a1 = backup_domain(d.dom, repo_dir)
    b1 = backup_domain(d.dom, other)
    a2 = backup_domain(d.dom, repo_dir, mode="full")  # does not delete a1's checkpoint
    assert checkpoints(d.dom) == sorted([a1.checkpoint, b1.checkpoint, a2.checkpoint])
    d.write("vda", MiB, 4 * KiB, 0x22)
    notices: list[str] = []
    a3 = backup_domain(d.dom, repo_dir, notice=notices.append)
    assert any(f"deleted checkpoint {a1.checkpoint}, superseded" in n for n in notices), notices
    assert a3.parent == a2.snapshot_id and a3.disks[0].to_copy == CLUSTER
    assert checkpoints(d.dom) == sorted([b1.checkpoint, a3.checkpoint])
    b2 = backup_domain(d.dom, other)
    assert b2.parent == b1.snapshot_id and b2.disks[0].to_copy == CLUSTER
