"""Writing a repository: ``init_repository`` and ``add_snapshot``.

This module owns every change to a repository directory. The layout itself (names, JSON
fields, id formats) is defined in ``repo.py``, next to the loader that reads it.

``add_snapshot`` is atomic for readers: it builds the new snapshot (or the new VM with its
first snapshot) in a dot-prefixed work directory next to its final place, fsyncs it, and
renames it into place at the end; the loader skips dot entries. On any failure, including
KeyboardInterrupt, the work directory is removed. A work directory left by a killed process
(``.tmp-*``) is invisible and safe to delete. Concurrent writers are serialised with an
``flock`` on the marker file.

Everything here is blocking (qemu-img copies whole disks); progress is reported through a
callback ``progress(disk_name, percent)``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapfs.catalog import qemu_img, repo
from snapfs.errors import RepositoryError, SnapfsUserError

log = logging.getLogger(__name__)

DiskProgress = Callable[[str, float], None]
"""Called with a disk name and the percentage (0-100) of that disk written so far."""

# VM ids become directory names; a slug of the VM name keeps them recognisable.
_VM_ID_MAX = 48
_RESERVED_CONFIG_NAMES = {repo.SNAPSHOT_FILE, repo.DISKS_DIR}


@dataclass(frozen=True)
class DiskSource:
    """An image to store as disk ``name`` of a new snapshot."""

    name: str
    image: Path
    format: str | None = None  # the source's qemu format; probed by qemu-img when None


@dataclass(frozen=True)
class AddedSnapshot:
    """Where ``add_snapshot`` put the new snapshot."""

    vm_id: str
    snapshot_id: str
    name: str
    parent: str | None
    path: Path


# --- small helpers ------------------------------------------------------------------------


def _dump_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    """fsync every file and directory under ``top`` (qemu-img does not fsync its output)."""
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return slug[:_VM_ID_MAX].rstrip("-._") or "vm"


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the repository (on its marker file) for one change."""
    fd = os.open(root / repo.MARKER, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def probe_format(image: Path) -> str:
    """The qemu format of a source image the user gave without one."""
    if not image.is_file():
        raise SnapfsUserError(f"{image}: no such image file")
    try:
        fmt = qemu_img.probe_format(image)
    except qemu_img.QemuImgError as exc:
        raise SnapfsUserError(f"{image}: {exc.message}") from None
    if fmt not in qemu_img.FORMATS:
        raise SnapfsUserError(
            f"{image}: format {fmt!r} is not one snapfs stores ({', '.join(qemu_img.FORMATS)})"
        )
    return fmt


# --- init ---------------------------------------------------------------------------------


def init_repository(path: Path) -> None:
    """Create an empty repository at ``path`` (a new or empty directory)."""
    if repo.is_repository(path):
        raise SnapfsUserError(f"{path}: already a snapfs repository")
    if path.exists() and not path.is_dir():
        raise SnapfsUserError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise SnapfsUserError(f"{path}: directory is not empty")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / repo.VMS_DIR).mkdir(exist_ok=True)
        tmp = path / f"{repo.TEMP_PREFIX}{repo.MARKER}"
        _dump_json(
            tmp,
            {
                "format": repo.MARKER_FORMAT,
                "version": repo.VERSION,
                "created": repo.format_time(time.time()),
            },
        )
        # The marker appears last, complete: a half-initialised directory is not a repository.
        tmp.rename(path / repo.MARKER)
        _fsync_path(path)
    except OSError as exc:
        raise SnapfsUserError(f"{path}: cannot create repository: {exc.strerror}") from None


# --- add_snapshot -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParentDisk:
    file: str  # relative to the snapshot directory, as in snapshot.json
    format: str


@dataclass(frozen=True)
class _VmState:
    vm_id: str
    vm_dir: Path
    snapshot_names: frozenset[str]
    # Snapshots that can be parents: (created, id, disks by name), from snapshot.json only.
    snapshots: tuple[tuple[float, str, dict[str, _ParentDisk]], ...]


