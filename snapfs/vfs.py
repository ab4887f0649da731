"""The backup tree as a filesystem model: nodes, attributes, names and inode numbers.

Owns what the mount looks like (documented in docs/layout.md), independent of FUSE: the
``fuse_ops`` adapter translates between this model and pyfuse3. Nodes are built from a
``Catalog``; directories whose content costs I/O (guest filesystems) build their children
lazily. Broken entries stay visible and fail with their errno (EIO) on access, so that a
mirror of the mount never mistakes an error for an empty directory.

Inode numbers are derived from the path (a hash of the parent's inode and the name), so
they are the same across remounts; the inode table never forgets a node while mounted.

Thread rules: everything runs on the trio loop; I/O goes through the exports and sessions,
which keep blocking calls off the loop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import trio

from snapfs.catalog.changes import extent_report, render_report
from snapfs.catalog.model import Catalog, Disk, Snapshot, Vm
from snapfs.errors import NotFound, ReadOnly, SnapfsError
from snapfs.nbd.export import DiskExport, ExportManager

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Inodes are 63-bit hashes; small numbers are kept for fixed nodes (the root).
_INODE_MASK = (1 << 63) - 1
_RESERVED_INODES = 1 << 16

# Names the snapshot directory itself uses; captured configuration files never take them.
SNAPSHOT_META = "snapshot.json"
VM_META = "vm.json"
# The root's own entries; a VM of that name is shown as "<name>~<vm id>".
RESERVED_ROOT_NAMES = frozenset({"restore"})
RESERVED_SNAPSHOT_NAMES = frozenset({SNAPSHOT_META, "disks", "files", "volumes"})


class Attrs(NamedTuple):
    """What ``stat`` shows for a node (FUSE-free; the adapter converts)."""

    ino: int
    mode: int
    size: int = 0
    blocks: int = 0  # 512-byte units actually allocated
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096
    # How long the kernel may cache this entry and its attributes: snapshot data never
    # changes while mounted; writable parts (restore disks) use a short time.
    ttl: float = 3600.0


@dataclass(frozen=True)
class AttrChanges:
    """What a setattr (chmod, chown, truncate, utimens) asks to change; None: unchanged."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


