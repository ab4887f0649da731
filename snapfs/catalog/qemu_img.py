"""Thin typed wrappers around the ``qemu-img`` command: info, map, convert, rebase, check.

This module owns every ``qemu-img`` invocation of the catalog and the writer. Each call is a
blocking subprocess run (callers on the trio loop must use a worker thread). The image format
is always passed explicitly (``-f``): probing a format is unsafe (a raw guest disk can look
like a qcow2 header) and the repository records the format of every image.

Failures raise ``QemuImgError`` carrying qemu-img's own message, without the ``qemu-img:``
prefix, so it can be shown to the user as the reason an image is unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapfs.errors import SnapfsError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"

# Metadata calls (info, map, check) read headers and allocation tables only; a minute is far
# beyond what a healthy local image needs, and stops a hung NFS mount from hanging a refresh.
METADATA_TIMEOUT = 60.0

# Formats the repository stores and reads (all handled natively by qemu).
FORMATS = ("qcow2", "raw", "vmdk", "vpc")

# What ``qemu-img convert -p`` / ``rebase -p`` print, separated by ``\r``: "    (12.34/100%)".
_PROGRESS_RE = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")

ProgressCallback = Callable[[float], None]
"""Called with the percentage done (0.0 to 100.0) of one qemu-img operation."""


class QemuImgError(SnapfsError):
    """qemu-img failed, timed out or printed something we could not parse."""


@dataclass(frozen=True)
class ImageInfo:
    """One image of a backing chain, as ``qemu-img info`` reports it."""

    filename: str  # as qemu names it (relative names are relative to the previous image)
    format: str
    virtual_size: int
    actual_size: int  # bytes the file takes on the host
    backing_filename: str | None  # as written in the image header
    full_backing_filename: str | None  # resolved by qemu against the image's directory
    backing_format: str | None
    corrupt: bool  # qcow2 "corrupt" flag: qemu refuses writes, reads may be wrong
    dirty: bool


@dataclass(frozen=True)
class Extent:
    """One extent of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int  # 0 is the top image, 1 its backing file, ...
    data: bool
    zero: bool
    present: bool = True  # allocated in the image at ``depth`` (False: a hole)


@dataclass(frozen=True)
class CheckResult:
    """The summary of ``qemu-img check``."""

    errors: int
    leaks: int
    supported: bool  # False for formats without checks (raw)