def _read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_vm(root: Path, vm_name: str) -> _VmState | None:
    vms_dir = root / repo.VMS_DIR
    if not vms_dir.is_dir():
        raise SnapfsUserError(f"{vms_dir}: missing; is {root} a complete repository?")
    matches = []
    for vm_dir in sorted(vms_dir.iterdir()):
        if vm_dir.name.startswith(".") or not vm_dir.is_dir():
            continue
        data = _read_json_or_none(vm_dir / repo.VM_FILE)
        if data is not None and data.get("name") == vm_name:
            matches.append(vm_dir)
    if not matches:
        return None
    if len(matches) > 1:
        ids = ", ".join(m.name for m in matches)
        raise SnapfsUserError(f"VM name {vm_name!r} is ambiguous in {root} (ids {ids})")
    vm_dir = matches[0]
    names = set()
    snaps = []
    snap_root = vm_dir / repo.SNAPSHOTS_DIR
    for snap_dir in sorted(snap_root.iterdir()) if snap_root.is_dir() else []:
        if snap_dir.name.startswith(".") or not snap_dir.is_dir():
            continue
        data = _read_json_or_none(snap_dir / repo.SNAPSHOT_FILE)
        if data is None:
            continue
        if isinstance(data.get("name"), str):
            names.add(data["name"])
        try:
            created = repo.parse_time(str(data.get("created")))
        except ValueError:
            continue
        disks: dict[str, _ParentDisk] = {}
        for disk in data.get("disks") or []:
            if isinstance(disk, dict) and isinstance(disk.get("name"), str):
                disks[disk["name"]] = _ParentDisk(str(disk.get("file")), str(disk.get("format")))
        snaps.append((created, snap_dir.name, disks))
    snaps.sort()
    return _VmState(vm_dir.name, vm_dir, frozenset(names), tuple(snaps))


