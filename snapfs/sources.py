"""Which kind of backup source a SOURCE argument names, and loading its catalog.

Today: a repository directory (``catalog.repo``). Later sources (libvirt URIs, NBD lists)
plug in here. Blocking: call from a worker thread when on the trio loop.
"""

from __future__ import annotations

from pathlib import Path

from snapfs.catalog.model import Catalog
from snapfs.catalog.repo import is_repository, load_repository
from snapfs.errors import SnapfsUserError


def check_source(source: str) -> None:
    """Fail early, with a clear message, on a SOURCE that cannot be mounted."""
    path = Path(source)
    if not path.exists():
        raise SnapfsUserError(f"{source}: no such file or directory")
    if not is_repository(path):
        raise SnapfsUserError(
            f"{source}: not a snapfs repository (create one with 'snapfs repo init {source}')"
        )


def load_source(source: str) -> Catalog:
    check_source(source)
    return load_repository(Path(source))
