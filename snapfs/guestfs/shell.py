"""Running shell scripts in the appliance (``g.debug("sh", …)``) and parsing what they print.

Why a shell at all: the Python binding decodes every returned string as strict UTF-8 and
encodes every argument as UTF-8, so a guest name that is not UTF-8 can neither be listed
(``ls`` raises UnicodeDecodeError) nor passed (surrogates are refused). Scripts get such names
as printf octal escapes and write their raw output to a file in the appliance, which we fetch
with ``pread`` (bytes in the binding): binary safe and not limited by the 4 MiB message size.
Also, one process costs ~40 ms under TCG: scripts must batch (``find -exec … {} +``), never
fork per file.

Thread rules: ``run_script`` is called inside ``GuestSession.call`` (a worker thread holding
the handle); the parsers are pure.
"""

from __future__ import annotations

import os
import re
import string
from decimal import Decimal
from typing import Any

from snapfs.errors import GuestfsError

from .session import LaunchState

# Scratch dir on the appliance's own root (nothing is ever mounted on the guest "/").
SCRATCH = "/.snapfs"
_SCRATCH_SYSROOT = "/sysroot" + SCRATCH
# pread's protocol limit is 4 MiB minus headers; 3 MiB stays well inside it.
_PREAD_MAX = 3 << 20
_SAFE = frozenset((string.ascii_letters + string.digits + "._/-").encode())


def sh_bytes(var: str, data: bytes) -> str:
    """Shell code assigning the exact bytes ``data`` to ``$var`` (dash printf escapes).

    The trailing ``x`` protects trailing newlines from command substitution.
    """
    escaped = "".join(chr(b) if b in _SAFE else f"\\{b:03o}" for b in data)
    return f"{var}=$(printf '{escaped}x'); {var}=${{{var}%x}}"


def ensure_scratch(g: Any, state: LaunchState) -> None:
    """Create this launch's scratch directory (once)."""
    if not state.scratch_ready:
        g.debug("sh", [f"mkdir -p {_SCRATCH_SYSROOT}"])
        state.scratch_ready = True


def run_script(g: Any, state: LaunchState, script: str) -> tuple[int, bytes]:
    """Run ``script`` with /bin/sh in the appliance; its exit status and raw stdout."""
    ensure_scratch(g, state)
    wrapped = f"{{\n{script}\n}} >{_SCRATCH_SYSROOT}/out 2>{_SCRATCH_SYSROOT}/err; echo $?"
    status_text = g.debug("sh", [wrapped]).strip()
    try:
        status = int(status_text.splitlines()[-1])
    except (ValueError, IndexError):
        raise GuestfsError(f"appliance shell printed {status_text!r}") from None
    return status, read_all(g, f"{SCRATCH}/out")


def read_all(g: Any, path: str) -> bytes:
    size = g.filesize(path)
    chunks = []
    offset = 0
    while offset < size:
        chunk: bytes = g.pread(path, min(_PREAD_MAX, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def script_error(g: Any) -> str:
    try:
        return read_all(g, f"{SCRATCH}/err").decode("utf-8", "replace").strip()
    except RuntimeError:
        return ""


# -- stat ------------------------------------------------------------------------------------

# stat(1) format for one entry, NUL terminated; the name (%n) comes last, so it may hold any
# byte but NUL. %f is the raw mode in hex, %t/%T the device major/minor in hex.
STAT_FORMAT = r"%f %h %i %u %g %s %b %B %t %T %.9X %.9Y %.9Z %n\0"


def timestamp_ns(text: bytes) -> int:
    return int(Decimal(text.decode()) * 1_000_000_000)


def parse_stat_record(record: bytes) -> tuple[bytes, dict[str, int]]:
    """(path as printed, fields) of one STAT_FORMAT record."""
    fields = record.split(b" ", 13)
    if len(fields) != 14:
        raise ValueError(f"bad stat record {record[:200]!r}")
    (mode, nlink, ino, uid, gid, size, blocks, bsize, major, minor, at, mt, ct, name) = fields
    return name, {
        "mode": int(mode, 16),
        "nlink": int(nlink),
        "ino": int(ino),
        "uid": int(uid),
        "gid": int(gid),
        "size": int(size),
        "blocks": int(blocks) * int(bsize) // 512,
        "rdev": os.makedev(int(major, 16), int(minor, 16)),
        "atime_ns": timestamp_ns(at),
        "mtime_ns": timestamp_ns(mt),
        "ctime_ns": timestamp_ns(ct),
    }


# -- getfattr --------------------------------------------------------------------------------

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unquote(data: bytes) -> bytes:
    # getfattr (attr's quote()) writes "\", newline and CR as \ooo, other bytes as they are.
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), data)


def parse_getfattr(text: bytes) -> dict[bytes, dict[bytes, bytes]]:
    """Parse ``getfattr -h -d -m - -e hex`` output: {file name: {attr name: value}}."""
    result: dict[bytes, dict[bytes, bytes]] = {}
    current: dict[bytes, bytes] | None = None
    for line in text.split(b"\n"):
        if line.startswith(b"# file: "):
            name = _unquote(line[len(b"# file: ") :])
            if name.startswith(b"./"):
                name = name[2:]
            current = result.setdefault(name, {})
        elif line and current is not None and not line.startswith(b"#"):
            key, sep, value = line.partition(b"=")
            current[_unquote(key)] = decode_xattr_value(value) if sep else b""
    return result


def decode_xattr_value(value: bytes) -> bytes:
    if value.startswith(b"0x"):
        return bytes.fromhex(value[2:].decode())
    if value.startswith(b"0s"):
        import base64

        return base64.b64decode(value[2:])
    if value.startswith(b'"') and value.endswith(b'"'):
        return _unquote(value[1:-1])
    return value
