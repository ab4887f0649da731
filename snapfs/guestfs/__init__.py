"""The libguestfs layer: guest files of a snapshot, read from its NBD exports.

Public API: ``GuestfsSettings``, ``AppliancePool``, ``GuestSession``, ``GuestTree`` and the
result types in ``model``. See docs/guestfs.md. Only this package imports ``guestfs``.
"""

from __future__ import annotations

from .model import DirEntry, GuestStat, ReadRaw, View, Volume
from .pool import AppliancePool
from .session import GuestSession, LaunchTimeout
from .settings import GuestfsSettings
from .tree import GuestTree

__all__ = [
    "AppliancePool",
    "DirEntry",
    "GuestSession",
    "GuestStat",
    "GuestTree",
    "GuestfsSettings",
    "LaunchTimeout",
    "ReadRaw",
    "View",
    "Volume",
]
