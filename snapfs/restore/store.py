"""Restore disks in a repository: create, list, remove, export and commit them.

This module owns ``REPO/restore/`` (layout in docs/restore.md): one directory per restore
disk holding ``restore.json`` and ``disk.qcow2``, either a copy-on-write overlay on a
snapshot disk (relative backing path, so the repository can move) or a standalone empty
qcow2. It also owns the ``mkdir`` naming convention (``spec_from_dirname``) and the check
that no snapfs mount of the repository is active (parsed from ``/proc/self/mounts``).

Everything is blocking (qemu-img runs, fsync): the mount calls these functions from worker
threads. Changes to ``restore/`` are serialised with the same ``flock`` on the repository
marker that ``catalog.writer`` takes, and creation is atomic (a dot-prefixed work directory
renamed into place), so a reader never sees half a restore disk.

Errors the user can fix raise ``RestoreError`` (a ``SnapfsUserError`` that also carries the
errno the mount should answer, e.g. EEXIST for a name in use); qemu-img failures raise
``QemuImgError``.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapfs.catalog import qemu_img, repo, writer
from snapfs.catalog.model import Problem
from snapfs.errors import RepositoryError, SnapfsUserError
from snapfs.restore.model import CreateSpec, RestoreDisk, RestoreSource

RESTORE_DIR = "restore"
RESTORE_FILE = "restore.json"
IMAGE_FILE = "disk.qcow2"
# Names become directory names (255 bytes on most filesystems); 200 leaves room for the
# work-directory prefix and suffix used while creating.
NAME_MAX_BYTES = 200
# What ``/proc/self/mounts`` calls a snapfs mount, and the fsname prefix mount.py sets.
FUSE_TYPE = "fuse.snapfs"
FSNAME_PREFIX = "snapfs:"
LATEST = "latest"

Progress = Callable[[str, float], None]
"""Called with a phase ("export", "verify", or a disk name for commit) and a percentage."""

_MOUNTS_FILE = Path("/proc/self/mounts")
_SIZE_RE = re.compile(r"^(\d+)\s*([kmgtp]?)(i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# qcow2 images are sized in whole 512-byte sectors; qemu-img rounds up the same way.
_SECTOR = 512
# qemu refuses qcow2 images larger than this (QCOW_MAX_L1_SIZE limits; 2**63 overflows).
_MAX_SIZE = 1 << 55

MKDIR_CONVENTION = (
    "name a new restore directory VM@SNAPSHOT@DISK (a copy-on-write restore disk of that "
    "snapshot disk; SNAPSHOT may be 'latest') or NAME@SIZE (an empty disk, SIZE like 10G, "
    "512M or 1073741824)"
)


class RestoreError(SnapfsUserError):
    """A restore request the user can fix; ``errno`` is what the mount answers with."""

    def __init__(self, message: str, errno: int = errno_mod.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


# --- names, sizes and the mkdir convention ------------------------------------------------


def validate_name(name: str) -> None:
    """Raise ``RestoreError`` (EINVAL) unless ``name`` can name a restore disk."""
    if not name:
        raise RestoreError("a restore disk name must not be empty")
    if "/" in name or "\0" in name:
        raise RestoreError(f"restore disk name {name!r} must not contain '/' or NUL")
    if name in (".", "..") or name.startswith("."):
        raise RestoreError(f"restore disk name {name!r} must not start with '.'")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise RestoreError(
            f"restore disk name is longer than {NAME_MAX_BYTES} bytes", errno_mod.ENAMETOOLONG
        )


def parse_size(text: str) -> int:
    """Bytes from ``10G``, ``512M``, ``64KiB``, ``1073741824`` (binary units, like qemu-img),
    rounded up to whole 512-byte sectors."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise RestoreError(f"bad size {text!r}: use a number of bytes or K, M, G, T (like 10G)")
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise RestoreError(f"bad size {text!r}: must be more than 0")
    if size > _MAX_SIZE:
        raise RestoreError(f"bad size {text!r}: larger than qcow2 allows")
    return -(-size // _SECTOR) * _SECTOR


def spec_from_dirname(dirname: str) -> CreateSpec:
    """What ``mkdir MOUNT/restore/<dirname>`` asks for (see ``MKDIR_CONVENTION``).

    The restore disk is named ``dirname`` itself: the kernel creates the entry under the
    name given to mkdir, so the new directory must be listed under exactly that name.
    """
    validate_name(dirname)
    parts = dirname.split("@")
    if len(parts) == 3 and all(parts):
        vm, snapshot, disk = parts
        return CreateSpec(name=dirname, vm=vm, snapshot=snapshot, disk=disk)
    if len(parts) == 2 and all(parts):
        try:
            size = parse_size(parts[1])
        except RestoreError as exc:
            raise RestoreError(f"{dirname!r}: {exc}; {MKDIR_CONVENTION}") from None
        return CreateSpec(name=dirname, size=size)
    raise RestoreError(f"{dirname!r}: {MKDIR_CONVENTION}")


# --- mounts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapfsMount:
    """One snapfs mount from ``/proc/self/mounts``: what it serves and where."""

    source: str  # as in the fsname after "snapfs:", e.g. the repository path
    mountpoint: Path


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def snapfs_mounts(text: str | None = None) -> list[SnapfsMount]:
    """The snapfs mounts in ``text`` (default: this process's ``/proc/self/mounts``)."""
    if text is None:
        try:
            text = _MOUNTS_FILE.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[2] != FUSE_TYPE:
            continue
        fsname = _unescape(fields[0])
        if fsname.startswith(FSNAME_PREFIX):
            found.append(SnapfsMount(fsname[len(FSNAME_PREFIX) :], Path(_unescape(fields[1]))))
    return found


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def mounts_of_repository(root: Path, text: str | None = None) -> list[Path]:
    """Mountpoints of active snapfs mounts serving the repository at ``root``."""
    return [m.mountpoint for m in snapfs_mounts(text) if _same_path(Path(m.source), root)]


def repository_of_mount(path: Path, text: str | None = None) -> Path | None:
    """The repository a snapfs mountpoint ``path`` serves, or None if it is not one."""
    for mount in snapfs_mounts(text):
        if _same_path(mount.mountpoint, path) or str(mount.mountpoint) == os.path.abspath(path):
            return Path(mount.source)
    return None


def ensure_not_mounted(root: Path, action: str, text: str | None = None) -> None:
    """Refuse ``action`` while a snapfs mount serves ``root`` (it may hold the image open)."""
    active = mounts_of_repository(root, text)
    if active:
        where = ", ".join(str(p) for p in active)
        raise RestoreError(
            f"cannot {action}: the repository is mounted at {where} "
            "(unmount it first, or use --force)",
            errno_mod.EBUSY,
        )


# --- reading ------------------------------------------------------------------------------


def _restore_root(root: Path) -> Path:
    return root / RESTORE_DIR


def _check_repository(root: Path) -> None:
    try:
        repo.read_marker(root)
    except RepositoryError as exc:
        raise RestoreError(exc.message, errno_mod.ENOENT) from None


def _source_from_json(value: Any) -> RestoreSource | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("field 'source' must be an object or null")
    fields = {}
    for key in ("vm_id", "vm_name", "snapshot_id", "snapshot_name", "disk"):
        item = value.get(key)
        if not isinstance(item, str) or not item:
            raise ValueError(f"field 'source.{key}' must be a non-empty string")
        fields[key] = item
    return RestoreSource(**fields)


def _load_one(directory: Path) -> RestoreDisk:
    """The restore disk in ``directory``; broken ones come back with ``error`` set."""
    name = directory.name
    image = directory / IMAGE_FILE
    created = 0.0
    source = None
    size = 0
    try:
        data = json.loads((directory / RESTORE_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("the top level must be a JSON object")
        created = repo.parse_time(str(data.get("created")))
        source = _source_from_json(data.get("source"))
        size = int(data.get("virtual_size") or 0)
    except FileNotFoundError:
        return RestoreDisk(name, image, 0, 0.0, error=f"{RESTORE_FILE}: file is missing")
    except (OSError, ValueError) as exc:
        return RestoreDisk(name, image, 0, 0.0, error=f"{RESTORE_FILE}: {exc}")
    if not image.is_file():
        return RestoreDisk(name, image, size, created, source, error=f"{IMAGE_FILE}: missing")
    try:
        # The whole chain is opened, so a restore disk whose snapshot was deleted is broken.
        chain = qemu_img.info(image, "qcow2", chain=True)
    except qemu_img.QemuImgError as exc:
        return RestoreDisk(name, image, size, created, source, error=f"{IMAGE_FILE}: {exc}")
    return RestoreDisk(name, image, chain[0].virtual_size, created, source)


def list_restores(root: Path) -> tuple[list[RestoreDisk], list[Problem]]:
    """Every restore disk of the repository, by name; broken ones with ``error`` set (and
    a problem naming the file). Dot entries (creations in progress) are skipped."""
    _check_repository(root)
    top = _restore_root(root)
    if not top.is_dir():
        return [], []
    disks: list[RestoreDisk] = []
    problems: list[Problem] = []
    for entry in sorted(top.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            problems.append(Problem(str(entry), "unexpected file (not a directory); ignored"))
            continue
        disk = _load_one(entry.absolute())
        if disk.error is not None:
            problems.append(Problem(str(entry), disk.error))
        disks.append(disk)
    return disks, problems


def get_restore(root: Path, name: str) -> RestoreDisk:
    """The restore disk ``name``; ``RestoreError`` (ENOENT) if there is none."""
    _check_repository(root)
    validate_name(name)
    directory = _restore_root(root) / name
    if not directory.is_dir():
        raise RestoreError(f"no restore disk named {name!r} in {root}", errno_mod.ENOENT)
    return _load_one(directory.absolute())


def _usable(root: Path, name: str) -> RestoreDisk:
    disk = get_restore(root, name)
    if disk.error is not None:
        raise RestoreError(f"restore disk {name!r} is broken: {disk.error}", errno_mod.EIO)
    return disk


# --- resolving VM, snapshot and disk from metadata alone -----------------------------------


@dataclass(frozen=True)
class SnapshotDisk:
    """A snapshot disk found from the repository's JSON files (no image probed)."""

    vm_id: str
    vm_name: str
    snapshot_id: str
    snapshot_name: str
    disk: str
    file: str  # relative to the snapshot directory
    format: str
    snapshot_dir: Path
    config_files: tuple[Path, ...]

    @property
    def path(self) -> Path:
        return self.snapshot_dir / self.file


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pick(what: str, wanted: str, candidates: list[tuple[str, str, Path]]) -> tuple[str, str, Path]:
    """The candidate (id, name, dir) whose id is ``wanted``, else whose name is ``wanted``."""
    by_id = [c for c in candidates if c[0] == wanted]
    if by_id:
        return by_id[0]
    by_name = [c for c in candidates if c[1] == wanted]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        ids = ", ".join(c[0] for c in by_name)
        raise RestoreError(f"{what} name {wanted!r} is ambiguous (ids {ids}); use an id")
    raise RestoreError(f"no {what} named {wanted!r}", errno_mod.ENOENT)


def _vms(root: Path) -> list[tuple[str, str, Path]]:
    vms_dir = root / repo.VMS_DIR
    found = []
    for vm_dir in sorted(vms_dir.iterdir()) if vms_dir.is_dir() else []:
        if vm_dir.name.startswith(".") or not vm_dir.is_dir():
            continue
        data = _read_json(vm_dir / repo.VM_FILE) or {}
        name = data.get("name")
        found.append((vm_dir.name, name if isinstance(name, str) else vm_dir.name, vm_dir))
    return found


def _snapshots(vm_dir: Path) -> list[tuple[float, str, str, Path, dict[str, Any]]]:
    """(created, id, name, dir, snapshot.json) of the VM's readable snapshots, oldest first."""
    snaps = []
    snap_root = vm_dir / repo.SNAPSHOTS_DIR
    for snap_dir in sorted(snap_root.iterdir()) if snap_root.is_dir() else []:
        if snap_dir.name.startswith(".") or not snap_dir.is_dir():
            continue
        data = _read_json(snap_dir / repo.SNAPSHOT_FILE)
        if data is None:
            continue
        try:
            created = repo.parse_time(str(data.get("created")))
        except ValueError:
            continue
        name = data.get("name")
        snaps.append(
            (
                created,
                snap_dir.name,
                name if isinstance(name, str) else snap_dir.name,
                snap_dir,
                data,
            )
        )
    snaps.sort(key=lambda s: (s[0], s[1]))
    return snaps


def find_snapshot_disk(root: Path, vm: str, snapshot: str, disk: str) -> SnapshotDisk:
    """Resolve VM (name or id), snapshot (name, id or ``latest``) and disk name."""
    vm_id, vm_name, vm_dir = _pick("VM", vm, _vms(root))
    snaps = _snapshots(vm_dir)
    if not snaps:
        raise RestoreError(f"VM {vm_name!r} has no readable snapshot", errno_mod.ENOENT)
    if snapshot == LATEST:
        _, snap_id, snap_name, snap_dir, data = snaps[-1]
    else:
        by_key = {s[1]: s for s in snaps}
        snap_id, snap_name, snap_dir = _pick(
            f"snapshot of VM {vm_name!r}", snapshot, [(s[1], s[2], s[3]) for s in snaps]
        )
        data = by_key[snap_id][4]
    for entry in data.get("disks") or []:
        if isinstance(entry, dict) and entry.get("name") == disk:
            file, fmt = entry.get("file"), entry.get("format")
            if not isinstance(file, str) or fmt not in qemu_img.FORMATS:
                break
            configs = tuple(snap_dir / c for c in data.get("config") or [] if isinstance(c, str))
            return SnapshotDisk(
                vm_id, vm_name, snap_id, snap_name, disk, file, str(fmt), snap_dir, configs
            )
    names = ", ".join(str(e.get("name")) for e in data.get("disks") or [] if isinstance(e, dict))
    raise RestoreError(
        f"snapshot {snap_name!r} of VM {vm_name!r} has no usable disk {disk!r} "
        f"(disks: {names or 'none'})",
        errno_mod.ENOENT,
    )


def source_snapshot_disk(root: Path, disk: RestoreDisk) -> SnapshotDisk | None:
    """The snapshot disk a copy-on-write restore disk was made from (None for empty ones)."""
    if disk.source is None:
        return None
    src = disk.source
    return find_snapshot_disk(root, src.vm_id, src.snapshot_id, src.disk)


# --- creating -----------------------------------------------------------------------------


# The writer's lock (one change to the repository at a time) and its fsync helper.
_locked = writer._locked
_fsync = writer._fsync_path


def _default_name(top: Path, base: str) -> str:
    base = base.replace("/", "_").replace("\0", "_").lstrip(".") or "restore"
    base = base.encode("utf-8", "surrogateescape")[: NAME_MAX_BYTES - 8].decode("utf-8", "ignore")
    name, n = base, 1
    while (top / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def create_restore(root: Path, spec: CreateSpec) -> RestoreDisk:
    """Create a restore disk: a copy-on-write overlay on the snapshot disk ``spec.vm`` /
    ``spec.snapshot`` (default latest) / ``spec.disk``, or an empty one of ``spec.size``.

    An empty ``spec.name`` derives one (``VM@SNAPSHOT@DISK`` with the resolved names, or
    ``empty``; ``-2``, ``-3`` ... when taken). Nothing is copied: the overlay's backing file
    is the snapshot image, written as a path relative to the overlay.
    """
    _check_repository(root)
    from_snapshot = spec.vm is not None or spec.disk is not None or spec.snapshot is not None
    if from_snapshot and spec.size is not None:
        raise RestoreError("give either a snapshot disk (VM, snapshot, disk) or a size, not both")
    if not from_snapshot and spec.size is None:
        raise RestoreError("give a snapshot disk (VM, snapshot, disk) or a size")
    if from_snapshot and (spec.vm is None or spec.disk is None):
        raise RestoreError("a restore disk from a snapshot needs the VM and the disk name")
    if spec.name:
        validate_name(spec.name)
    source: SnapshotDisk | None = None
    if from_snapshot:
        assert spec.vm is not None and spec.disk is not None
        source = find_snapshot_disk(root, spec.vm, spec.snapshot or LATEST, spec.disk)
        if not source.path.is_file():
            raise RestoreError(f"{source.path}: image file is missing", errno_mod.EIO)
        size = qemu_img.info(source.path, source.format, chain=False)[0].virtual_size
    else:
        assert spec.size is not None
        size = -(-spec.size // _SECTOR) * _SECTOR
        if size <= 0:
            raise RestoreError("the size of an empty restore disk must be more than 0")
    top = _restore_root(root)
    with _locked(root):
        top.mkdir(exist_ok=True)
        if spec.name:
            name = spec.name
            if (top / name).exists():
                raise RestoreError(f"a restore disk named {name!r} exists", errno_mod.EEXIST)
        elif source is not None:
            name = _default_name(top, f"{source.vm_name}@{source.snapshot_name}@{source.disk}")
        else:
            name = _default_name(top, "empty")
        # The work directory sits next to the final one (same depth), so the relative
        # backing path is right both before and after the rename.
        work = top / f"{repo.TEMP_PREFIX}{secrets.token_hex(4)}"
        final = top / name
        when = time.time()
        try:
            work.mkdir()
            image = work / IMAGE_FILE
            if source is not None:
                backing = (
                    f"../../{repo.VMS_DIR}/{source.vm_id}/{repo.SNAPSHOTS_DIR}/"
                    f"{source.snapshot_id}/{source.file}"
                )
                qemu_img.create_overlay(image, backing, backing_format=source.format)
            else:
                _create_empty(image, size)
            size = qemu_img.info(image, "qcow2", chain=False)[0].virtual_size
            record = {
                "name": name,
                "created": repo.format_time(when),
                "source": None
                if source is None
                else {
                    "vm_id": source.vm_id,
                    "vm_name": source.vm_name,
                    "snapshot_id": source.snapshot_id,
                    "snapshot_name": source.snapshot_name,
                    "disk": source.disk,
                },
                "virtual_size": size,
                "format": "qcow2",
            }
            with open(work / RESTORE_FILE, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync(image)
            _fsync(work)
            work.rename(final)
            _fsync(top)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return get_restore(root, name)


def _create_empty(image: Path, size: int) -> None:
    # qemu_img has no public "create without backing file" wrapper yet; this reuses its
    # runner so the error message and timeout handling stay the same.
    qemu_img._run_checked(
        ["create", "-q", "-f", "qcow2", str(image), str(size)], qemu_img.METADATA_TIMEOUT
    )


# --- removing -----------------------------------------------------------------------------


def remove_restore(root: Path, name: str, *, force: bool = False) -> None:
    """Delete the restore disk ``name`` and its data.

    Refused (EBUSY) while a snapfs mount serves the repository, since it may have the image
    open for writing, unless ``force`` (the mount itself passes it after stopping its own
    server for that disk).
    """
    _check_repository(root)
    validate_name(name)
    if not force:
        ensure_not_mounted(root, f"remove restore disk {name!r}")
    top = _restore_root(root)
    directory = top / name
    with _locked(root):
        if not directory.is_dir():
            raise RestoreError(f"no restore disk named {name!r} in {root}", errno_mod.ENOENT)
        # Renamed out of sight first, so a crash mid-delete leaves an invisible dot entry
        # rather than a half-deleted restore disk.
        trash = top / f"{repo.TEMP_PREFIX}rm-{secrets.token_hex(4)}"
        directory.rename(trash)
        _fsync(top)
    shutil.rmtree(trash, ignore_errors=True)


# --- exporting ----------------------------------------------------------------------------


def export_restore(
    root: Path,
    name: str,
    out: Path,
    fmt: str,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write restore disk ``name`` as a standalone ``fmt`` image ``out``, then verify it.

    ``qemu-img convert`` skips zero blocks, so the output is sparse (holes in raw, unallocated
    clusters elsewhere). The copy goes to a temporary file next to ``out``; only after
    ``qemu-img compare`` finds it reads the same as the restore disk is it renamed to ``out``.
    """
    if fmt not in qemu_img.FORMATS:
        raise RestoreError(f"unknown format {fmt!r} (one of {', '.join(qemu_img.FORMATS)})")
    disk = _usable(root, name)
    out = out.absolute()
    if out.exists() and not overwrite:
        raise RestoreError(f"{out}: already exists", errno_mod.EEXIST)
    if not out.parent.is_dir():
        raise RestoreError(f"{out.parent}: no such directory", errno_mod.ENOENT)
    tmp = out.parent / f".{out.name}.snapfs-{secrets.token_hex(4)}"

    def report(phase: str) -> Callable[[float], None]:
        return lambda percent: progress(phase, percent) if progress is not None else None

    try:
        qemu_img.convert(
            disk.path, tmp, src_format="qcow2", dst_format=fmt, progress=report("export")
        )
        report("export")(100.0)
        report("verify")(0.0)
        if not qemu_img.compare(disk.path, tmp, a_format="qcow2", b_format=fmt):
            raise qemu_img.QemuImgError(
                f"verification failed: the {fmt} copy does not read like restore disk {name!r}"
            )
        report("verify")(100.0)
        _fsync(tmp)
        tmp.replace(out)
        _fsync(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- committing ---------------------------------------------------------------------------


def commit_restore(
    root: Path,
    name: str,
    vm: str,
    *,
    description: str = "",
    disk_name: str | None = None,
    progress: Progress | None = None,
) -> writer.AddedSnapshot:
    """Add restore disk ``name`` to the repository as a new snapshot of VM ``vm``.

    When the VM has snapshots the new one is incremental: its disk is a qcow2 overlay holding
    only the clusters that differ from the parent, which is the restore disk's source
    snapshot when it belongs to this VM (the smallest difference), else the newest one. A
    new VM gets a full snapshot. The disk is named ``disk_name`` (default: the source's disk
    name, or ``vda``); the source snapshot's captured configuration is copied along, so the
    new snapshot can be restored as a VM too. The restore disk itself is kept.
    """
    disk = _usable(root, name)
    source = source_snapshot_disk(root, disk)
    target = disk_name or (disk.source.disk if disk.source else "vda")
    if not repo.is_valid_disk_name(target):
        raise RestoreError(f"disk name {target!r} must be letters, digits, '.', '_' or '-'")
    vm_name, has_snapshots, parent = vm, False, None
    try:
        vm_id, vm_name, vm_dir = _pick("VM", vm, _vms(root))
    except RestoreError as exc:
        if exc.errno != errno_mod.ENOENT:
            raise
    else:
        snaps = _snapshots(vm_dir)
        has_snapshots = bool(snaps)
        if source is not None and source.vm_id == vm_id and source.disk == target:
            parent = source.snapshot_id
    added = writer.add_snapshot(
        root,
        vm_name,
        [writer.DiskSource(target, disk.path, "qcow2")],
        config_files=[c for c in (source.config_files if source else ()) if c.is_file()],
        incremental=has_snapshots,
        parent=parent,
        description=description or f"committed from restore disk {name!r}",
        progress=progress,
    )
    return added
