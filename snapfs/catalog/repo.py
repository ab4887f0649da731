"""The repository directory (the default backup source): its layout and its loader.

This module owns the on-disk layout described in ``docs/repository.md`` (file names, JSON
fields, id and time formats; ``writer.py`` writes what this module reads) and
``load_repository``, which turns a repository into a ``Catalog``.

The loader is synchronous and blocking (it runs ``qemu-img`` for every disk): the mount calls
it from a worker thread. It never raises for a bad file below the repository root: every
problem becomes a ``Problem`` naming the file, and the broken VM, snapshot or disk is kept
with ``error`` set so the mount can show it and answer EIO. Only a path that is not a
repository at all raises ``RepositoryError``.

Each image file is probed once with ``qemu-img info`` (without its chain) and ``qemu-img
check`` (a qcow2 whose tables point past the end of the file reads as zeros without any
error; only check notices), the backing chain is walked here, and allocation comes from
``qemu-img map`` through the chain. Facts are cached per process (``ImageCache``), keyed on
the stat of the files: repository images never change once written, so a refresh of a large
repository only runs ``qemu-img`` for new snapshots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from snapfs.catalog import qemu_img
from snapfs.catalog.model import Catalog, Disk, Problem, Snapshot, Vm
from snapfs.errors import RepositoryError

log = logging.getLogger(__name__)

MARKER = "snapfs-repo.json"
MARKER_FORMAT = "snapfs-repository"
# Bumped only for changes an older loader would misread; new optional fields do not bump it.
VERSION = 1
VMS_DIR = "vms"
VM_FILE = "vm.json"
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_FILE = "snapshot.json"
DISKS_DIR = "disks"
# Work directories of an unfinished ``add_snapshot`` start with this; the loader skips every
# dot entry, so a half-written snapshot is never visible.
TEMP_PREFIX = ".tmp-"

# Default extension of each stored format (qemu's names; vpc is Microsoft's .vhd).
EXTENSIONS = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vpc": "vhd"}

# Disk names become file names and appear in the mount: keep them to a safe portable set.
_DISK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Snapshot ids sort by creation time: "20261123T012305Z-1a2b3c".
_SNAPSHOT_ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
_ID_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


# --- times and ids ------------------------------------------------------------------------


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z`` suffix (the JSON form of ``created``).

    Milliseconds keep two snapshots taken within one second in order (the newest is the
    default parent of an incremental one)."""
    when = datetime.fromtimestamp(epoch, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """Parse an RFC 3339 time with an explicit offset (``Z`` or ``+hh:mm``) into an epoch."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise ValueError(f"time has no UTC offset: {text!r}")
    return when.timestamp()


def snapshot_id(epoch: float, suffix: str) -> str:
    """The id of a snapshot created at ``epoch``: sortable time plus 6 hex digits."""
    return f"{datetime.fromtimestamp(epoch, UTC).strftime(_ID_TIME_FORMAT)}-{suffix}"


def default_snapshot_name(epoch: float) -> str:
    """A readable default name (UTC, no ``:`` so it copies onto any filesystem)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d_%H-%M-%S")


def _time_from_id(snap_id: str) -> float:
    match = _SNAPSHOT_ID_RE.match(snap_id)
    if not match:
        return 0.0
    return datetime.strptime(match.group(1), _ID_TIME_FORMAT).replace(tzinfo=UTC).timestamp()


def is_valid_disk_name(name: str) -> bool:
    """Whether ``name`` may name a disk (``vda``, ``sda``, ``disk-0``, ...)."""
    return bool(_DISK_NAME_RE.match(name))


# --- the marker ---------------------------------------------------------------------------


def is_repository(path: Path) -> bool:
    """Whether ``path`` is a snapfs repository (a directory holding the marker file)."""
    return (path / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of the repository at ``path``; ``RepositoryError`` if it is not one we read."""
    marker = path / MARKER
    if not path.is_dir():
        raise RepositoryError(f"{path}: not a directory")
    if not marker.is_file():
        raise RepositoryError(
            f"{path}: not a snapfs repository (no {MARKER}; see 'snapfs repo init')"
        )
    try:
        data = _read_json(marker)
    except _BadFile as exc:
        raise RepositoryError(f"{marker}: {exc}") from None
    if data.get("format") != MARKER_FORMAT:
        raise RepositoryError(f"{marker}: field 'format' must be {MARKER_FORMAT!r}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RepositoryError(f"{marker}: field 'version' must be an integer")
    if version > VERSION:
        raise RepositoryError(
            f"{marker}: repository format version {version} is newer than this snapfs "
            f"reads ({VERSION}); upgrade snapfs"
        )
    return data


# --- JSON helpers -------------------------------------------------------------------------


class _BadFile(Exception):
    """A metadata file is missing, unreadable or malformed (message names no file)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _BadFile("file is missing") from None
    except UnicodeDecodeError as exc:
        raise _BadFile(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise _BadFile(f"cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadFile(
            f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise _BadFile("malformed: the top level must be a JSON object")
    return data


def _str_field(
    data: dict[str, Any], key: str, *, required: bool = True, empty: bool = False
) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (not empty and not value):
        kind = "a string" if empty else "a non-empty string"
        raise _BadFile(f"field {key!r} must be {kind}")
    return value


def _opt_str_field(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _BadFile(f"field {key!r} must be a non-empty string or null")
    return value


def _relative_file(value: Any, what: str) -> PurePosixPath:
    """A file name stored in JSON: relative, inside the snapshot directory."""
    if not isinstance(value, str) or not value:
        raise _BadFile(f"{what} must be a non-empty string")
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or "\0" in value:
        raise _BadFile(f"{what} must be a relative path inside the snapshot directory: {value!r}")
    return rel


# --- image facts --------------------------------------------------------------------------

# A chain deeper than this is treated as broken: qemu itself refuses much shorter loops, and
# a repository with thousands of incremental snapshots on one base should be consolidated.
MAX_CHAIN_DEPTH = 1000

_Stamp = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageFacts:
    """What the catalog needs to know about one image and its chain."""

    format: str
    virtual_size: int
    allocated: int
    file_size: int
    backing: Path | None  # absolute, normalised
    backing_as_written: str | None
    chain: tuple[Path, ...]  # every file of the chain, top first


@dataclass(frozen=True)
class _Header:
    """Facts of one image file alone (its backing file is not opened)."""

    info: qemu_img.ImageInfo
    check_errors: int  # corruptions found by ``qemu-img check`` (0 for formats without checks)


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ImageCache:
    """Facts of readable images, reused while their files are unchanged. Thread-safe.

    Each image file is probed once (``qemu-img info`` without its chain, and ``qemu-img
    check``), so loading N incremental snapshots of a disk costs O(N) qemu-img runs, not
    O(N^2); the chain is walked here, which also gives clear messages for missing and
    looping backing files (qemu only notices a loop when the names are identical).
    """

    def __init__(self, *, check: bool = True) -> None:
        self.check = check
        self._lock = threading.Lock()
        self._headers: dict[tuple[Path, str], tuple[_Stamp, _Header]] = {}
        self._allocated: dict[tuple[Path, str], tuple[tuple[_Stamp | None, ...], int]] = {}

    def clear(self) -> None:
        with self._lock:
            self._headers.clear()
            self._allocated.clear()

    def header(self, path: Path, fmt: str) -> _Header:
        key = (path, fmt)
        stamp = _stamp(path)
        with self._lock:
            entry = self._headers.get(key)
        if entry is not None and stamp is not None and entry[0] == stamp:
            return entry[1]
        (info,) = qemu_img.info(path, fmt, chain=False)
        errors = 0
        if self.check:
            result = qemu_img.check(path, fmt, open_backing=False)
            errors = result.errors
        header = _Header(info, errors)
        if stamp is not None:
            with self._lock:
                self._headers[key] = (stamp, header)
        return header

    def facts(self, path: Path, fmt: str) -> ImageFacts:
        """Facts of ``path`` and its chain; ``QemuImgError`` says why it is unreadable."""
        path = Path(os.path.normpath(path))
        files = [path]
        seen = {os.path.realpath(path)}
        current, current_fmt = path, fmt
        top: _Header | None = None
        while True:
            header = self.header(current, current_fmt)
            if header.info.corrupt or header.check_errors:
                what = (
                    "is marked corrupt"
                    if header.info.corrupt
                    else (f"is corrupt (qemu-img check found {header.check_errors} error(s))")
                )
                where = "image" if current == path else f"backing file {current}"
                raise qemu_img.QemuImgError(f"{where} {what}")
            top = top or header
            written = header.info.backing_filename
            if not written:
                break
            backing = Path(os.path.normpath(current.parent / written))
            if not backing.exists():
                raise qemu_img.QemuImgError(
                    f"backing file {written} of {current.name} is missing ({backing})"
                )
            real = os.path.realpath(backing)
            if real in seen or len(files) >= MAX_CHAIN_DEPTH:
                names = " -> ".join(str(f) for f in [*files, backing])
                raise qemu_img.QemuImgError(f"backing chain loops: {names}")
            seen.add(real)
            files.append(backing)
            # An image without a recorded backing format is probed, as qemu itself would.
            current_fmt = header.info.backing_format or qemu_img.probe_format(backing)
            current = backing
        chain = tuple(files)
        return ImageFacts(
            format=top.info.format,
            virtual_size=top.info.virtual_size,
            allocated=self._allocated_bytes(path, fmt, chain),
            file_size=top.info.actual_size,
            backing=chain[1] if len(chain) > 1 else None,
            backing_as_written=top.info.backing_filename,
            chain=chain,
        )

    def _allocated_bytes(self, path: Path, fmt: str, chain: tuple[Path, ...]) -> int:
        key = (path, fmt)
        stamps = tuple(_stamp(p) for p in chain)
        with self._lock:
            entry = self._allocated.get(key)
        if entry is not None and None not in stamps and entry[0] == stamps:
            return entry[1]
        value = qemu_img.allocated(path, fmt)
        with self._lock:
            self._allocated[key] = (stamps, value)
        return value


def probe_image(path: Path, fmt: str) -> ImageFacts:
    """Facts of one image, without caching; ``QemuImgError`` says why it is unreadable."""
    return ImageCache().facts(path, fmt)


_default_cache = ImageCache()


# --- the loader ---------------------------------------------------------------------------


class _Loader:
    def __init__(self, root: Path, shown: Path, cache: ImageCache) -> None:
        self.root = root  # absolute: model paths
        self.shown = shown  # as the user wrote it: problem locations
        self.cache = cache
        self.problems: list[Problem] = []

    def where(self, path: Path) -> str:
        try:
            return str(self.shown / path.relative_to(self.root))
        except ValueError:
            return str(path)

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.where(path), message))

    def subdirs(self, parent: Path) -> list[Path]:
        """Directories in ``parent`` (sorted; dot entries such as work dirs skipped)."""
        try:
            entries = sorted(parent.iterdir())
        except FileNotFoundError:
            self.problem(parent, "directory is missing")
            return []
        except OSError as exc:
            self.problem(parent, f"cannot list directory: {exc.strerror}")
            return []
        dirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                self.problem(entry, "unexpected file (not a directory); ignored")
                continue
            dirs.append(entry)
        return dirs

    def load(self) -> Catalog:
        vms = [self.load_vm(d) for d in self.subdirs(self.root / VMS_DIR)]
        vms = _dedupe(vms, lambda vm: self.root / VMS_DIR / vm.id / VM_FILE, self, "VM")
        vms.sort(key=lambda vm: (vm.name, vm.id))
        return Catalog(vms=tuple(vms), problems=tuple(self.problems))

    def load_vm(self, vm_dir: Path) -> Vm:
        vm_id = vm_dir.name
        vm_file = vm_dir / VM_FILE
        name, error = vm_id, None
        try:
            data = _read_json(vm_file)
            name = _str_field(data, "name")
            file_id = data.get("id")
            if file_id is not None and file_id != vm_id:
                self.problem(
                    vm_file, f"id {file_id!r} differs from the directory name; using {vm_id!r}"
                )
        except _BadFile as exc:
            error = str(exc)
            self.problem(vm_file, error)
        snaps = [self.load_snapshot(d) for d in self.subdirs(vm_dir / SNAPSHOTS_DIR)]
        snaps = _dedupe(
            snaps, lambda s: vm_dir / SNAPSHOTS_DIR / s.id / SNAPSHOT_FILE, self, "snapshot"
        )
        ids = {s.id for s in snaps}
        for snap in snaps:
            if snap.parent is not None and snap.parent not in ids:
                self.problem(
                    vm_dir / SNAPSHOTS_DIR / snap.id / SNAPSHOT_FILE,
                    f"parent snapshot {snap.parent!r} does not exist",
                )
        snaps.sort(key=lambda s: (s.created, s.id))
        return Vm(id=vm_id, name=name, snapshots=tuple(snaps), path=vm_dir, error=error)

    def load_snapshot(self, snap_dir: Path) -> Snapshot:
        snap_id = snap_dir.name
        snap_file = snap_dir / SNAPSHOT_FILE
        try:
            data = _read_json(snap_file)
            file_id = data.get("id")
            if file_id is not None and file_id != snap_id:
                self.problem(
                    snap_file, f"id {file_id!r} differs from the directory name; using {snap_id!r}"
                )
            name = _str_field(data, "name")
            try:
                created = parse_time(_str_field(data, "created"))
            except ValueError as exc:
                raise _BadFile(f"field 'created': {exc}") from None
            description = _str_field(data, "description", required=False, empty=True)
            parent = _opt_str_field(data, "parent")
            disk_specs = self.disk_specs(data)
            config = self.config_files(data, snap_dir, snap_file)
        except _BadFile as exc:
            self.problem(snap_file, str(exc))
            return Snapshot(
                id=snap_id,
                name=snap_id,
                created=_time_from_id(snap_id),
                path=snap_dir,
                error=str(exc),
            )
        disks = tuple(self.load_disk(snap_dir, *spec) for spec in disk_specs)
        return Snapshot(
            id=snap_id,
            name=name,
            created=created,
            description=description,
            parent=parent,
            disks=disks,
            config_files=config,
            path=snap_dir,
        )

    @staticmethod
    def disk_specs(data: dict[str, Any]) -> list[tuple[str, PurePosixPath, str]]:
        disks = data.get("disks")
        if not isinstance(disks, list):
            raise _BadFile("field 'disks' must be a list")
        specs: list[tuple[str, PurePosixPath, str]] = []
        seen: set[str] = set()
        for i, disk in enumerate(disks):
            if not isinstance(disk, dict):
                raise _BadFile(f"disks[{i}] must be an object")
            name = disk.get("name")
            if not isinstance(name, str) or not is_valid_disk_name(name):
                raise _BadFile(f"disks[{i}].name must match [A-Za-z0-9][A-Za-z0-9._-]*: {name!r}")
            if name in seen:
                raise _BadFile(f"disk name {name!r} appears twice")
            seen.add(name)
            rel = _relative_file(disk.get("file"), f"disks[{i}].file")
            fmt = disk.get("format")
            if fmt not in qemu_img.FORMATS:
                raise _BadFile(
                    f"disks[{i}].format must be one of {', '.join(qemu_img.FORMATS)}: {fmt!r}"
                )
            specs.append((name, rel, fmt))
        return specs

    def config_files(
        self, data: dict[str, Any], snap_dir: Path, snap_file: Path
    ) -> tuple[Path, ...]:
        config = data.get("config", [])
        if not isinstance(config, list):
            raise _BadFile("field 'config' must be a list of file names")
        files = []
        for i, value in enumerate(config):
            path = snap_dir / _relative_file(value, f"config[{i}]")
            # Kept even when missing, so the mount shows it (and answers EIO) instead of
            # silently dropping a file a mirror of the mount already has.
            if not path.is_file():
                self.problem(path, "configuration file is missing")
            files.append(path)
        return tuple(files)

    def load_disk(self, snap_dir: Path, name: str, rel: PurePosixPath, fmt: str) -> Disk:
        path = snap_dir / rel
        disk = Disk(name=name, path=path, format=fmt)
        if not path.is_file():
            error = "image file is missing" if not path.exists() else "image is not a regular file"
            self.problem(path, error)
            return replace(disk, error=error)
        try:
            facts = self.cache.facts(path, fmt)
        except qemu_img.QemuImgError as exc:
            self.problem(path, exc.message)
            return replace(disk, error=exc.message)
        if facts.backing_as_written is not None and os.path.isabs(facts.backing_as_written):
            self.problem(
                path,
                f"backing file path is absolute ({facts.backing_as_written}); "
                "the repository cannot be moved",
            )
        if facts.backing is not None and not _is_within(facts.backing, self.root):
            self.problem(path, f"backing file {facts.backing} is outside the repository")
        return replace(
            disk,
            virtual_size=facts.virtual_size,
            allocated=facts.allocated,
            file_size=facts.file_size,
            backing=facts.backing,
        )


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


_Entry = TypeVar("_Entry", Vm, Snapshot)


def _dedupe(
    items: list[_Entry], file_of: Callable[[_Entry], Path], loader: _Loader, kind: str
) -> list[_Entry]:
    """Give duplicate display names a deterministic suffix and report each duplicate.

    The entry with the smallest id keeps the name; the others become ``NAME [ID]`` (ids are
    unique directory names, so the result is unique). Nothing is hidden or marked broken:
    the data is readable, only the metadata is inconsistent.
    """
    result: list[_Entry] = []
    first: dict[str, str] = {}
    used = {item.name for item in items}
    for item in sorted(items, key=lambda i: i.id):
        owner = first.get(item.name)
        if owner is None:
            first[item.name] = item.id
            result.append(item)
            continue
        new = f"{item.name} [{item.id}]"
        while new in used:
            new += "~"
        used.add(new)
        loader.problem(
            file_of(item),
            f"duplicate {kind} name {item.name!r} (also used by {owner!r}); shown as {new!r}",
        )
        result.append(replace(item, name=new))
    return result


def load_repository(path: Path, *, cache: ImageCache | None = None) -> Catalog:
    """Load the repository at ``path`` into a ``Catalog`` (blocking; see the module doc).

    Raises ``RepositoryError`` only when ``path`` is not a readable repository; every
    problem inside it is reported in ``Catalog.problems``.
    """
    read_marker(path)
    loader = _Loader(path.resolve(), path, cache if cache is not None else _default_cache)
    return loader.load()
