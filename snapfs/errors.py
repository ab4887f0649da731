"""The snapfs error hierarchy: every failure carries the errno the mount answers with.

Only ``fuse_ops`` turns these into ``pyfuse3.FUSEError``; everything below it raises
``SnapfsError`` subclasses (or lets ``nbd.Error`` through, which carries its own errno).
``SnapfsUserError`` is for the command line: printed without a traceback.
"""

from __future__ import annotations

import errno as errno_mod
import os


class SnapfsError(Exception):
    """A failure with an errno for FUSE and a message for the log."""

    errno: int = errno_mod.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class NotFound(SnapfsError):
    errno = errno_mod.ENOENT


class ReadOnly(SnapfsError):
    errno = errno_mod.EROFS


class NotADirectory(SnapfsError):
    errno = errno_mod.ENOTDIR


class IsADirectory(SnapfsError):
    errno = errno_mod.EISDIR


class BackendUnavailable(SnapfsError):
    """A server or appliance could not start, or died: EIO, reason in the message."""

    errno = errno_mod.EIO


class RepositoryError(SnapfsError):
    """A repository file is missing, malformed or inconsistent."""

    errno = errno_mod.EIO


class GuestfsError(SnapfsError):
    """A libguestfs call failed; the errno is inferred from the message (see ``guess_errno``)."""


class SnapfsUserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback, exit code ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The libguestfs Python binding raises RuntimeError with only the message (no last_errno),
# so the errno is recovered from the strerror text the daemon appends.
_GUESSABLE_ERRNOS = (
    errno_mod.ENOENT,
    errno_mod.ENOTDIR,
    errno_mod.EISDIR,
    errno_mod.EACCES,
    errno_mod.EPERM,
    errno_mod.EROFS,
    errno_mod.ENOSPC,
    errno_mod.EEXIST,
    errno_mod.ENOTEMPTY,
    errno_mod.EINVAL,
    errno_mod.ENAMETOOLONG,
    errno_mod.ELOOP,
    errno_mod.ENODATA,
    errno_mod.EXDEV,
    errno_mod.EMLINK,
    errno_mod.EOPNOTSUPP,
)


def guess_errno(message: str, default: int = errno_mod.EIO) -> int:
    """The errno whose strerror text ends (or appears in) a libguestfs error message."""
    for code in _GUESSABLE_ERRNOS:
        if message.rstrip().endswith(os.strerror(code)):
            return code
    for code in _GUESSABLE_ERRNOS:
        if os.strerror(code) in message:
            return code
    return default


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE reply should carry for ``exc`` (EIO when nothing better is known)."""
    if isinstance(exc, SnapfsError):
        return exc.errno
    # nbd.Error: ``errno`` is the name ("ENOSPC"), ``errnum`` the number.
    for attr in ("errnum", "errno"):
        code = getattr(exc, attr, None)
        if isinstance(code, int) and code > 0:
            return code
    return errno_mod.EIO
