"""The mount's writable part: ``restore/`` and the restore disks in it (docs/restore.md).

Owns the nodes: ``RestoreRoot`` (lists ``REPO/restore/`` and creates restore disks on
``mkdir``), ``RestoreDir`` (one restore disk: ``disk.img``, ``restore.json``), and
``RestoreDiskFile`` (the raw disk, read and written through a writable NBD export).
Restore disks change, so their entries and attributes are cached for one second only and
their pages are not kept across opens.

Consistency guard: a restore disk is either written as a raw disk (``disk.img`` open for
writing) or mounted read-write by a guest appliance (``files/``), never both at once;
``RestoreState`` counts both and the loser gets EBUSY.

Thread rules: on the trio loop; the store's blocking calls run in worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from snapfs.errors import ReadOnly, SnapfsError, SnapfsUserError
from snapfs.nbd.export import DiskExport
from snapfs.restore import store
from snapfs.restore.model import RestoreDisk

if TYPE_CHECKING:
    from snapfs.restore_guest_vfs import RestoreGuests
from snapfs.vfs import (
    AttrChanges,
    Attrs,
    BytesFile,
    Caller,
    Dir,
    File,
    Node,
    OpenFile,
    Tree,
)

log = logging.getLogger(__name__)

# Restore disks are created and removed while mounted: short kernel caching.
RESTORE_TTL_S = 1.0
# Listing REPO/restore/ again at most this often (each listing reads every restore.json).
RELIST_INTERVAL_S = 1.0

RESTORE_DIR = b"restore"
DISK_FILE = b"disk.img"
META_FILE = "restore.json"


class RestoreState:
    """Who uses a restore disk now: raw writers, or a read-write guest appliance."""

    def __init__(self) -> None:
        self.raw_writers = 0
        self.guest_rw = False

    def begin_raw_write(self, name: str) -> None:
        if self.guest_rw:
            raise SnapfsError(
                f"restore disk {name}: its guest filesystems are mounted read-write; "
                "disk.img is read-only until they are released",
                errno=errno.EBUSY,
            )
        self.raw_writers += 1

    def end_raw_write(self) -> None:
        self.raw_writers = max(0, self.raw_writers - 1)

    def begin_guest_rw(self, name: str) -> None:
        if self.raw_writers:
            raise SnapfsError(
                f"restore disk {name}: disk.img is open for writing; its guest filesystems "
                "cannot be mounted read-write until it is closed",
                errno=errno.EBUSY,
            )
        self.guest_rw = True

    def end_guest_rw(self) -> None:
        self.guest_rw = False


class _RestoreDiskHandle(OpenFile):
    keep_cache = False  # the disk changes under the page cache (guest writes, other opens)

    def __init__(self, node: RestoreDiskFile, export: DiskExport, writable: bool) -> None:
        self._node = node
        self._export = export
        self._writable = writable
        self._released = False

    async def read(self, offset: int, size: int) -> memoryview:
        return await self._export.read_transient(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self._writable:
            raise SnapfsError("not open for writing", errno=errno.EBADF)
        disk_size = self._node.restore.virtual_size
        if offset >= disk_size:
            # Like a block device: no room past the end of the disk.
            raise SnapfsError(
                f"write at {offset} past the end of restore disk {self._node.restore.name}",
                errno=errno.ENOSPC,
            )
        count = min(len(data), disk_size - offset)
        await self._export.write(offset, memoryview(data)[:count])
        return count

    async def flush(self) -> None:
        if self._writable:
            await self._export.flush()

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._writable:
                await self._export.flush()
        finally:
            self._export.release()
            if self._writable:
                self._node.state.end_raw_write()


class RestoreDiskFile(File):
    """``restore/<name>/disk.img``: the restore disk's raw bytes, writable."""

    __slots__ = ("restore", "state")

    def __init__(self, tree: Tree, parent: RestoreDir, restore: RestoreDisk) -> None:
        super().__init__(
            tree,
            parent.child_ino(DISK_FILE),
            DISK_FILE,
            parent,
            mtime_ns=int(restore.created * 1e9),
        )
        self.restore = restore
        self.state = parent.state

    def export(self) -> DiskExport:
        assert self.tree.exports is not None
        return self.tree.exports.export_for(self.restore.path, self.restore.format, readonly=False)

    async def getattr(self) -> Attrs:
        try:
            st = await trio.to_thread.run_sync(os.stat, self.restore.path)
            blocks, mtime = st.st_blocks, st.st_mtime_ns
        except OSError:
            blocks, mtime = 0, self.mtime_ns
        return self._attrs(self.restore.virtual_size, blocks=blocks, mode=0o644)._replace(
            ttl=RESTORE_TTL_S, mtime_ns=mtime, ctime_ns=mtime
        )

    async def open(self, writable: bool) -> OpenFile:
        if self.restore.error is not None:
            raise SnapfsError(f"restore disk {self.restore.name}: {self.restore.error}")
        if writable:
            self.state.begin_raw_write(self.restore.name)
        export = self.export()
        try:
            await export.acquire()
        except BaseException:
            if writable:
                self.state.end_raw_write()
            raise
        return _RestoreDiskHandle(self, export, writable)

    async def setattr(self, changes: AttrChanges) -> Attrs:
        size = changes.size
        disk_size = self.restore.virtual_size
        if size is not None and size != disk_size:
            if size > disk_size:
                raise SnapfsError(
                    f"restore disk {self.restore.name} is {disk_size} bytes; it cannot grow",
                    errno=errno.EFBIG,
                )
            if size != 0:
                raise SnapfsError(
                    f"restore disk {self.restore.name} cannot shrink (only truncation to 0, "
                    "which zeroes the whole disk, is allowed)",
                    errno=errno.EINVAL,
                )
            # open(O_TRUNC) by cp or a shell redirection: the disk reads as zeros afterwards,
            # and keeps its size (a disk cannot shrink).
            export = self.export()
            self.state.begin_raw_write(self.restore.name)
            try:
                await export.acquire()
                try:
                    await export.zero(0, disk_size)
                    await export.flush()
                finally:
                    export.release()
            finally:
                self.state.end_raw_write()
            log.info("restore disk %s zeroed (truncated)", self.restore.name)
        # Mode, owner and times of the disk file are not stored: accepted and ignored, so
        # that cp -p and rsync -a into disk.img do not fail.
        return await self.getattr()


