"""Typed results of the guest view: volumes, views, stat results, directory entries.

FUSE-free (the lead's adapter converts ``GuestStat`` to pyfuse3 EntryAttributes). Pure data.
"""

from __future__ import annotations

import hashlib
import stat as stat_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# Read ``length`` bytes at byte ``offset`` of the raw disk named ``disk`` (the name given with
# the session's disks). The lead's NBD pool plugs in here; tests use their own libnbd handle.
ReadRaw = Callable[[str, int, int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Volume:
    """One filesystem found on the snapshot's disks.

    ``name`` is the directory name under volumes/ (vda1, vdb, vg0-root, …); ``device`` is the
    appliance's name for it (/dev/sda1, /dev/vg0/root, btrfsvol:/dev/sda/sub).
    """

    name: str
    device: str
    fstype: str
    index: int  # position in GuestTree.volumes(); names the mount dir in the appliance


@dataclass(frozen=True, slots=True)
class View:
    """A browsable guest tree: one volume, or the guest OS's volumes at their mountpoints.

    ``mounts`` is ((guest mountpoint, volume), …) longest mountpoint first; a volume view has
    the single pair (b"/", volume).
    """

    name: str
    mounts: tuple[tuple[bytes, Volume], ...]

    def resolve(self, path: bytes) -> tuple[Volume, bytes]:
        """The volume holding guest path ``path`` and the path inside that volume."""
        for mountpoint, volume in self.mounts:
            if mountpoint == b"/":
                return volume, path
            if path == mountpoint:
                return volume, b"/"
            if path.startswith(mountpoint + b"/"):
                return volume, path[len(mountpoint) :]
        raise LookupError(path)  # a view always has "/" as its last mount

    def mounted_at(self, path: bytes) -> Volume | None:
        for mountpoint, volume in self.mounts:
            if mountpoint == path:
                return volume
        return None


@dataclass(frozen=True, slots=True)
class GuestStat:
    """A guest inode's metadata as the guest has it; times in nanoseconds since the epoch.

    ``ino`` is derived from (salt, volume name, guest inode): stable across remounts, equal for
    hard links. ``rdev`` is a Linux dev_t (os.makedev).
    """

    ino: int
    guest_ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    stat: GuestStat


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a file's data on its block device, in bytes (filefrag -e -b1)."""

    logical: int
    physical: int
    length: int
    unwritten: bool = False  # reads as zeros whatever the blocks hold


# FUSE reserves 1 for the root and the lead's VFS allocates small numbers itself; derived
# numbers are kept 63-bit (some tools treat st_ino as signed) and above this floor.
_INO_FLOOR = 1 << 32


def derive_ino(salt: bytes, volume_name: str, guest_ino: int) -> int:
    """A stable 63-bit inode number for guest inode ``guest_ino`` of a volume."""
    h = hashlib.blake2b(digest_size=8, person=b"snapfs-ino")
    h.update(salt)
    h.update(b"\0")
    h.update(volume_name.encode())
    h.update(b"\0")
    h.update(str(guest_ino).encode())
    value = int.from_bytes(h.digest(), "big") & ((1 << 63) - 1)
    return value if value >= _INO_FLOOR else value + _INO_FLOOR
