"""The catalog model: VMs, snapshots and disks of a backup source, as frozen dataclasses.

Pure data, no I/O. Every source format (a repository directory, later libvirt or NBD lists)
produces a ``Catalog``. Broken entries are kept, with ``error`` set, so the mount can show
them and answer EIO instead of hiding them (an rsync mirror must not see them vanish).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Disk:
    """One disk image of a snapshot, as qemu reads it (through its backing chain)."""

    name: str  # the disk's name in the VM, e.g. "vda"
    path: Path  # absolute path of the image file
    format: str  # qemu format name: qcow2, raw, vmdk, vpc
    virtual_size: int = 0  # bytes the guest sees
    allocated: int = 0  # bytes holding data through the whole backing chain
    file_size: int = 0  # bytes this image file takes on the host (actual-size)
    backing: Path | None = None  # absolute path of the backing file, if any
    error: str | None = None  # why this disk cannot be read, if it cannot
    uri: str | None = None  # an NBD URI served by someone else (NBD sources); path is display only
    dirty_bitmap: str | None = None  # NBD dirty-bitmap context naming what changed (NBD sources)


@dataclass(frozen=True)
class Snapshot:
    """One point in time of a VM: metadata, captured configuration and disks."""

    id: str  # stable identifier (directory name in a repository)
    name: str  # display name
    created: float  # creation time, seconds since the epoch (UTC)
    description: str = ""
    parent: str | None = None  # id of the parent snapshot for incremental ones
    disks: tuple[Disk, ...] = ()
    config_files: tuple[Path, ...] = ()  # captured VM configuration, kept verbatim
    path: Path | None = None  # snapshot directory, where there is one
    error: str | None = None  # why this snapshot cannot be read, if it cannot


@dataclass(frozen=True)
class Vm:
    """A virtual machine and its snapshots, oldest first."""

    id: str
    name: str
    snapshots: tuple[Snapshot, ...] = ()
    path: Path | None = None
    error: str | None = None

    def latest(self) -> Snapshot | None:
        """The newest snapshot that is readable, if any."""
        good = [s for s in self.snapshots if s.error is None]
        return max(good, key=lambda s: s.created) if good else None


@dataclass(frozen=True)
class Problem:
    """A problem found while loading a source: which file, and what is wrong with it."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Catalog:
    """Everything a source holds, and what was wrong with it."""

    vms: tuple[Vm, ...] = ()
    problems: tuple[Problem, ...] = field(default_factory=tuple)