class RestoreDir(Dir):
    """``restore/<name>/``: one restore disk."""

    __slots__ = ("restore", "state")

    def __init__(
        self,
        tree: Tree,
        parent: RestoreRoot,
        name: bytes,
        restore: RestoreDisk,
        guests: RestoreGuests | None = None,
    ) -> None:
        super().__init__(
            tree,
            parent.child_ino(name),
            name,
            parent,
            mtime_ns=int(restore.created * 1e9),
            error=restore.error,
            static=True,
        )
        self.restore = restore
        self.state = RestoreState()
        if restore.error is None:
            self.add(RestoreDiskFile(tree, self, restore))
            self.add(BytesFile(tree, self, META_FILE, _metadata(restore), self.mtime_ns))
            if guests is not None:
                # files/ and volumes/, read-write (after disk.img: they use its export).
                guests.add(tree, self)

    async def getattr(self) -> Attrs:
        return (await super().getattr())._replace(ttl=RESTORE_TTL_S)


def _metadata(restore: RestoreDisk) -> bytes:
    source = restore.source
    doc = {
        "name": restore.name,
        "image": str(restore.path),
        "format": restore.format,
        "virtual_size": restore.virtual_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(restore.created)),
        "source": None
        if source is None
        else {
            "vm": source.vm_name,
            "vm_id": source.vm_id,
            "snapshot": source.snapshot_name,
            "snapshot_id": source.snapshot_id,
            "disk": source.disk,
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


class RestoreRoot(Dir):
    """``restore/``: the repository's restore disks; ``mkdir`` creates one."""

    __slots__ = ("_listed_at", "guests", "repo")

    def __init__(
        self, tree: Tree, parent: Dir, repo: Path, guests: RestoreGuests | None = None
    ) -> None:
        super().__init__(tree, parent.child_ino(RESTORE_DIR), RESTORE_DIR, parent)
        self.repo = repo
        self.guests = guests
        self._listed_at = 0.0

    async def getattr(self) -> Attrs:
        attrs = await super().getattr()
        return attrs._replace(mode=stat.S_IFDIR | 0o755, ttl=RESTORE_TTL_S)

    async def children(self) -> dict[bytes, Node]:
        if self._children is None or time.monotonic() - self._listed_at > RELIST_INTERVAL_S:
            await self._relist()
        assert self._children is not None
        return self._children

    async def _relist(self) -> None:
        try:
            restores, problems = await trio.to_thread.run_sync(store.list_restores, self.repo)
        except (OSError, SnapfsError, SnapfsUserError) as exc:
            raise SnapfsError(f"cannot list restore disks in {self.repo}: {exc}") from exc
        for problem in problems:
            log.warning("restore area problem: %s", problem)
        old = self._children or {}
        new: dict[bytes, Node] = {}
        for restore in restores:
            name = os.fsencode(restore.name)
            node = old.get(name)
            # Keep the node (its open handles, its guard state) while it is the same disk.
            if not (isinstance(node, RestoreDir) and node.restore == restore):
                node = RestoreDir(self.tree, self, name, restore, self.guests)
            new[name] = node
        self._children = new
        self._listed_at = time.monotonic()

    async def mkdir(self, name: bytes, mode: int, caller: Caller) -> Node:
        try:
            spec = store.spec_from_dirname(os.fsdecode(name))
            restore = await trio.to_thread.run_sync(store.create_restore, self.repo, spec)
        except SnapfsUserError as exc:
            raise SnapfsError(
                f"mkdir restore/{os.fsdecode(name)}: {exc}", errno=errno.EINVAL
            ) from exc
        log.info("created restore disk %s", restore.name)
        await self._relist()
        node = (await self.children()).get(os.fsencode(restore.name))
        if node is None:
            raise SnapfsError(f"restore disk {restore.name} vanished after creation")
        return node

    async def rmdir(self, name: bytes) -> None:
        raise SnapfsError(
            "restore disks are removed with 'snapfs restore rm' (after unmounting)",
            errno=errno.EPERM,
        )

    async def unlink(self, name: bytes) -> None:
        raise ReadOnly("restore/ holds only restore disk directories")
