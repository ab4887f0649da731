"""Backups of running libvirt domains into a snapfs repository (``snapfs backup URI REPO``).

Owns one backup of one domain, ``DomainBackup``: plan (which disks, full or incremental on
which parent snapshot and checkpoint), begin the pull-mode job with a new checkpoint
(``jobs.PullJob``), copy what the job exports into new images, commit the snapshot.

What is copied:
- full: the ranges ``base:allocation`` reports as data, into a new qcow2 of the disk's
  virtual size (holes and zero ranges are not copied: the new image reads zeros there);
- incremental: the ranges ``qemu:dirty-bitmap:backup-<disk>`` marks dirty since the parent
  snapshot's checkpoint, into a qcow2 overlay on the parent's image (backing path
  ``../../<parent>/disks/<file>``, as ``writer.add_snapshot`` writes it); dirty ranges that
  now read as zeros are written as zeros (the parent may hold data there).
Each new image is served writable by a private ``qemu-nbd`` that libnbd starts by socket
activation and stops when the handle closes; the source is read with libnbd from the job's
unix socket (local daemon) or over TCP, with TLS by default (remote daemon: ``jobs``). The
copy is pipelined: up to ``COPY_DEPTH`` reads and writes of ``COPY_CHUNK`` bytes in flight,
both handles driven by one ``poll`` loop (libnbd AIO). The export is point-in-time: guest
writes after ``backupBegin`` are not in it.

Before planning, a backup sweeps what an earlier one that died (``kill -9``, a power cut)
left for this domain and repository, and says so: a stale job of a dead snapfs process is
ended (``jobs.end_stale_job``), unfinished ``.tmp-*`` snapshot directories are removed (the
repository lock is held: no writer is alive), and checkpoints snapfs made for this
repository that are not the base of the next backup are deleted with their bitmaps (a
checkpoint of a backup that never committed, or one superseded by a newer snapshot). Only
checkpoints whose description names this repository are touched: a domain backed up into
two repositories keeps both chains.

The repository side repeats ``writer.add_snapshot``'s atomicity (and uses its private
helpers for it: the lock, the VM lookup, ids and names, fsync): everything is written into a
``.tmp-*`` work directory at the final depth, fsynced, and renamed into place last. Any
failure or interrupt (Ctrl-C, libvirt gone, an NBD error, a full disk) removes the work
directory, ends the job (which removes libvirt's scratch files and socket), and deletes the
checkpoint created with it; the previous checkpoint stays, so the next run works. When
libvirt is gone (libvirtd killed: QEMU keeps serving the export, the copy completes), the
commit refuses: the job cannot be ended; the next run's sweep ends it and deletes the
checkpoint once libvirtd is back. ``OSError`` writing the repository (ENOSPC) is a
``BackupError``.

libvirt facts go into ``libvirt.json`` in the snapshot directory, which the repository
loader ignores: domain uuid and name, the checkpoint created with the backup (the base of
the next incremental one), and per disk the mode, virtual size and bytes copied. After a
commit the parent's checkpoint is deleted: only the newest is needed, and every checkpoint
keeps an active bitmap (write overhead in the guest).

Thread rules: blocking throughout (libvirt RPCs, NBD reads and writes, qemu-img); the CLI
runs it on its main thread, where Ctrl-C raises ``KeyboardInterrupt`` between NBD requests.
"""

from __future__ import annotations

import json
import logging
import secrets
import select
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import nbd

from snapfs.catalog import qemu_img, repo, writer
from snapfs.errors import SnapfsError, SnapfsUserError
from snapfs.libvirt import jobs
from snapfs.nbd.extents import ExtentMap, dirty_ranges, query_extents

log = logging.getLogger(__name__)

LIBVIRT_FILE = "libvirt.json"
CONFIG_FILE = "domain.xml"
# NBD requests of this size keep qemu busy without big buffers (the protocol allows 32 MiB;
# QEMU's export limit is 32 MiB too).
COPY_CHUNK = 4 << 20
# Requests in flight per disk (reads from the job plus writes into the new image): at most
# COPY_DEPTH * COPY_CHUNK bytes of buffers. Measured in docs/benchmarks.md ("backup copy").
COPY_DEPTH = 8
# The local qemu-nbd writing a new image: with "writeback" every flush is an fdatasync;
# the commit fsyncs every file of the snapshot anyway (writer._fsync_tree).
DEST_CACHE = "writeback"
# The copy loop wakes up at least this often (Ctrl-C is handled between waits anyway).
_POLL_MS = 1000

