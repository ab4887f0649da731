"""The whole-volume walker: a small C program run inside the appliance, and its output.

Owns building ``walk.c`` (once per machine, with the host's gcc, into the cache directory;
the appliance is made from the host's own packages, and the binary is static anyway),
uploading it into a running appliance, the script that runs it, and parsing what it prints
into listings and extent maps.

Why: under TCG every process the appliance starts and every syscall is slow; the shell
version of the whole-volume pass (find | stat, find for links, getfattr, find | filefrag -e)
walked the tree four times and printed 5 MB of filefrag text for 20,000 files (12-14 s here).
The walker does one traversal: lstat, readlink and FIEMAP per entry (xattrs in a second,
separate pass: they double the cost and rsync -a does not ask for them).

Without gcc (or when the build fails) ``walker_binary`` returns None and callers keep the
shell version: slower, same results.

Thread rules: ``walker_binary`` blocks (it may run gcc): call it from a worker thread (the
session's). ``install`` runs inside ``GuestSession.call``. Parsers are pure.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Extent
from .session import LaunchState, verdict_path
from .shell import SCRATCH, ensure_scratch, parse_stat_record, sh_bytes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("walk.c")
# Where the binary lives inside the appliance (its own root, see shell.SCRATCH).
APPLIANCE_PATH = "/sysroot" + SCRATCH + "/walk"

WANT_EXTENTS = 1
WANT_XATTRS = 2

# FIEMAP extent flags (linux/fiemap.h).
_LAST, _UNWRITTEN, _MERGED, _SHARED = 0x1, 0x800, 0x1000, 0x2000
# Flags that do not change where the bytes are; any other (unknown, delalloc, encoded,
# encrypted, not aligned, inline, tail) makes the file unmappable.
_HARMLESS = _LAST | _MERGED | _SHARED


@functools.lru_cache(maxsize=1)
def walker_binary() -> Path | None:
    """The compiled walker (built on first use, cached by source hash); None if unavailable."""
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        log.warning("guest walker source missing (%s): using the shell listing", exc)
        return None
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = verdict_path().parent / f"walk-{digest}" / "snapfs-walk"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        log.warning("no C compiler: guest trees are listed with the slower shell script")
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / "snapfs-walk"
            proc = subprocess.run(
                [gcc, "-O2", "-static", "-o", str(out), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                log.warning("building the guest walker failed: %s", proc.stderr.strip()[-500:])
                return None
            out.replace(target)  # atomic: a concurrent build wins or loses whole
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("building the guest walker failed: %s", exc)
        return None
    log.info("built the guest walker %s", target)
    return target


def install(g: Any, state: LaunchState, binary: Path) -> None:
    """Upload the walker into this launch's appliance (once per launch)."""
    if state.walker_ready:
        return
    ensure_scratch(g, state)
    g.upload(str(binary), SCRATCH + "/walk")
    g.debug("sh", [f"chmod 0755 {APPLIANCE_PATH}"])
    state.walker_ready = True


def walk_script(dir_path: bytes, limit: int, what: int) -> str:
    """Shell code running the walker on ``dir_path`` (an appliance path)."""
    return "\n".join([sh_bytes("D", dir_path), f'{APPLIANCE_PATH} "$D" {limit} {what}'])


@dataclass
class WalkEntry:
    """One entry as the walker printed it (path relative to the walk's root: ``./a/b``)."""

    path: bytes
    fields: dict[str, int]
    link: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    # FIEMAP result for non-empty regular files: extents, None if unmappable; absent: not asked
    extents: list[Extent] | None = None
    mapped: bool = False


def parse_walk(out: bytes) -> list[WalkEntry]:
    """The walker's records, in walk order (the root ``.`` first). ValueError if malformed."""
    parts = out.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    entries: list[WalkEntry] = []
    i = 0
    n = len(parts)

    def take(count: int) -> list[bytes]:
        nonlocal i
        if i + count > n:
            raise ValueError("walker output truncated")
        got = parts[i : i + count]
        i += count
        return got

    while i < n:
        (tag,) = take(1)
        if tag == b"S":
            path, stat_text = take(2)
            _, fields = parse_stat_record(stat_text + b" " + path)
            entries.append(WalkEntry(path, fields))
            continue
        if not entries:
            raise ValueError(f"walker record {tag!r} before any entry")
        entry = entries[-1]
        if tag == b"L":
            (entry.link,) = take(1)
        elif tag == b"X":
            name, value = take(2)
            entry.xattrs[name] = bytes.fromhex(value.decode("ascii"))
        elif tag == b"F":
            (text,) = take(1)
            entry.extents = parse_fiemap(text)
            entry.mapped = True
        elif tag == b"U":
            take(1)
            entry.extents = None
            entry.mapped = True
        else:
            raise ValueError(f"unknown walker record {tag!r}")
    return entries


def parse_fiemap(text: bytes) -> list[Extent] | None:
    """Extents from an F record (``n`` then ``logical physical length flags`` n times)."""
    numbers = text.split()
    count = int(numbers[0])
    if len(numbers) != 1 + 4 * count:
        raise ValueError(f"bad FIEMAP record {text[:100]!r}")
    extents: list[Extent] = []
    for k in range(count):
        logical, physical, length = (int(x) for x in numbers[1 + 4 * k : 4 + 4 * k])
        flags = int(numbers[4 + 4 * k], 16)
        if flags & ~(_HARMLESS | _UNWRITTEN):
            return None
        extents.append(Extent(logical, physical, length, bool(flags & _UNWRITTEN)))
    extents.sort(key=lambda e: e.logical)
    for a, b in itertools.pairwise(extents):
        if a.logical + a.length > b.logical:
            return None
    return extents