def _clean_message(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cleaned = [line.removeprefix("qemu-img: ") for line in lines]
    return "; ".join(cleaned) or "qemu-img failed without a message"


def _run(args: Sequence[str], timeout: float | None) -> subprocess.CompletedProcess[str]:
    cmd = [QEMU_IMG, *args]
    log.debug("running %s", cmd)
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise QemuImgError("qemu-img is not installed (package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise QemuImgError(f"qemu-img {args[0]} timed out after {timeout:.0f} s") from None


def _run_checked(args: Sequence[str], timeout: float | None) -> str:
    proc = _run(args, timeout)
    if proc.returncode != 0:
        raise QemuImgError(_clean_message(proc.stderr or proc.stdout))
    return proc.stdout


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QemuImgError(f"cannot parse qemu-img {what} output: {exc}") from None


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    return value if isinstance(value, int) else 0


def _image_info(obj: Any) -> ImageInfo:
    if not isinstance(obj, dict):
        raise QemuImgError("unexpected qemu-img info output (not an object)")
    specific = obj.get("format-specific")
    corrupt = False
    if isinstance(specific, dict) and isinstance(specific.get("data"), dict):
        corrupt = bool(specific["data"].get("corrupt", False))
    return ImageInfo(
        filename=str(obj.get("filename", "")),
        format=str(obj.get("format", "")),
        virtual_size=_int(obj, "virtual-size"),
        actual_size=_int(obj, "actual-size"),
        backing_filename=_opt_str(obj, "backing-filename"),
        full_backing_filename=_opt_str(obj, "full-backing-filename"),
        backing_format=_opt_str(obj, "backing-filename-format"),
        corrupt=corrupt,
        dirty=bool(obj.get("dirty-flag", False)),
    )


def info(
    path: Path, fmt: str, *, chain: bool = True, timeout: float = METADATA_TIMEOUT
) -> list[ImageInfo]:
    """The image at ``path`` and, with ``chain``, its whole backing chain, top first.

    Without ``chain`` the backing file is not opened at all (only its name is reported).
    ``-U`` (force share) lets us read images another process holds open (a running backup
    or a qemu-nbd serving the mount). Missing or unreadable backing files and corrupt headers
    raise ``QemuImgError`` with qemu's message.
    """
    args = ["info", "-U", "--output=json", "-f", fmt, str(path)]
    if chain:
        args.insert(3, "--backing-chain")
    out = _run_checked(args, timeout)
    data = _parse_json(out, "info")
    items = data if isinstance(data, list) else [data]
    return [_image_info(item) for item in items]


def probe_format(path: Path, *, timeout: float = METADATA_TIMEOUT) -> str:
    """Let qemu guess the format of an image the user gave without naming one.

    Only for user-supplied sources: a raw image whose first bytes look like another format
    is misdetected, which is why the repository always records and passes the format.
    """
    out = _run_checked(["info", "-U", "--output=json", str(path)], timeout)
    data = _parse_json(out, "info")
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str):
        raise QemuImgError("qemu-img info reported no format")
    return fmt


def map_extents(path: Path, fmt: str, *, timeout: float = METADATA_TIMEOUT) -> list[Extent]:
    """The allocation map of ``path`` through its backing chain."""
    out = _run_checked(["map", "-U", "--output=json", "-f", fmt, str(path)], timeout)
    data = _parse_json(out, "map")
    if not isinstance(data, list):
        raise QemuImgError("unexpected qemu-img map output (not a list)")
    extents = []
    for item in data:
        if not isinstance(item, dict):
            raise QemuImgError("unexpected qemu-img map output (not an object)")
        extents.append(
            Extent(
                start=_int(item, "start"),
                length=_int(item, "length"),
                depth=_int(item, "depth"),
                data=bool(item.get("data", False)),
                zero=bool(item.get("zero", False)),
                present=bool(item.get("present", True)),
            )
        )
    return extents


def allocated(path: Path, fmt: str, *, timeout: float = METADATA_TIMEOUT) -> int:
    """Bytes holding data through the whole backing chain (zeros and holes excluded)."""
    return sum(e.length for e in map_extents(path, fmt, timeout=timeout) if e.data)


# Formats whose images can have a backing file (the others reject a "backing" option).
_BACKING_FORMATS = ("qcow2", "vmdk")


def check(
    path: Path, fmt: str, *, open_backing: bool = True, timeout: float = METADATA_TIMEOUT
) -> CheckResult:
    """Run ``qemu-img check`` (read-only: never repairs) and summarise it.

    Without ``open_backing`` only this file is checked: a missing backing file is then not
    an error here (the caller walks the chain and reports it more clearly).
    """
    if open_backing or fmt not in _BACKING_FORMATS:
        args = ["check", "-U", "--output=json", "-f", fmt, str(path)]
    else:
        spec = {"driver": fmt, "backing": None, "file": {"driver": "file", "filename": str(path)}}
        args = ["check", "-U", "--output=json", "json:" + json.dumps(spec)]
    proc = _run(args, timeout)
    if proc.returncode == 63:  # documented: "the image format does not support checks"
        return CheckResult(errors=0, leaks=0, supported=False)
    data = _parse_json(proc.stdout, "check") if proc.stdout.strip() else None
    if not isinstance(data, dict):
        raise QemuImgError(_clean_message(proc.stderr or proc.stdout))
    return CheckResult(
        errors=_int(data, "check-errors") + _int(data, "corruptions"),
        leaks=_int(data, "leaks"),
        supported=True,
    )


def _run_with_progress(
    args: Sequence[str], progress: ProgressCallback | None, timeout: float | None
) -> None:
    """Run a qemu-img command that takes ``-p``, feeding its percentages to ``progress``."""
    cmd = [QEMU_IMG, *args]
    log.debug("running %s", cmd)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise QemuImgError("qemu-img is not installed (package qemu-utils)") from None
    assert proc.stdout is not None and proc.stderr is not None
    stderr_chunks: list[bytes] = []
    stderr_pipe = proc.stderr
    # stderr is drained in a thread so a chatty qemu-img cannot block on a full pipe while
    # we wait for progress on stdout.
    drain = threading.Thread(target=lambda: stderr_chunks.append(stderr_pipe.read()), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
    if timer is not None:
        timer.start()
    try:
        pending = b""
        while True:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                match = _PROGRESS_RE.search(record.decode("ascii", "replace"))
                if match and progress is not None:
                    progress(float(match.group(1)))
        returncode = proc.wait()
    except BaseException:
        # The caller gave up (KeyboardInterrupt, an exception in the callback): do not
        # leave qemu-img writing a file that is about to be deleted.
        proc.kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        drain.join()
        proc.stdout.close()
        proc.stderr.close()
    if returncode != 0:
        if returncode < 0 and timeout is not None:
            raise QemuImgError(f"qemu-img {args[0]} timed out after {timeout:.0f} s")
        raise QemuImgError(_clean_message(b"".join(stderr_chunks).decode("utf-8", "replace")))


def convert(
    src: Path,
    dst: Path,
    *,
    src_format: str,
    dst_format: str,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> None:
    """Copy ``src`` into a new standalone image ``dst`` (sparse: zero blocks are skipped).

    vpc images get ``force_size`` so the virtual size is kept exactly instead of being
    rounded to a CHS geometry (a guest disk must not grow or shrink in a backup).
    """
    args = ["convert", "-p", "-U", "-f", src_format, "-O", dst_format]
    if dst_format == "vpc":
        args += ["-o", "force_size=on"]
    _run_with_progress([*args, str(src), str(dst)], progress, timeout)


def create_overlay(
    path: Path,
    backing: str,
    *,
    backing_format: str,
    size: int | None = None,
    timeout: float = METADATA_TIMEOUT,
) -> None:
    """Create an empty qcow2 ``path`` backed by ``backing`` (written into the header as given:
    a relative name is resolved by qemu against the directory of ``path``)."""
    args = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, str(path)]
    if size is not None:
        args.append(str(size))
    _run_checked(args, timeout)


def rebase(
    path: Path,
    backing: str,
    *,
    backing_format: str,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> None:
    """Safe rebase of the qcow2 ``path`` onto ``backing``: the clusters where the old and the
    new backing differ are copied into ``path``, so the guest-visible content is unchanged."""
    args = ["rebase", "-p", "-f", "qcow2", "-b", backing, "-F", backing_format, str(path)]
    _run_with_progress(args, progress, timeout)


def write_diff_overlay(
    src: Path,
    dst: Path,
    *,
    src_format: str,
    parent: str,
    parent_format: str = "qcow2",
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> None:
    """Write ``dst``, a qcow2 overlay on ``parent`` holding only the clusters of ``src`` that
    differ from it; the chain ``dst`` → ``parent`` then reads exactly like ``src``.

    ``qemu-img convert -B`` is not used: it copies every allocated block of the source into
    the overlay, whether or not the parent already holds the same bytes. Instead ``dst``
    starts as an empty overlay on the source itself, and a safe rebase onto the parent
    copies in only the differences (compared cluster by cluster by qemu). ``parent`` is
    stored in the header exactly as given, so pass it relative to ``dst``'s directory.
    """
    create_overlay(dst, str(src.resolve()), backing_format=src_format)
    rebase(dst, parent, backing_format=parent_format, progress=progress, timeout=timeout)


def compare(
    a: Path, b: Path, *, a_format: str, b_format: str, timeout: float | None = None
) -> bool:
    """Whether two images read the same (``qemu-img compare``; exit 1 means different)."""
    proc = _run(["compare", "-U", "-f", a_format, "-F", b_format, str(a), str(b)], timeout)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise QemuImgError(_clean_message(proc.stderr or proc.stdout))