def derive_inode(parent: int, name: bytes) -> int:
    """A stable inode number for ``name`` under ``parent`` (restic-style path hash)."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + name, digest_size=8).digest()
    ino = int.from_bytes(digest, "little") & _INODE_MASK
    return ino if ino >= _RESERVED_INODES else ino + _RESERVED_INODES


def clean_name(name: str) -> str:
    """A display name usable as one path component: no ``/``, no NUL, not . or .."""
    cleaned = name.replace("/", "_").replace("\0", "_")
    if cleaned in ("", ".", ".."):
        cleaned = cleaned.replace(".", "_") or "_"
    return cleaned


def unique_names(
    items: Sequence[tuple[str, str]], reserved: frozenset[str] = frozenset()
) -> list[str]:
    """Clean and de-duplicate (name, stable id) pairs: a repeated name gets ``~<id>``.

    A name in ``reserved`` (used by the tree itself) always gets the suffix."""
    cleaned = [clean_name(name) for name, _ in items]
    seen: dict[str, int] = dict.fromkeys(reserved, 1)
    for name in cleaned:
        seen[name] = seen.get(name, 0) + 1
    result = []
    for name, (_, ident) in zip(cleaned, items, strict=True):
        result.append(f"{name}~{clean_name(ident)}" if seen[name] > 1 else name)
    return result


class Node:
    """A file, directory or symlink of the tree."""

    __slots__ = ("ino", "name", "parent")

    def __init__(self, ino: int, name: bytes, parent: Dir | None) -> None:
        self.ino = ino
        self.name = name
        self.parent = parent

    async def getattr(self) -> Attrs:
        raise NotImplementedError

    # Changes: the read-only default. Writable nodes (restore disks, their guest files)
    # override what they support.
    async def setattr(self, changes: AttrChanges) -> Attrs:
        raise ReadOnly("read-only")

    async def listxattr(self) -> list[bytes]:
        return []

    async def readlink(self) -> bytes:
        raise SnapfsError("not a symlink", errno=errno.EINVAL)

    async def getxattr(self, name: bytes) -> bytes:
        raise SnapfsError("no such attribute", errno=errno.ENODATA)

    async def setxattr(self, name: bytes, value: bytes) -> None:
        raise ReadOnly("read-only")

    async def removexattr(self, name: bytes) -> None:
        raise ReadOnly("read-only")


@dataclass(frozen=True)
class Caller:
    """Who asks for a new node: its owner."""

    uid: int
    gid: int
    umask: int = 0o022


def _same_path(a: Node, b: Node) -> bool:
    parent_a = a.parent.ino if a.parent else None
    parent_b = b.parent.ino if b.parent else None
    return a.name == b.name and parent_a == parent_b


class Tree:
    """The inode table and the context nodes need (owner, exports)."""

    def __init__(self, exports: ExportManager | None, *, uid: int, gid: int) -> None:
        self.exports = exports
        self.uid = uid
        self.gid = gid
        self.mounted_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}

    def register(self, node: Node) -> Node:
        existing = self.nodes.get(node.ino)
        if existing is not None and existing is not node and not _same_path(existing, node):
            raise SnapfsError(f"inode collision on {node.ino}: {node.name!r}")
        # The same path again (a restore disk re-listed) replaces the older node.
        self.nodes[node.ino] = node
        return node

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise NotFound(f"no inode {ino}")
        return node


# -- directories -----------------------------------------------------------------------


class Dir(Node):
    """A directory whose children are known once built; ``error`` makes it fail with EIO."""

    __slots__ = ("_children", "error", "mtime_ns", "tree")

    def __init__(
        self,
        tree: Tree,
        ino: int,
        name: bytes,
        parent: Dir | None,
        *,
        mtime_ns: int = 0,
        error: str | None = None,
        static: bool = False,
    ) -> None:
        super().__init__(ino, name, parent)
        self.tree = tree
        self.mtime_ns = mtime_ns or tree.mounted_ns
        self.error = error
        # Static directories are filled by their builder; lazy ones in build().
        self._children: dict[bytes, Node] | None = {} if static else None
        tree.register(self)

    def child_ino(self, name: bytes) -> int:
        return derive_inode(self.ino, name)

    def add(self, node: Node) -> Node:
        if self._children is None:
            self._children = {}
        if node.name in self._children:
            raise SnapfsError(f"duplicate name {node.name!r} in {self.name!r}")
        self._children[node.name] = node
        return node

    async def build(self) -> None:
        """Populate the children (static directories have them from the start)."""
        if self._children is None:
            self._children = {}

    async def fsync(self) -> None:
        """fsync of the directory (fsyncdir): nothing to do where nothing is written."""
        return None

    async def children(self) -> dict[bytes, Node]:
        if self.error is not None:
            raise SnapfsError(self.error)
        if self._children is None:
            await self.build()
        assert self._children is not None
        return self._children

    async def lookup(self, name: bytes) -> Node:
        if name == b".":
            return self
        if name == b"..":
            return self.parent or self
        node = (await self.children()).get(name)
        if node is None:
            raise NotFound(f"{name!r} not found")
        return node

    async def entries(self) -> list[tuple[bytes, Node]]:
        """(name, node) pairs: a hard-linked node appears under each of its names."""
        return list((await self.children()).items())

    async def mkdir(self, name: bytes, mode: int, caller: Caller) -> Node:
        raise ReadOnly("read-only")

    async def create(
        self, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, OpenFile]:
        raise ReadOnly("read-only")

    async def mknod(self, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        raise ReadOnly("read-only")

    async def symlink(self, name: bytes, target: bytes, caller: Caller) -> Node:
        raise ReadOnly("read-only")

    async def link(self, name: bytes, target: Node) -> Node:
        raise ReadOnly("read-only")

    async def unlink(self, name: bytes) -> None:
        raise ReadOnly("read-only")

    async def rmdir(self, name: bytes) -> None:
        raise ReadOnly("read-only")

    async def rename(self, name: bytes, new_parent: Dir, new_name: bytes, flags: int) -> None:
        raise ReadOnly("read-only")

    async def getattr(self) -> Attrs:
        return Attrs(
            ino=self.ino,
            mode=stat.S_IFDIR | 0o555,
            nlink=2,
            mtime_ns=self.mtime_ns,
            atime_ns=self.mtime_ns,
            ctime_ns=self.mtime_ns,
            uid=self.tree.uid,
            gid=self.tree.gid,
        )


# -- files -----------------------------------------------------------------------------


class OpenFile:
    """What an open file handle reads from; ``keep_cache`` when the data cannot change."""

    keep_cache = True
    direct_io = False  # bypass the page cache and st_size (content of unknown size)
    # A snapshot disk image read through NBD: what ``[nbd] page_cache = false`` opens
    # without the page cache.
    nbd_disk = False

    def may_widen(self, offset: int, size: int) -> bool:
        """Whether a random read here may be widened to a window whose rest is stored in the
        page cache (snapfs.readaround): only data that never changes under the page cache,
        and only where widening saves a read from the server."""
        return False

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        """The (start, end) ranges of ``[start, end)`` known to be holes of data that never
        changes under the page cache: zeros a sequential reader's page cache may be filled
        with ahead of it (snapfs.readaround). Empty when unknown."""
        return []

    def data_ahead(self, start: int, end: int) -> tuple[str, list[tuple[int, int]]] | None:
        """Where the store process may read this file's data from ahead of a sequential
        reader (an NBD unix socket serving it at the same offsets, for data that never
        changes under the page cache) and the data ranges of ``[start, end)``; None when
        data is not to be read ahead."""
        return None

    async def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    async def write(self, offset: int, data: bytes) -> int:
        raise ReadOnly("read-only file")

    async def flush(self) -> None:
        return None

    async def fsync(self) -> None:
        """Make what was written durable (default: the same as ``flush``)."""
        await self.flush()

    async def release(self) -> None:
        return None


class File(Node):
    __slots__ = ("mtime_ns", "tree")

    def __init__(
        self, tree: Tree, ino: int, name: bytes, parent: Dir | None, *, mtime_ns: int = 0
    ) -> None:
        super().__init__(ino, name, parent)
        self.tree = tree
        self.mtime_ns = mtime_ns or tree.mounted_ns
        tree.register(self)

    def _attrs(self, size: int, blocks: int | None = None, mode: int = 0o444) -> Attrs:
        return Attrs(
            ino=self.ino,
            mode=stat.S_IFREG | mode,
            size=size,
            blocks=(size + 511) // 512 if blocks is None else blocks,
            mtime_ns=self.mtime_ns,
            atime_ns=self.mtime_ns,
            ctime_ns=self.mtime_ns,
            uid=self.tree.uid,
            gid=self.tree.gid,
        )

    async def open(self, writable: bool) -> OpenFile:
        raise NotImplementedError


class _BytesHandle(OpenFile):
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


class BytesFile(File):
    """A small generated file (metadata JSON)."""

    __slots__ = ("data",)

    def __init__(self, tree: Tree, parent: Dir, name: str, data: bytes, mtime_ns: int) -> None:
        encoded = name.encode()
        super().__init__(tree, parent.child_ino(encoded), encoded, parent, mtime_ns=mtime_ns)
        self.data = data

    async def getattr(self) -> Attrs:
        return self._attrs(len(self.data))

    async def open(self, writable: bool) -> OpenFile:
        if writable:
            raise ReadOnly("snapshot metadata is read-only")
        return _BytesHandle(self.data)


class HostFile(File):
    """A file of the repository shown verbatim (captured VM configuration)."""

    __slots__ = ("path",)

    def __init__(self, tree: Tree, parent: Dir, name: str, path: Path, mtime_ns: int) -> None:
        encoded = os.fsencode(name)
        super().__init__(tree, parent.child_ino(encoded), encoded, parent, mtime_ns=mtime_ns)
        self.path = path

    async def _read_all(self) -> bytes:
        try:
            data: bytes = await trio.to_thread.run_sync(self.path.read_bytes)
        except OSError as exc:
            raise SnapfsError(f"cannot read {self.path}: {exc}") from exc
        return data

    async def getattr(self) -> Attrs:
        try:
            st = await trio.to_thread.run_sync(os.stat, self.path)
        except OSError as exc:
            raise SnapfsError(f"cannot stat {self.path}: {exc}") from exc
        return self._attrs(st.st_size)

    async def open(self, writable: bool) -> OpenFile:
        if writable:
            raise ReadOnly("captured configuration is read-only")
        return _BytesHandle(await self._read_all())


class _DiskHandle(OpenFile):
    nbd_disk = True

    def __init__(self, export: DiskExport) -> None:
        self._export = export
        self._released = False
        # A live view's job may end and restart at a later point in time: no stale pages.
        self.keep_cache = not export.restartable_source

    @property
    def _immutable(self) -> bool:
        """Whether the page cache may be filled beyond what the kernel asked for."""
        return self.keep_cache and self._export.readonly

    def may_widen(self, offset: int, size: int) -> bool:
        # A read of holes is answered without the server; filling the page cache with more
        # zeros costs more than it saves (measured: docs/benchmarks.md, session 5).
        return self._immutable and self._export.may_hold_data(offset, size)

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        return self._export.holes(start, end) if self._immutable else []

    def data_ahead(self, start: int, end: int) -> tuple[str, list[tuple[int, int]]] | None:
        export = self._export
        # Only our own qemu-nbd: another server may take one client, or need TLS.
        if not self._immutable or export.uri is not None or not export.running:
            return None
        return str(export.socket_path), export.data_ranges(start, end)

    async def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        # Handed to the kernel on return, before any other task runs: a reused buffer is safe.
        return await self._export.read_transient(offset, size)

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._export.release()


class DiskFile(File):
    """A snapshot disk as its raw bytes, read lazily through the image's NBD export."""

    __slots__ = ("disk",)

    def __init__(self, tree: Tree, parent: Dir, name: str, disk: Disk, mtime_ns: int) -> None:
        encoded = name.encode()
        super().__init__(tree, parent.child_ino(encoded), encoded, parent, mtime_ns=mtime_ns)
        self.disk = disk

    def export(self) -> DiskExport:
        assert self.tree.exports is not None
        if self.disk.uri is not None:
            return self.tree.exports.export_for_uri(self.disk.uri, self.disk.dirty_bitmap)
        return self.tree.exports.export_for(self.disk.path, self.disk.format)

    async def getattr(self) -> Attrs:
        disk = self.disk
        return self._attrs(disk.virtual_size, blocks=(disk.allocated + 511) // 512)

    async def open(self, writable: bool) -> OpenFile:
        if writable:
            raise ReadOnly("snapshot disks are read-only")
        if self.disk.error is not None:
            raise SnapfsError(f"{self.disk.path}: {self.disk.error}")
        export = self.export()
        await export.acquire()
        return _DiskHandle(export)


class ExtentMapFile(File):
    """``disks/<disk>.extents.json``: allocated and changed extents (catalog.changes)."""

    __slots__ = ("_data", "_lock", "disk", "disk_file", "snapshot")

    def __init__(
        self, tree: Tree, parent: Dir, name: str, snap: Snapshot, disk_file: DiskFile
    ) -> None:
        encoded = name.encode()
        super().__init__(
            tree, parent.child_ino(encoded), encoded, parent, mtime_ns=disk_file.mtime_ns
        )
        self.snapshot = snap
        self.disk = disk_file.disk
        self.disk_file = disk_file
        self._data: bytes | None = None
        self._lock = trio.Lock()

    async def _report(self) -> bytes:
        # Computed on first use, then kept (snapshots are immutable).
        async with self._lock:
            if self._data is not None:
                return self._data
            if self.disk.error is not None:
                raise SnapfsError(f"{self.disk.path}: {self.disk.error}")
            data: bytes
            try:
                if self.disk.uri is None:
                    data = await trio.to_thread.run_sync(extent_report, self.snapshot, self.disk)
                else:
                    data = await self._report_from_export()
            except SnapfsError:
                raise
            except Exception as exc:  # qemu-img, libnbd: the reason goes into the log
                raise SnapfsError(f"extent map of {self.disk.path}: {exc}") from exc
            self._data = data
            return data

    async def _report_from_export(self) -> bytes:
        """An NBD source: allocation from block status, changes from its dirty bitmap."""
        disk = self.disk
        assert disk.uri is not None
        # Through the export, so that a server started on demand (a live job) is started.
        # The export computes both on its first connection (a server may take one client).
        export = self.disk_file.export()
        await export.acquire()
        try:
            assert export.extents is not None
            allocated = [(s, e - s) for s, e in export.extents.ranges()]
            dirty = export.dirty
        finally:
            export.release()
        return render_report(self.snapshot, disk, allocated, dirty, parent=None)

    def _on_demand(self) -> bool:
        # A live view: computing the report would start a backup job; not for a listing.
        return (
            self.disk.uri is not None
            and self._data is None
            and self.tree.exports is not None
            and self.disk_file.export().restartable_source
        )

    async def getattr(self) -> Attrs:
        if self._on_demand():
            return self._attrs(0)._replace(ttl=1.0)
        try:
            return self._attrs(len(await self._report()))
        except SnapfsError as exc:
            # Listed all the same (a listing must not fail for one broken file); reading it
            # fails with the reason.
            log.debug("%s", exc)
            return self._attrs(0)._replace(ttl=1.0)

    async def open(self, writable: bool) -> OpenFile:
        if writable:
            raise ReadOnly("extent maps are read-only")
        on_demand = self._on_demand()
        handle = _BytesHandle(await self._report())
        # Its size was not known when listed: read to the end regardless of st_size.
        handle.direct_io = on_demand
        return handle


class Symlink(Node):
    __slots__ = ("mtime_ns", "target", "tree")

    def __init__(self, tree: Tree, parent: Dir, name: str, target: bytes, mtime_ns: int) -> None:
        encoded = name.encode()
        super().__init__(parent.child_ino(encoded), encoded, parent)
        self.tree = tree
        self.target = target
        self.mtime_ns = mtime_ns
        tree.register(self)

    async def readlink(self) -> bytes:
        return self.target

    async def getattr(self) -> Attrs:
        return Attrs(
            ino=self.ino,
            mode=stat.S_IFLNK | 0o777,
            size=len(self.target),
            mtime_ns=self.mtime_ns,
            atime_ns=self.mtime_ns,
            ctime_ns=self.mtime_ns,
            uid=self.tree.uid,
            gid=self.tree.gid,
        )


# -- the backup tree -------------------------------------------------------------------


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def snapshot_metadata(vm: Vm, snap: Snapshot) -> bytes:
    doc = {
        "vm": {"id": vm.id, "name": vm.name},
        "id": snap.id,
        "name": snap.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.created)),
        "description": snap.description,
        "parent": snap.parent,
        "disks": [
            {
                "name": d.name,
                "format": d.format,
                "virtual_size": d.virtual_size,
                "allocated": d.allocated,
                "file_size": d.file_size,
                "image": str(d.path),
                "backing": str(d.backing) if d.backing else None,
                "error": d.error,
            }
            for d in snap.disks
        ],
        "config_files": [p.name for p in snap.config_files],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def vm_metadata(vm: Vm, snapshot_names: list[str]) -> bytes:
    doc = {
        "id": vm.id,
        "name": vm.name,
        "snapshots": [
            {"id": s.id, "name": n, "created": s.created}
            for s, n in zip(vm.snapshots, snapshot_names, strict=True)
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def build_tree(
    catalog: Catalog,
    exports: ExportManager | None,
    *,
    uid: int | None = None,
    gid: int | None = None,
    snapshot_hook: Callable[[Tree, Dir, Vm, Snapshot], None] | None = None,
    root_hook: Callable[[Tree, Dir], None] | None = None,
) -> tuple[Tree, Dir]:
    """The whole read-only backup tree for ``catalog`` (see docs/layout.md)."""
    tree = Tree(
        exports,
        uid=os.getuid() if uid is None else uid,
        gid=os.getgid() if gid is None else gid,
    )
    root = Dir(tree, ROOT_INODE, b"", None, static=True)
    vm_names = unique_names([(vm.name, vm.id) for vm in catalog.vms], RESERVED_ROOT_NAMES)
    for vm, vm_name in zip(catalog.vms, vm_names, strict=True):
        newest = vm.latest()
        vm_mtime = _ns(newest.created) if newest else tree.mounted_ns
        encoded = vm_name.encode()
        vm_dir = Dir(
            tree,
            root.child_ino(encoded),
            encoded,
            root,
            mtime_ns=vm_mtime,
            error=vm.error,
            static=True,
        )
        root.add(vm_dir)
        if vm.error is not None:
            continue
        snaps = sorted(vm.snapshots, key=lambda s: (s.created, s.id))
        snap_names = unique_names([(s.name, s.id) for s in snaps])
        vm_dir.add(
            BytesFile(
                tree,
                vm_dir,
                VM_META,
                vm_metadata(Vm(vm.id, vm.name, tuple(snaps)), snap_names),
                vm_mtime,
            )
        )
        snaps_dir = Dir(
            tree,
            vm_dir.child_ino(b"snapshots"),
            b"snapshots",
            vm_dir,
            mtime_ns=vm_mtime,
            static=True,
        )
        vm_dir.add(snaps_dir)
        for snap, snap_name in zip(snaps, snap_names, strict=True):
            _add_snapshot(tree, snaps_dir, vm, snap, snap_name, snapshot_hook)
        if newest is not None:
            target = snap_names[snaps.index(newest)]
            vm_dir.add(Symlink(tree, vm_dir, "latest", f"snapshots/{target}".encode(), vm_mtime))
    if root_hook is not None:
        root_hook(tree, root)
    return tree, root


def _add_snapshot(
    tree: Tree,
    snaps_dir: Dir,
    vm: Vm,
    snap: Snapshot,
    name: str,
    hook: Callable[[Tree, Dir, Vm, Snapshot], None] | None,
) -> None:
    mtime = _ns(snap.created)
    encoded = name.encode()
    snap_dir = Dir(
        tree,
        snaps_dir.child_ino(encoded),
        encoded,
        snaps_dir,
        mtime_ns=mtime,
        error=snap.error,
        static=True,
    )
    snaps_dir.add(snap_dir)
    if snap.error is not None:
        return
    snap_dir.add(BytesFile(tree, snap_dir, SNAPSHOT_META, snapshot_metadata(vm, snap), mtime))
    for path in snap.config_files:
        cfg_name = clean_name(path.name)
        if cfg_name in RESERVED_SNAPSHOT_NAMES:
            cfg_name = f"config-{cfg_name}"
        snap_dir.add(HostFile(tree, snap_dir, cfg_name, path, mtime))
    disks_dir = Dir(
        tree, snap_dir.child_ino(b"disks"), b"disks", snap_dir, mtime_ns=mtime, static=True
    )
    snap_dir.add(disks_dir)
    disk_names = unique_names([(d.name, str(i)) for i, d in enumerate(snap.disks)])
    for disk, disk_name in zip(snap.disks, disk_names, strict=True):
        disk_file = DiskFile(tree, disks_dir, f"{disk_name}.img", disk, mtime)
        disks_dir.add(disk_file)
        disks_dir.add(ExtentMapFile(tree, disks_dir, f"{disk_name}.extents.json", snap, disk_file))
    if hook is not None:
        hook(tree, snap_dir, vm, snap)
