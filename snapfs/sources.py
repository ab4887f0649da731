"""Which kind of backup source a SOURCE argument names, and loading its catalog.

A repository directory (``catalog.repo``), an NBD source file (``catalog.nbdlist``,
``*.toml``) or a libvirt URI (``libvirt.source``: a live point-in-time view). Blocking:
call from a worker thread when on the trio loop.
"""

from __future__ import annotations

from pathlib import Path

from snapfs.catalog.model import Catalog
from snapfs.catalog.nbdlist import is_nbd_source, load_nbd_source
from snapfs.catalog.repo import is_repository, load_repository
from snapfs.errors import SnapfsUserError
from snapfs.libvirt.jobs import is_libvirt_uri
from snapfs.libvirt.source import load_libvirt
from snapfs.nbd.probe import probe_uris


def check_source(source: str) -> None:
    """Fail early, with a clear message, on a SOURCE that cannot be mounted."""
    if is_libvirt_uri(source):
        return
    path = Path(source)
    if not path.exists():
        raise SnapfsUserError(f"{source}: no such file or directory")
    if is_nbd_source(path):
        return
    if not is_repository(path):
        raise SnapfsUserError(
            f"{source}: not a snapfs repository (create one with 'snapfs repo init {source}')"
        )


def load_source(source: str) -> Catalog:
    check_source(source)
    if is_libvirt_uri(source):
        # The same process as the mount's LiveJobs: they share the planned socket paths.
        return load_libvirt(source)
    path = Path(source)
    if is_nbd_source(path):
        return load_nbd_source(path, probe_uris)
    return load_repository(path)


def repository_of(source: str) -> Path | None:
    """The repository directory behind SOURCE, if it is one (restore disks live there)."""
    if is_libvirt_uri(source):
        return None
    path = Path(source)
    return path.resolve() if is_repository(path) else None
