"""Fast boot: a copy of libguestfs's appliance whose kernel qemu can start without unpacking it.

libguestfs boots its appliance from a compressed kernel (the host's ``vmlinuz``). Under TCG the
appliance's first seconds go to the kernel decompressing itself (xz) in emulated code: 4-5 s of
a 14-20 s launch on our 2-core machine (docs/guestfs.md, "Fast boot"). qemu can instead start an
uncompressed ``vmlinux`` straight at its PVH entry point (the Xen ELF note PHYS32_ENTRY, which
Debian's and most distributions' kernels carry), skipping both the decompression and the
real-mode setup.

This module owns that copy: a libguestfs *fixed appliance* directory (``README.fixed``,
``kernel``, ``initrd``, ``root``; ``g.set_path`` points a handle at it) holding the decompressed
kernel and hard links to the ``initrd`` and ``root`` that libguestfs's supermin built, so the
three stay one consistent set even when supermin later rebuilds its own. It is made once per
supermin build (keyed by the files' identities), under libguestfs's cache directory, and used
only while the supermin build is current: after a package change a launch goes the normal way,
which lets libguestfs rebuild its appliance, and the next launch makes a new copy.

Anything unexpected (no supermin build yet, a kernel that is not a bzImage or has no PVH entry,
a compression Python cannot undo) means "no fast boot": the caller launches normally. Pure
host-side file work; the caller runs it in a worker thread.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_FILES = ("kernel", "initrd", "root")
# Where supermin takes its inputs: a change in any (or in the package database) makes supermin
# rebuild the appliance on libguestfs's next normal launch.
_PACKAGE_DATABASES = ("/var/lib/dpkg/status", "/var/lib/rpm/rpmdb.sqlite", "/var/lib/rpm/Packages")

_ELF_MAGIC = b"\x7fELF"
_XEN_NOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4


class NotBootable(Exception):
    """The kernel cannot be turned into a PVH-bootable vmlinux (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class FastAppliance:
    """A ready fixed-appliance directory (give it to ``g.set_path``)."""

    path: Path


def supermin_dir(cachedir: str) -> Path:
    """libguestfs's supermin appliance build (``g.get_cachedir()`` is its parent's parent)."""
    return Path(cachedir) / f".guestfs-{os.getuid()}" / "appliance.d"


def prepare(cachedir: str, default_path: str) -> FastAppliance | None:
    """The fast-boot appliance for the current supermin build, made now if needed.

    None when there is none to use for this launch (the reason is logged at INFO once per
    reason and directory). ``default_path`` is libguestfs's appliance search path
    (``g.get_path()``), where the supermin inputs live.
    """
    source = supermin_dir(cachedir)
    try:
        stats = {name: (source / name).stat() for name in _FILES}
    except FileNotFoundError:
        _note(source, "no supermin appliance built yet (this launch builds it)")
        return None
    built = min(stats["kernel"].st_mtime, stats["initrd"].st_mtime)
    newer = _newest_input(Path(default_path))
    if newer is not None and newer > built:
        _note(source, "packages changed since the supermin appliance was built")
        return None
    key = hashlib.sha256(
        repr([(st.st_dev, st.st_ino, st.st_size) for st in stats.values()]).encode()
    ).hexdigest()[:16]
    home = Path(cachedir) / f"snapfs-appliance-{os.getuid()}"
    target = home / key
    if (target / "README.fixed").exists():
        return FastAppliance(target)
    if (home / f"{key}.unusable").exists():
        return None
    home.mkdir(mode=0o755, exist_ok=True)
    try:
        _build(source, target)
    except NotBootable as exc:
        log.info("guestfs fast boot: not possible with %s: %s", source / "kernel", exc)
        (home / f"{key}.unusable").write_text(f"{exc}\n")
        return None
    except OSError as exc:
        log.warning("guestfs fast boot: cannot make %s: %s", target, exc)
        return None
    _prune(home, keep=key)
    return FastAppliance(target)


def _build(source: Path, target: Path) -> None:
    """Make ``target`` atomically: build in a temporary sibling, then rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        vmlinux = vmlinux_from_bzimage((source / "kernel").read_bytes())
        check_pvh_entry(vmlinux)
        (tmp / "kernel").write_bytes(vmlinux)
        for name in ("initrd", "root"):
            try:
                # A hard link keeps exactly this build even if supermin replaces its files.
                os.link(source / name, tmp / name)
            except OSError:
                os.symlink(source / name, tmp / name)
        (tmp / "README.fixed").write_text(
            "snapfs fast-boot appliance: the kernel of the supermin build in\n"
            f"{source}, uncompressed for a PVH boot; initrd and root are that build's.\n"
        )
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another snapfs made it meanwhile: theirs is as good as ours.
            if not (target / "README.fixed").exists():
                raise
        else:
            log.info("guestfs fast boot: appliance with an uncompressed kernel made in %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(home: Path, keep: str) -> None:
    """Remove copies of older supermin builds (a running qemu keeps its open files)."""
    for entry in home.iterdir():
        if entry.name.startswith(keep) or entry.name.startswith(".tmp-"):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _newest_input(default_path: Path) -> float | None:
    """The newest mtime among supermin's inputs: package databases and supermin.d files."""
    times: list[float] = []
    for db in _PACKAGE_DATABASES:
        with contextlib.suppress(OSError):
            times.append(os.stat(db).st_mtime)
    with contextlib.suppress(OSError):
        for entry in (default_path / "supermin.d").iterdir():
            with contextlib.suppress(OSError):
                times.append(entry.stat().st_mtime)
    return max(times, default=None)


_noted: set[tuple[Path, str]] = set()


def _note(source: Path, reason: str) -> None:
    if (source, reason) not in _noted:
        _noted.add((source, reason))
        log.info("guestfs fast boot: not this time: %s", reason)


def vmlinux_from_bzimage(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage (boot protocol ≥ 2.08)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise NotBootable("not an x86 bzImage")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise NotBootable(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start : start + payload_length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            # The kernel's xz stream may be followed by padding: decompress the first stream.
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            out = gzip.decompress(payload)
        elif payload.startswith(b"BZh"):
            out = bz2.decompress(payload)
        elif payload.startswith(b"\x5d\x00\x00"):
            out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        else:
            raise NotBootable(f"kernel payload compression {payload[:4].hex()} not supported")
    except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise NotBootable(f"cannot decompress the kernel payload: {exc}") from None
    if not out.startswith(_ELF_MAGIC):
        raise NotBootable("the kernel payload is not an ELF image")
    return out


def check_pvh_entry(elf: bytes) -> None:
    """NotBootable unless the ELF (64-bit, little-endian) has a Xen PHYS32_ENTRY note."""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        raise NotBootable("the kernel is not a 64-bit little-endian ELF")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_NOTE_PHYS32_ENTRY:
                return
            pos += 12 + _align4(namesz) + _align4(descsz)
    raise NotBootable("the kernel has no PVH entry point (Xen PHYS32_ENTRY note)")


def _align4(n: int) -> int:
    return (n + 3) & ~3
