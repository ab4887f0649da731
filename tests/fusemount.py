"""Real FUSE mounts for tests: start ``snapfs mount --foreground``, wait, and tear down.

Modelled on pyfuse3's test/util.py: wait_for_mount fails early if the daemon died; teardown
escalates unmount → terminate → kill and then checks nothing of ours is left mounted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapfs.mountpoint import fstype_at, runtime_dir_for

MOUNT_TIMEOUT_S = 120


def fuse_available() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        return "no fusermount3"
    return None


needs_fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@dataclass
class Mounted:
    path: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def server_pids(self) -> list[int]:
        """qemu-nbd processes started by this mount's daemon."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", "qemu-nbd"], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


def wait_for_mount(mounted: Mounted, timeout: float = MOUNT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fstype_at(mounted.path) == "fuse.snapfs":
            return
        if mounted.proc.poll() is not None:
            raise AssertionError(
                f"snapfs exited with {mounted.proc.returncode}:\n{mounted.log_text()}"
            )
        time.sleep(0.05)
    raise AssertionError(f"mount did not appear within {timeout}s:\n{mounted.log_text()}")


def start_mount(
    source: Path | str, mountpoint: Path, *extra: str, log: Path | None = None
) -> Mounted:
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"{mountpoint.name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapfs",
                "mount",
                "--foreground",
                *extra,
                str(source),
                str(mountpoint),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    mounted = Mounted(mountpoint, proc, log)
    wait_for_mount(mounted)
    return mounted


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def stop_mount(mounted: Mounted) -> None:
    """Unmount and make sure the daemon, its servers and its runtime dir are gone."""
    path = mounted.path
    if fstype_at(path) is not None:
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if not wait_exit(mounted.proc, 30):
        mounted.proc.terminate()
        if not wait_exit(mounted.proc, 10):
            mounted.proc.kill()
            mounted.proc.wait()
    if fstype_at(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    assert fstype_at(path) is None, f"{path} still mounted"


@contextlib.contextmanager
def mounted(source: Path | str, mountpoint: Path, *extra: str) -> Iterator[Mounted]:
    m = start_mount(source, mountpoint, *extra)
    try:
        yield m
    finally:
        stop_mount(m)
    assert not runtime_dir_for(mountpoint).exists(), "runtime directory left behind"


def kill_tree_check(pids: list[int]) -> list[int]:
    """Which of ``pids`` are still alive (not zombies)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


__all__ = [
    "Mounted",
    "kill_tree_check",
    "mounted",
    "needs_fuse",
    "signal",
    "start_mount",
    "stop_mount",
]
