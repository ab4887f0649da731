"""Restore disks: writable disks kept in the repository, to restore into (pure data).

A restore disk is either a copy-on-write qcow2 overlay on a snapshot disk (nothing copied up
front) or an empty qcow2 of a given size. It lives in ``REPO/restore/<name>/`` (see
docs/restore.md) so that the repository stays the single place where data lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RestoreSource:
    """The snapshot disk a copy-on-write restore disk starts from."""

    vm_id: str
    vm_name: str
    snapshot_id: str
    snapshot_name: str
    disk: str  # the disk's name in the VM, e.g. "vda"


@dataclass(frozen=True)
class RestoreDisk:
    name: str  # directory name under REPO/restore/, shown as MOUNT/restore/<name>/
    path: Path  # absolute path of the qcow2 image (REPO/restore/<name>/disk.qcow2)
    virtual_size: int
    created: float  # seconds since the epoch
    source: RestoreSource | None = None  # None: created empty
    format: str = "qcow2"
    error: str | None = None  # why this restore disk cannot be used, if it cannot


@dataclass(frozen=True)
class CreateSpec:
    """What ``create_restore`` should make: from a snapshot disk, or empty of ``size``."""

    name: str
    vm: str | None = None  # VM name or id
    snapshot: str | None = None  # snapshot name or id, or "latest"
    disk: str | None = None  # disk name, e.g. "vda"
    size: int | None = None  # bytes, for an empty restore disk