# A checkpoint's description: this prefix, the snapshot id, " into ", the repository path.
_DESCRIPTION_PREFIX = "snapfs backup "

Progress = Callable[[str, int, int], None]
"""Called with a disk name, bytes copied so far and bytes to copy in total for that disk."""
Notice = Callable[[str], None]
"""Called with a message for the user (a fallback to a full backup, a skipped disk)."""


class BackupError(SnapfsError):
    """A backup failed after it started (an NBD error, a write error)."""


@dataclass(frozen=True)
class DiskResult:
    name: str
    mode: str  # "full" or "incremental"
    file: str  # relative to the snapshot directory
    virtual_size: int
    to_copy: int  # bytes of data ranges read from the job's export
    to_zero: int  # bytes of dirty ranges that now read as zeros (incremental only)


@dataclass(frozen=True)
class BackupResult:
    vm_id: str
    snapshot_id: str
    name: str
    parent: str | None
    path: Path
    checkpoint: str
    disks: tuple[DiskResult, ...]
    skipped: tuple[tuple[str, str], ...]  # (disk, reason)


@dataclass
class _DiskPlan:
    target: str
    virtual_size: int
    parent_file: str | None = None  # relative to the parent's snapshot dir (incremental)
    parent_format: str = "qcow2"
    ranges: list[tuple[int, int, bool]] = field(default_factory=list)  # start, length, data

    @property
    def incremental(self) -> bool:
        return self.parent_file is not None

    @property
    def to_copy(self) -> int:
        return sum(n for _, n, data in self.ranges if data)

    @property
    def to_zero(self) -> int:
        return sum(n for _, n, data in self.ranges if not data)


@dataclass(frozen=True)
class _Parent:
    snapshot_id: str
    checkpoint: str
    disks: dict[str, tuple[str, str, int]]  # name → (file, format, virtual size)


def _close(h: Any) -> None:
    """Disconnect and close a libnbd handle now (its qemu-nbd child exits and is reaped).

    The binding closes in ``__del__`` only; a traceback holding the handle would keep a
    server alive, so close explicitly and drop the handle's capsule (``_o``)."""
    with suppress(nbd.Error):
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


