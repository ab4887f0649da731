"""Mountpoint checks and the per-mount runtime directory; no FUSE, no trio.

Owns: telling whether a path is mounted (from /proc/self/mounts, which also shows dead
FUSE mounts that ``os.path.ismount`` misses), detecting stale mounts ("Transport endpoint is
not connected"), unmounting with fusermount3, and the 0700 runtime directory that holds a
mount's sockets and its daemon's pid file. The runtime directory is named after a hash of
the mountpoint, so a later mount (or ``snapfs umount``) of the same place finds what a
killed daemon left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from snapfs.errors import SnapfsUserError

FSTYPE = "fuse.snapfs"


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounts() -> dict[str, str]:
    """Mountpoint → filesystem type, for everything mounted in this namespace."""
    result: dict[str, str] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                result[_unescape(parts[1])] = parts[2]
    return result


def fstype_at(path: Path) -> str | None:
    return mounts().get(str(path))


def is_stale(path: Path) -> bool:
    # statvfs always reaches the filesystem; stat may be answered from the kernel's
    # attribute cache even after the daemon died.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(path: Path, *, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        message = f"cannot unmount {path}: {result.stderr.strip()}"
        if "busy" in result.stderr.lower():
            message += (
                f"\n  files under it are still open or a shell is inside it (`fuser -vm {path}`"
                " lists them); `snapfs umount --lazy` detaches it now and stops the daemon"
                " once they are closed"
            )
        raise SnapfsUserError(message)


def check_mountpoint(path: Path, *, force: bool) -> Path:
    """Validate ``path`` before anything is started; clear a stale mount if ``force``."""
    path = Path(os.path.abspath(path))
    if is_stale(path):
        if not force:
            raise SnapfsUserError(
                f"{path} is a dead mount (Transport endpoint is not connected): "
                f"run 'snapfs umount {path}' or mount again with --force"
            )
        fusermount_unmount(path, lazy=True)
    current = fstype_at(path)
    if current is not None:
        raise SnapfsUserError(f"{path} is already mounted ({current}); unmount it first")
    if not path.is_dir():
        raise SnapfsUserError(f"{path}: mountpoint does not exist or is not a directory")
    return path


def runtime_base() -> Path:
    env = os.environ.get("SNAPFS_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.getuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/snapfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "snapfs"
    return Path(f"/tmp/snapfs-{os.getuid()}")


def runtime_dir_for(mountpoint: Path) -> Path:
    # Short (unix socket paths must stay under 108 bytes) and stable for one mountpoint.
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:12]
    return runtime_base() / digest


def create_runtime_dir(mountpoint: Path) -> Path:
    base = runtime_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = runtime_dir_for(mountpoint)
    if path.exists():
        # Left by a daemon that was killed: its servers died with it (parent-death signal).
        pid = daemon_pid(mountpoint)
        if pid is not None and pid != os.getpid():
            raise SnapfsUserError(f"{mountpoint} is already served by snapfs pid {pid}")
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    (path / "pid").write_text(f"{os.getpid()}\n")
    return path


def remove_runtime_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the live snapfs daemon serving ``mountpoint``, if any."""
    try:
        pid = int((runtime_dir_for(mountpoint) / "pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"snapfs" in cmdline else None


def mount_device(mountpoint: Path) -> str | None:
    """The "major:minor" of the filesystem mounted at ``mountpoint`` (from mountinfo: this
    asks nothing of the filesystem, so it is safe on our own mount while not serving)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and _unescape(parts[4]) == str(mountpoint):
                return parts[2]
    return None


def set_read_ahead(mountpoint: Path, kb: int) -> int | None:
    """Set this mount's kernel read-ahead (bigger FUSE read requests); the value now in force,
    or None when the mount or its bdi cannot be found."""
    device = mount_device(mountpoint)
    if device is None:
        return None
    knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    with contextlib.suppress(OSError):
        knob.write_text(f"{kb}\n")
    try:
        return int(knob.read_text())
    except (OSError, ValueError):
        return None