def _new_vm_id(root: Path, vm_name: str) -> str:
    base = _slug(vm_name)
    candidate, n = base, 1
    while (root / repo.VMS_DIR / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _check_sources(disks: Sequence[DiskSource], config_files: Sequence[Path]) -> list[DiskSource]:
    if not disks:
        raise SnapfsUserError("a snapshot needs at least one disk")
    seen: set[str] = set()
    checked = []
    for disk in disks:
        if not repo.is_valid_disk_name(disk.name):
            raise SnapfsUserError(
                f"disk name {disk.name!r} must be letters, digits, '.', '_' or '-' (like vda)"
            )
        if disk.name in seen:
            raise SnapfsUserError(f"disk {disk.name!r} given twice")
        seen.add(disk.name)
        if not disk.image.is_file():
            raise SnapfsUserError(f"{disk.image}: no such image file")
        fmt = disk.format or probe_format(disk.image)
        if fmt not in qemu_img.FORMATS:
            raise SnapfsUserError(f"{disk.image}: unsupported format {fmt!r}")
        checked.append(DiskSource(disk.name, disk.image.resolve(), fmt))
    config_names: set[str] = set()
    for cfg in config_files:
        if not cfg.is_file():
            raise SnapfsUserError(f"{cfg}: no such configuration file")
        if cfg.name in _RESERVED_CONFIG_NAMES or cfg.name.startswith("."):
            raise SnapfsUserError(f"{cfg}: a configuration file cannot be named {cfg.name!r}")
        if cfg.name in config_names:
            raise SnapfsUserError(f"two configuration files are named {cfg.name!r}")
        config_names.add(cfg.name)
    return checked


def _unique_name(wanted: str | None, default: str, taken: frozenset[str]) -> str:
    if wanted is not None:
        if not wanted or "\0" in wanted:
            raise SnapfsUserError("a snapshot name must be non-empty and contain no NUL")
        if wanted in taken:
            raise SnapfsUserError(f"this VM already has a snapshot named {wanted!r}")
        return wanted
    name, n = default, 1
    while name in taken:
        n += 1
        name = f"{default}-{n}"
    return name


def add_snapshot(
    root: Path,
    vm_name: str,
    disks: Sequence[DiskSource],
    *,
    config_files: Sequence[Path] = (),
    incremental: bool = False,
    parent: str | None = None,
    description: str = "",
    name: str | None = None,
    format: str = "qcow2",
    created: float | None = None,
    progress: DiskProgress | None = None,
) -> AddedSnapshot:
    """Store ``disks`` (and ``config_files``, verbatim) as a new snapshot of VM ``vm_name``.

    Full snapshots are written as standalone images in ``format`` (qcow2 by default).
    ``incremental`` writes each disk as a qcow2 overlay holding only the clusters that differ
    from the same disk of the parent snapshot (``parent``, or the VM's newest snapshot),
    with a relative backing path; a disk the parent lacks is stored in full. The VM is
    created on its first snapshot. Raises ``SnapfsUserError`` for bad input and
    ``QemuImgError`` when qemu-img fails.
    """
    try:
        repo.read_marker(root)
    except RepositoryError as exc:
        raise SnapfsUserError(exc.message) from None
    if format not in qemu_img.FORMATS:
        raise SnapfsUserError(f"unknown format {format!r} (one of {', '.join(qemu_img.FORMATS)})")
    if not vm_name or "\0" in vm_name:
        raise SnapfsUserError("a VM name must be non-empty and contain no NUL")
    sources = _check_sources(disks, config_files)
    when = time.time() if created is None else created
    with _locked(root):
        vm = _find_vm(root, vm_name)
        parent_snap = _choose_parent(vm, vm_name, incremental, parent)
        snap_id = repo.snapshot_id(when, secrets.token_hex(3))
        snap_name = _unique_name(
            name, repo.default_snapshot_name(when), vm.snapshot_names if vm else frozenset()
        )
        if vm is None:
            vm_id = _new_vm_id(root, vm_name)
            work = root / repo.VMS_DIR / f"{repo.TEMP_PREFIX}{vm_id}-{secrets.token_hex(4)}"
            final = root / repo.VMS_DIR / vm_id
            snap_dir = work / repo.SNAPSHOTS_DIR / snap_id
        else:
            vm_id = vm.vm_id
            work = vm.vm_dir / repo.SNAPSHOTS_DIR / f"{repo.TEMP_PREFIX}{snap_id}"
            final = vm.vm_dir / repo.SNAPSHOTS_DIR / snap_id
            snap_dir = work
        try:
            if vm is None:
                work.mkdir()
                _dump_json(work / repo.VM_FILE, {"id": vm_id, "name": vm_name})
            (snap_dir / repo.DISKS_DIR).mkdir(parents=True)
            disk_entries = [
                _write_disk(snap_dir, source, format, parent_snap, progress) for source in sources
            ]
            config_entries = []
            for cfg in config_files:
                shutil.copyfile(cfg, snap_dir / cfg.name)
                config_entries.append(cfg.name)
            _dump_json(
                snap_dir / repo.SNAPSHOT_FILE,
                {
                    "id": snap_id,
                    "name": snap_name,
                    "created": repo.format_time(when),
                    "description": description,
                    "parent": parent_snap[1] if parent_snap else None,
                    "disks": disk_entries,
                    "config": config_entries,
                },
            )
            _fsync_tree(work)
            if final.exists():
                raise SnapfsUserError(f"{final}: already exists")
            work.rename(final)
            _fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return AddedSnapshot(
        vm_id=vm_id,
        snapshot_id=snap_id,
        name=snap_name,
        parent=parent_snap[1] if parent_snap else None,
        path=final if vm is not None else final / repo.SNAPSHOTS_DIR / snap_id,
    )


def _choose_parent(
    vm: _VmState | None, vm_name: str, incremental: bool, parent: str | None
) -> tuple[float, str, dict[str, _ParentDisk]] | None:
    if not incremental:
        if parent is not None:
            raise SnapfsUserError("a parent snapshot only makes sense with --incremental")
        return None
    if vm is None or not vm.snapshots:
        raise SnapfsUserError(
            f"VM {vm_name!r} has no snapshot to be incremental on; add a full one first"
        )
    if parent is None:
        return vm.snapshots[-1]
    for snap in vm.snapshots:
        if snap[1] == parent:
            return snap
    raise SnapfsUserError(f"VM {vm_name!r} has no readable snapshot with id {parent!r}")


def _write_disk(
    snap_dir: Path,
    source: DiskSource,
    format: str,
    parent_snap: tuple[float, str, dict[str, _ParentDisk]] | None,
    progress: DiskProgress | None,
) -> dict[str, str]:
    assert source.format is not None
    name = source.name

    def report(percent: float) -> None:
        if progress is not None:
            progress(name, percent)

    parent_disk = parent_snap[2].get(name) if parent_snap else None
    if parent_snap is not None and parent_disk is not None:
        rel = f"{repo.DISKS_DIR}/{name}.qcow2"
        # Relative to the overlay's directory (snap/disks/): up to the snapshots directory,
        # then into the parent. Work and final directories have the same depth, so the path
        # is right both before and after the rename, and after moving the repository.
        backing = f"../../{parent_snap[1]}/{parent_disk.file}"
        if not (snap_dir / repo.DISKS_DIR / backing).is_file():
            raise SnapfsUserError(
                f"parent image {snap_dir.parent / parent_snap[1] / parent_disk.file} is missing"
            )
        qemu_img.write_diff_overlay(
            source.image,
            snap_dir / rel,
            src_format=source.format,
            parent=backing,
            parent_format=parent_disk.format,
            progress=report,
        )
        report(100.0)
        return {"name": name, "file": rel, "format": "qcow2"}
    rel = f"{repo.DISKS_DIR}/{name}.{repo.EXTENSIONS[format]}"
    qemu_img.convert(
        source.image, snap_dir / rel, src_format=source.format, dst_format=format, progress=report
    )
    report(100.0)
    return {"name": name, "file": rel, "format": format}