def _read_libvirt_json(snap_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((snap_dir / LIBVIRT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DomainBackup:
    """One backup of one running domain into the repository at ``root``.

    Use as a context manager: ``__enter__`` locks the repository and plans; ``begin``
    starts the job; ``copy`` copies; ``commit`` puts the snapshot in place. Leaving the
    block without a commit (an exception, Ctrl-C) undoes everything. ``backup_domain``
    runs the whole sequence; tests call the steps to act between them.
    """

    def __init__(
        self,
        dom: Any,
        root: Path,
        *,
        mode: str = "auto",
        skip: frozenset[str] = frozenset(),
        notice: Notice | None = None,
        job_parent_dir: Path = Path("/tmp"),
        description: str = "",
        endpoint: jobs.TcpEndpoint | None = None,
    ) -> None:
        if mode not in ("auto", "full", "incremental"):
            raise ValueError(f"unknown backup mode {mode!r}")
        self.dom = dom
        self.root = root
        self.mode = mode
        self.skip = skip
        self.notice = notice or (lambda message: None)
        self.job_parent_dir = job_parent_dir
        self.description = description
        self.endpoint = endpoint  # a remote daemon: the job serves NBD over TCP
        self.job: jobs.PullJob | None = None
        self._lock: Any = None
        self._committed = False
        self._work: Path | None = None

    # -- context -----------------------------------------------------------------------
    def __enter__(self) -> DomainBackup:
        try:
            repo.read_marker(self.root)
        except SnapfsError as exc:
            raise SnapfsUserError(exc.message) from None
        jobs.check_running(self.dom)
        # The repository stays locked for the whole backup, as in writer.add_snapshot:
        # the parent cannot change under us, and concurrent adds wait.
        self._lock = writer._locked(self.root)
        self._lock.__enter__()
        try:
            self._plan()
            self._sweep()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                self._abandon()
        finally:
            self._lock.__exit__(None, None, None)

    def _say(self, message: str) -> None:
        log.info("%s", message)
        self.notice(message)

    # -- plan ----------------------------------------------------------------------------
    def _plan(self) -> None:
        dom = self.dom
        self.name = str(dom.name())
        self.uuid = jobs.domain_uuid(dom)
        disks = jobs.domain_disks(dom.XMLDesc(0), self.skip)
        unknown = self.skip - {d.target for d in disks}
        if unknown:
            raise SnapfsUserError(
                f"domain {self.name!r} has no disk {', '.join(sorted(unknown))} to skip"
            )
        self.included = [d for d in disks if d.backup]
        self.skipped = [(d.target, d.reason) for d in disks if not d.backup]
        for target, reason in self.skipped:
            self._say(f"{self.name}: disk {target} is not backed up ({reason})")
        if not self.included:
            raise SnapfsUserError(f"domain {self.name!r} has no disk to back up")
        for disk in self.included:
            if not repo.is_valid_disk_name(disk.target):
                raise SnapfsUserError(f"disk target {disk.target!r} cannot be a snapfs disk name")

        self.vm = writer._find_vm(self.root, self.name)
        self.parent = self._find_parent() if self.mode != "full" else None
        self.created = time.time()
        self.snapshot_id = repo.snapshot_id(self.created, secrets.token_hex(3))
        self.snapshot_name = writer._unique_name(
            None,
            repo.default_snapshot_name(self.created),
            self.vm.snapshot_names if self.vm else frozenset(),
        )
        self.checkpoint = f"{jobs.CHECKPOINT_PREFIX}{self.snapshot_id}"
        self.disks: list[_DiskPlan] = []
        for disk in self.included:
            size = int(dom.blockInfo(disk.target)[0])
            plan = _DiskPlan(disk.target, size)
            parent_disk = self.parent.disks.get(disk.target) if self.parent else None
            if self.parent and parent_disk is None:
                self._say(f"{self.name}: disk {disk.target} is new: backed up in full")
            elif self.parent and parent_disk and parent_disk[2] != size:
                self._say(
                    f"{self.name}: disk {disk.target} changed size "
                    f"({parent_disk[2]} → {size} bytes): backed up in full"
                )
            elif parent_disk is not None:
                plan.parent_file, plan.parent_format = parent_disk[0], parent_disk[1]
            self.disks.append(plan)

    def _find_parent(self) -> _Parent | None:
        """The newest snapshot of this domain made by a libvirt backup whose checkpoint still
        exists; None (with a message) when the next backup must be full."""
        vm = self.vm
        if vm is None or not vm.snapshots:
            if self.mode == "incremental":
                raise SnapfsUserError(
                    f"VM {self.name!r} has no snapshot in {self.root} to be incremental on; "
                    "the first backup is full (run without --incremental)"
                )
            self._say(f"{self.name}: first backup into this repository: full")
            return None
        snaps_dir = vm.vm_dir / repo.SNAPSHOTS_DIR
        for _created, snap_id, disks in reversed(vm.snapshots):
            facts = _read_libvirt_json(snaps_dir / snap_id)
            if facts is None:
                continue  # a snapshot added by hand: no checkpoint to continue from
            domain = facts.get("domain") or {}
            if domain.get("uuid") != self.uuid:
                self._say(
                    f"{self.name}: the last backup is of another domain with this name "
                    f"(uuid {domain.get('uuid')}): full backup"
                )
                return None
            checkpoint = facts.get("checkpoint")
            if not isinstance(checkpoint, str) or not jobs.checkpoint_exists(self.dom, checkpoint):
                self._say(
                    f"{self.name}: checkpoint {checkpoint} of the last backup ({snap_id}) is "
                    "gone: full backup"
                )
                return None
            sizes = {
                name: int(d.get("virtual_size", -1))
                for name, d in (facts.get("disks") or {}).items()
                if isinstance(d, dict)
            }
            usable = {}
            for name, pdisk in disks.items():
                image = snaps_dir / snap_id / pdisk.file
                if not image.is_file():
                    self._say(f"{self.name}: image {image} of the last backup is missing")
                    continue
                usable[name] = (pdisk.file, pdisk.format, sizes.get(name, -1))
            return _Parent(snap_id, checkpoint, usable)
        self._say(f"{self.name}: no earlier libvirt backup in this repository: full backup")
        return None

    # -- sweep ---------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Clean up after an earlier backup of this domain into this repository that died
        (see the module doc); every action is said."""
        stale = jobs.end_stale_job(self.dom)
        if stale is not None:
            self._say(f"{self.name}: {stale}")
        vms_dir = self.root / repo.VMS_DIR
        leftovers = list(vms_dir.glob(f"{repo.TEMP_PREFIX}*"))
        if self.vm is not None:
            leftovers += (self.vm.vm_dir / repo.SNAPSHOTS_DIR).glob(f"{repo.TEMP_PREFIX}*")
        for path in leftovers:
            # The repository lock is ours: whoever wrote this is gone.
            shutil.rmtree(path, ignore_errors=True)
            self._say(f"{self.name}: removed {path}, left by an interrupted backup")

        recorded: dict[str, str] = {}  # checkpoint → snapshot id, oldest first
        newest: str | None = None
        if self.vm is not None:
            snaps_dir = self.vm.vm_dir / repo.SNAPSHOTS_DIR
            for _created, snap_id, _disks in self.vm.snapshots:
                facts = _read_libvirt_json(snaps_dir / snap_id)
                if facts is None:
                    continue
                checkpoint = facts.get("checkpoint")
                if isinstance(checkpoint, str):
                    recorded[checkpoint] = snap_id
                    newest = checkpoint
        ours = f" into {self.root.resolve()}"
        for name, desc in jobs.snapfs_checkpoints(self.dom).items():
            if not (desc.startswith(_DESCRIPTION_PREFIX) and desc.endswith(ours)):
                continue  # another repository's chain (or not made by a backup)
            if name == newest:
                continue  # the base of the next incremental backup
            if name in recorded:
                why = f"superseded (snapshot {recorded[name]} is not the newest)"
            else:
                why = "made by a backup that never finished (no snapshot records it)"
            # Not METADATA_ONLY: libvirt also removes the checkpoint's bitmaps from the
            # qcow2 images (a left-over bitmap costs guest writes and blocks the name).
            jobs.delete_checkpoint(self.dom, name)
            if jobs.checkpoint_exists(self.dom, name):
                self._say(f"{self.name}: could not delete checkpoint {name} ({why})")
            else:
                self._say(f"{self.name}: deleted checkpoint {name}, {why}")

    # -- job -----------------------------------------------------------------------------
    def begin(self) -> jobs.PullJob:
        """Start the pull-mode job with the new checkpoint; an incremental job libvirt
        refuses (a bitmap missing or inconsistent in the image) is retried as full."""
        # The configuration at backup time: captured right before the job starts.
        self.domain_xml = self.dom.XMLDesc(0)
        excluded = [t for t, _ in self.skipped]
        description = f"{_DESCRIPTION_PREFIX}{self.snapshot_id} into {self.root.resolve()}"

        def start() -> jobs.PullJob:
            job_disks = [
                jobs.JobDisk(
                    d.target, self.parent.checkpoint if d.incremental and self.parent else None
                )
                for d in self.disks
            ]
            return jobs.PullJob.begin(
                self.dom,
                job_disks,
                excluded,
                checkpoint=self.checkpoint,
                checkpoint_description=description,
                parent_dir=self.job_parent_dir,
                endpoint=self.endpoint,
            )

        try:
            self.job = start()
        except jobs.LibvirtError as exc:
            if not any(d.incremental for d in self.disks):
                raise
            self._say(f"{self.name}: incremental backup refused ({exc.message}): full backup")
            for d in self.disks:
                d.parent_file = None
            self.job = start()
        return self.job

    # -- copy ----------------------------------------------------------------------------
    def _source(self, target: str, incremental: bool) -> Any:
        assert self.job is not None
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if incremental:
            h.add_meta_context(f"qemu:dirty-bitmap:{jobs.export_bitmap(target)}")
        try:
            # The export name is the URI's path; nbds:// requires TLS, with the client
            # certificate directory in the query (a local path: allowed explicitly).
            h.set_uri_allow_local_file(True)
            h.connect_uri(self.job.uri(target))
        except nbd.Error as exc:
            _close(h)
            raise BackupError(
                f"{self.name}: cannot read disk {target} from the job: {exc}"
            ) from None
        return h

    def _plan_ranges(self, plan: _DiskPlan, h: Any) -> None:
        size = h.get_size()
        if size != plan.virtual_size:
            raise BackupError(
                f"{self.name}: disk {plan.target} exports {size} bytes, libvirt said "
                f"{plan.virtual_size}"
            )
        allocation: ExtentMap = query_extents(h, size)
        if not plan.incremental:
            plan.ranges = [(s, e - s, True) for s, e in allocation.ranges()]
            return
        plan.ranges = []
        for start, length in dirty_ranges(h, size, jobs.export_bitmap(plan.target)):
            for seg in allocation.segments(start, length):
                plan.ranges.append((seg.start, seg.end - seg.start, seg.data))

    def copy(self, progress: Progress | None = None) -> None:
        """Copy every disk into the work directory (ranges known first: totals for bars)."""
        assert self.job is not None
        try:
            self._work, snap_dir = self._make_work_dir()
            disks_dir = snap_dir / repo.DISKS_DIR
            disks_dir.mkdir(parents=True)
        except OSError as exc:
            raise BackupError(f"{self.name}: cannot write into {self.root}: {exc}") from None
        sources = {}
        try:
            for plan in self.disks:
                sources[plan.target] = h = self._source(plan.target, plan.incremental)
                self._plan_ranges(plan, h)
                if progress is not None:
                    progress(plan.target, 0, plan.to_copy)
            for plan in self.disks:
                self._copy_disk(plan, sources[plan.target], disks_dir, progress)
        finally:
            for h in sources.values():
                _close(h)
        self._snap_dir = snap_dir

    def _copy_disk(
        self, plan: _DiskPlan, src: Any, disks_dir: Path, progress: Progress | None
    ) -> None:
        image = disks_dir / f"{plan.target}.qcow2"
        if plan.incremental:
            assert self.parent is not None and plan.parent_file is not None
            # Relative to the overlay's directory, as writer._write_disk writes it: right in
            # the work directory and after the rename (same depth), and after a move.
            backing = f"../../{self.parent.snapshot_id}/{plan.parent_file}"
            qemu_img.create_overlay(
                image, backing, backing_format=plan.parent_format, size=plan.virtual_size
            )
        else:
            qemu_img._run_checked(
                ["create", "-q", "-f", "qcow2", str(image), str(plan.virtual_size)],
                qemu_img.METADATA_TIMEOUT,
            )
        dst = nbd.NBD()
        try:
            dst.connect_systemd_socket_activation(
                ["qemu-nbd", "-f", "qcow2", f"--cache={DEST_CACHE}", "--aio=threads", str(image)]
            )

            def report(done: int) -> None:
                if progress is not None:
                    progress(plan.target, done, plan.to_copy)

            copy_ranges(src, dst, plan.ranges, report)
            dst.flush()
        except nbd.Error as exc:
            raise BackupError(f"{self.name}: copying disk {plan.target} failed: {exc}") from None
        finally:
            _close(dst)
        log.info(
            "%s: disk %s: %s, copied %d bytes, zeroed %d bytes",
            self.name,
            plan.target,
            "incremental" if plan.incremental else "full",
            plan.to_copy,
            plan.to_zero,
        )

    def _make_work_dir(self) -> tuple[Path, Path]:
        vms_dir = self.root / repo.VMS_DIR
        if self.vm is None:
            self.vm_id = writer._new_vm_id(self.root, self.name)
            work = vms_dir / f"{repo.TEMP_PREFIX}{self.vm_id}-{secrets.token_hex(4)}"
            self._final = vms_dir / self.vm_id
            snap_dir = work / repo.SNAPSHOTS_DIR / self.snapshot_id
            self._work = work  # removed by _abandon from here on
            snap_dir.mkdir(parents=True)
            writer._dump_json(work / repo.VM_FILE, {"id": self.vm_id, "name": self.name})
        else:
            self.vm_id = self.vm.vm_id
            work = self.vm.vm_dir / repo.SNAPSHOTS_DIR / f"{repo.TEMP_PREFIX}{self.snapshot_id}"
            self._final = self.vm.vm_dir / repo.SNAPSHOTS_DIR / self.snapshot_id
            snap_dir = work
            self._work = work
            snap_dir.mkdir()
        return work, snap_dir

    # -- commit / abandon ----------------------------------------------------------------
    def commit(self) -> BackupResult:
        """End the job, write the metadata and rename the snapshot into place."""
        assert self.job is not None and self._work is not None
        lost = jobs.lost_connection(self.dom)
        if lost is not None:
            # The copy is complete (QEMU serves the export without libvirtd), but the job
            # cannot be ended nor the checkpoint trusted: fail; the next run sweeps both.
            raise BackupError(
                f"{self.name}: lost the connection to libvirt ({lost}): the backup job cannot "
                "be ended; nothing was added (the next backup ends the job and deletes its "
                "checkpoint)"
            )
        self.job.end()
        try:
            return self._write_and_rename()
        except OSError as exc:
            raise BackupError(
                f"{self.name}: writing the snapshot into {self.root} failed: {exc}"
            ) from None

    def _write_and_rename(self) -> BackupResult:
        assert self._work is not None
        snap_dir = self._snap_dir
        (snap_dir / CONFIG_FILE).write_text(self.domain_xml, encoding="utf-8")
        parent_id = (
            self.parent.snapshot_id
            if self.parent and any(d.incremental for d in self.disks)
            else None
        )
        results = tuple(
            DiskResult(
                d.target,
                "incremental" if d.incremental else "full",
                f"{repo.DISKS_DIR}/{d.target}.qcow2",
                d.virtual_size,
                d.to_copy,
                d.to_zero,
            )
            for d in self.disks
        )
        writer._dump_json(
            snap_dir / LIBVIRT_FILE,
            {
                "domain": {"name": self.name, "uuid": self.uuid},
                "checkpoint": self.checkpoint,
                "incremental_from": self.parent.checkpoint if parent_id and self.parent else None,
                "disks": {
                    r.name: {
                        "mode": r.mode,
                        "virtual_size": r.virtual_size,
                        "copied_bytes": r.to_copy,
                        "zeroed_bytes": r.to_zero,
                        "bitmap": self.checkpoint,
                    }
                    for r in results
                },
                "skipped": dict(self.skipped),
            },
        )
        writer._dump_json(
            snap_dir / repo.SNAPSHOT_FILE,
            {
                "id": self.snapshot_id,
                "name": self.snapshot_name,
                "created": repo.format_time(self.created),
                "description": self.description,
                "parent": parent_id,
                "disks": [{"name": r.name, "file": r.file, "format": "qcow2"} for r in results],
                "config": [CONFIG_FILE],
            },
        )
        writer._fsync_tree(self._work)
        if self._final.exists():
            raise SnapfsUserError(f"{self._final}: already exists")
        self._work.rename(self._final)
        writer._fsync_path(self._final.parent)
        self._committed = True
        if self.parent is not None and self.parent.checkpoint != self.checkpoint:
            # The new checkpoint is the base of the next incremental backup.
            jobs.delete_checkpoint(self.dom, self.parent.checkpoint)
        path = (
            self._final
            if self.vm is not None
            else self._final / repo.SNAPSHOTS_DIR / self.snapshot_id
        )
        return BackupResult(
            vm_id=self.vm_id,
            snapshot_id=self.snapshot_id,
            name=self.snapshot_name,
            parent=parent_id,
            path=path,
            checkpoint=self.checkpoint,
            disks=results,
            skipped=tuple(self.skipped),
        )

    def _abandon(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
        if self.job is not None:
            if self.job.ended:
                jobs.delete_checkpoint(self.dom, self.checkpoint)
            else:
                self.job.end(failed=True)
            log.info("%s: backup abandoned; nothing was added to %s", self.name, self.root)


def copy_ranges(
    src: Any, dst: Any, ranges: Iterable[tuple[int, int, bool]], report: Callable[[int], None]
) -> None:
    """Copy the data ranges from ``src`` to ``dst`` (connected libnbd handles) and zero the
    others, in ``COPY_CHUNK`` requests with up to ``COPY_DEPTH`` in flight; ``report`` gets
    the bytes copied so far after each write completes (in this thread, so it may raise:
    Ctrl-C from a progress bar). Raises ``nbd.Error`` when a request fails."""

    def chunks() -> Iterator[tuple[int, int, bool]]:
        for start, length, data in ranges:
            end = start + length
            for pos in range(start, end, COPY_CHUNK):
                yield pos, min(COPY_CHUNK, end - pos), data

    todo = chunks()
    exhausted = False
    reads: list[tuple[int, int, Any]] = []  # (cookie, offset, buffer)
    writes: list[tuple[int, int]] = []  # (cookie, data bytes: 0 for a zero request)
    keep: dict[int, Any] = {}  # write cookie → its buffer (valid until the write completes)
    done = 0
    while True:
        while not exhausted and len(reads) + len(writes) < COPY_DEPTH:
            item = next(todo, None)
            if item is None:
                exhausted = True
                break
            pos, n, data = item
            if data:
                buf = nbd.Buffer(n)
                reads.append((src.aio_pread(buf, pos), pos, buf))
            else:
                writes.append((dst.aio_zero(n, pos), 0))
        if exhausted and not reads and not writes:
            return
        _wait(src, dst)
        still: list[tuple[int, int, Any]] = []
        for cookie, pos, buf in reads:
            if src.aio_command_completed(cookie):  # raises nbd.Error if it failed
                w = dst.aio_pwrite(buf, pos)
                keep[w] = buf
                writes.append((w, len(buf)))
            else:
                still.append((cookie, pos, buf))
        reads = still
        pending: list[tuple[int, int]] = []
        for cookie, n in writes:
            if dst.aio_command_completed(cookie):
                keep.pop(cookie, None)
                if n:
                    done += n
                    report(done)
            else:
                pending.append((cookie, n))
        writes = pending


def _wait(*handles: Any) -> None:
    """Wait until one of the handles' sockets is ready and move its state machine."""
    poller = select.poll()
    by_fd = {}
    for h in handles:
        direction = h.aio_get_direction()
        events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | (
            select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
        )
        if events:
            fd = h.aio_get_fd()
            poller.register(fd, events)
            by_fd[fd] = h
        elif h.aio_is_dead() or h.aio_is_closed():
            raise nbd.Error("NBD connection lost", 107)  # ENOTCONN
    if not by_fd:
        return
    for fd, revents in poller.poll(_POLL_MS):
        h = by_fd[fd]
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        elif revents & select.POLLOUT:
            h.aio_notify_write()


def backup_domain(
    dom: Any,
    root: Path,
    *,
    mode: str = "auto",
    skip: frozenset[str] = frozenset(),
    progress: Progress | None = None,
    notice: Notice | None = None,
    job_parent_dir: Path = Path("/tmp"),
    endpoint: jobs.TcpEndpoint | None = None,
) -> BackupResult:
    """Back up one running domain into the repository at ``root`` (see the module doc);
    ``endpoint`` for a remote daemon (``jobs.remote_endpoint``)."""
    with DomainBackup(
        dom,
        root,
        mode=mode,
        skip=skip,
        notice=notice,
        job_parent_dir=job_parent_dir,
        endpoint=endpoint,
    ) as backup:
        backup.begin()
        backup.copy(progress)
        return backup.commit()


@contextmanager
def connection(uri: str) -> Iterator[Any]:
    """A libvirt connection for a backup (closed on exit)."""
    conn = jobs.open_connection(uri)
    try:
        yield conn
    finally:
        with suppress(Exception):
            conn.close()
