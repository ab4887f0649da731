"""Guest filesystems in the tree: each snapshot's ``files/`` and ``volumes/`` (docs/guestfs.md).

Owns the nodes that show a snapshot's guest files, on top of ``snapfs.guestfs`` (which owns
the appliance, the per-directory prefetch and the reads). One ``GuestContext`` per snapshot
holds its appliance session; it is created on the first access to ``files/`` or ``volumes/``
(listing a snapshot directory launches nothing). Before a launch the snapshot's NBD exports
are acquired (their servers start), after the appliance stops they are released.

Inode numbers: the guest layer derives one per guest file (hard links share it); here it
is mixed with the view (``files/`` or ``volumes/<name>/``), so the same directory seen in
two views is two inodes for the kernel (no directory aliases), while hard links inside a
view keep sharing one.

Thread rules: on the trio loop; every guestfs call is made by ``snapfs.guestfs`` in threads.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import trio

from snapfs.catalog.model import Snapshot, Vm
from snapfs.errors import SnapfsError
from snapfs.guestfs import (
    AppliancePool,
    GuestfsSettings,
    GuestSession,
    GuestStat,
    GuestTree,
    View,
)
from snapfs.nbd.export import DiskExport
from snapfs.vfs import Attrs, Dir, DiskFile, File, Node, OpenFile, Tree, derive_inode

log = logging.getLogger(__name__)

FILES = b"files"
VOLUMES = b"volumes"


def _socket_of(export: DiskExport) -> tuple[str, str] | None:
    """(unix socket, export name) a guest appliance can attach to, or None."""
    if export.uri is None:
        return str(export.socket_path), ""
    if export.needs_relay:
        # TCP/TLS exports: through a local nbdkit relay (started by ``GuestContext._acquire``).
        return str(export.relay_socket_path), ""
    parts = urlsplit(export.uri)
    sockets = parse_qs(parts.query).get("socket")
    if not sockets:
        return None
    return sockets[0], parts.path.lstrip("/")


class GuestContext:
    """The guest side of one snapshot: its appliance session and ``GuestTree``, made on
    first use (a mount of a big repository creates nothing until someone looks)."""

    def __init__(
        self,
        vm: Vm,
        snap: Snapshot,
        disk_files: Sequence[DiskFile],
        pool: AppliancePool,
        settings: GuestfsSettings,
    ) -> None:
        self.vm = vm
        self.snap = snap
        self._disk_files = [d for d in disk_files if d.disk.error is None]
        self._pool = pool
        self._settings = settings
        self._exports: list[DiskExport] = []
        self._acquired = False
        self.session: GuestSession | None = None
        self.guest: GuestTree | None = None

    def require(self) -> GuestTree:
        if self.guest is not None:
            return self.guest
        drives: list[tuple[str, str]] = []
        names: dict[str, str] = {}
        by_name: dict[str, DiskExport] = {}
        for disk_file in self._disk_files:
            export = disk_file.export()
            where = _socket_of(export)
            if where is None:
                continue
            self._exports.append(export)
            by_name[disk_file.disk.name] = export
            drives.append((disk_file.disk.name, where[0]))
            if where[1]:
                names[disk_file.disk.name] = where[1]
        if not drives:
            raise SnapfsError(
                f"{self.vm.name}/{self.snap.name}: no disk of this snapshot can be attached "
                "to a guest appliance"
            )
        session = GuestSession(
            f"{self.vm.name}/{self.snap.name}", drives, self._settings, self._pool
        )
        session.export_names = names
        session.before_launch = self._acquire
        session.after_shutdown = self._release

        async def read_raw(disk: str, offset: int, size: int) -> bytes:
            return await by_name[disk].read(offset, size)

        self.session = session
        self.guest = GuestTree(session, read_raw=read_raw, ino_salt=self.snap.id.encode())
        return self.guest

    async def _acquire(self) -> None:
        if self._acquired:
            return
        acquired: list[DiskExport] = []
        try:
            for export in self._exports:
                if export.needs_relay:
                    await export.acquire_relay()
                else:
                    await export.acquire()
                acquired.append(export)
        except BaseException:
            with trio.CancelScope(shield=True):
                for export in acquired:
                    await self._release_one(export)
            raise
        self._acquired = True

    async def _release(self) -> None:
        if self._acquired:
            self._acquired = False
            for export in self._exports:
                await self._release_one(export)

    @staticmethod
    async def _release_one(export: DiskExport) -> None:
        if export.needs_relay:
            await export.release_relay()
        else:
            export.release()

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.aclose()


# -- nodes -----------------------------------------------------------------------------------


def _attrs(ino: int, st: GuestStat) -> Attrs:
    return Attrs(
        ino=ino,
        mode=st.mode,
        size=st.size,
        blocks=st.blocks,
        mtime_ns=st.mtime_ns,
        atime_ns=st.atime_ns,
        ctime_ns=st.ctime_ns,
        nlink=st.nlink,
        uid=st.uid,
        gid=st.gid,
        rdev=st.rdev,
        blksize=st.blksize or 4096,
    )


class _ViewRoot:
    """What every node of one view shares: the guest tree, the view, the inode salt."""

    __slots__ = ("guest", "salt", "view")

    def __init__(self, guest: GuestTree, view: View, salt: int) -> None:
        self.guest = guest
        self.view = view
        self.salt = salt

    def ino(self, st: GuestStat) -> int:
        return derive_inode(self.salt, st.ino.to_bytes(8, "little"))


def _guest_node(tree: Tree, parent: GuestDir, root: _ViewRoot, name: bytes, st: GuestStat) -> Node:
    path = parent.path.rstrip(b"/") + b"/" + name
    ino = root.ino(st)
    existing = tree.nodes.get(ino)
    if isinstance(existing, GuestFile) and existing.root is root and not stat.S_ISDIR(st.mode):
        return existing  # a hard link: the same node under another name
    node: Node
    if stat.S_ISDIR(st.mode):
        node = GuestDir(tree, ino, name, parent, root, path, st)
    elif stat.S_ISLNK(st.mode):
        node = GuestSymlink(ino, name, parent, root, path, st)
    else:
        node = GuestFile(tree, ino, name, parent, root, path, st)
    tree.nodes[ino] = node
    return node


class _GuestXattrs:
    """Extended attributes of a guest node, from the directory prefetch."""

    __slots__ = ()
    root: _ViewRoot
    path: bytes

    async def listxattr(self) -> list[bytes]:
        return await self.root.guest.listxattr(self.root.view, self.path)

    async def getxattr(self, name: bytes) -> bytes:
        return await self.root.guest.getxattr(self.root.view, self.path, name)


class GuestDir(_GuestXattrs, Dir):
    """A directory of a guest filesystem; listed in one appliance round trip, then cached."""

    __slots__ = ("path", "root", "st")

    def __init__(
        self,
        tree: Tree,
        ino: int,
        name: bytes,
        parent: Dir,
        root: _ViewRoot,
        path: bytes,
        st: GuestStat,
    ) -> None:
        # Guest inodes are registered directly (hard links and re-lookups may repeat them).
        Node.__init__(self, ino, name, parent)
        self.tree = tree
        self.mtime_ns = st.mtime_ns
        self.error = None
        self._children = None
        self.root = root
        self.path = path
        self.st = st
        tree.nodes[ino] = self

    async def build(self) -> None:
        entries = await self.root.guest.listdir(self.root.view, self.path)
        children: dict[bytes, Node] = {}
        for entry in entries:
            children[entry.name] = _guest_node(self.tree, self, self.root, entry.name, entry.stat)
        self._children = children

    async def getattr(self) -> Attrs:
        return _attrs(self.ino, self.st)


class _GuestHandle(OpenFile):
    keep_cache = True  # snapshot data is immutable

    def __init__(self, node: GuestFile) -> None:
        self._node = node

    async def read(self, offset: int, size: int) -> bytes:
        node = self._node
        if offset >= node.st.size:
            return b""
        return await node.root.guest.read(node.root.view, node.path, offset, size)


class GuestFile(_GuestXattrs, File):
    """A regular file (or device node, fifo, socket) of a guest filesystem."""

    __slots__ = ("path", "root", "st")

    def __init__(
        self,
        tree: Tree,
        ino: int,
        name: bytes,
        parent: Dir,
        root: _ViewRoot,
        path: bytes,
        st: GuestStat,
    ) -> None:
        Node.__init__(self, ino, name, parent)
        self.tree = tree
        self.mtime_ns = st.mtime_ns
        self.root = root
        self.path = path
        self.st = st

    async def getattr(self) -> Attrs:
        return _attrs(self.ino, self.st)

    async def open(self, writable: bool) -> OpenFile:
        if writable:
            raise SnapfsError("snapshot files are read-only", errno=errno.EROFS)
        if not stat.S_ISREG(self.st.mode):
            raise SnapfsError("not a regular file", errno=errno.EACCES)
        return _GuestHandle(self)


class GuestSymlink(_GuestXattrs, Node):
    __slots__ = ("path", "root", "st")

    def __init__(
        self, ino: int, name: bytes, parent: Dir, root: _ViewRoot, path: bytes, st: GuestStat
    ) -> None:
        super().__init__(ino, name, parent)
        self.root = root
        self.path = path
        self.st = st

    async def getattr(self) -> Attrs:
        return _attrs(self.ino, self.st)

    async def readlink(self) -> bytes:
        return await self.root.guest.readlink(self.root.view, self.path)


class ViewRootDir(GuestDir):
    """``files/`` or ``volumes/<name>/``: the root of a view, resolved on first use."""

    __slots__ = ("_kind", "context", "volume_name")

    def __init__(
        self,
        tree: Tree,
        parent: Dir,
        name: bytes,
        context: GuestContext,
        *,
        volume_name: str | None,
        mtime_ns: int,
    ) -> None:
        Node.__init__(self, parent.child_ino(name), name, parent)
        self.tree = tree
        self.mtime_ns = mtime_ns
        self.error = None
        self._children = None
        self.context = context
        self.volume_name = volume_name
        self.path = b"/"
        self.st = None  # type: ignore[assignment]
        tree.register(self)

    async def _resolve(self) -> _ViewRoot:
        guest = self.context.require()
        if self.volume_name is None:
            view = await guest.files_view()
            if view is None:
                raise SnapfsError(
                    f"{self.context.vm.name}/{self.context.snap.name}: no operating system "
                    "found and more than one filesystem: see volumes/"
                )
        else:
            view = await guest.volume_view(self.volume_name)
        root = _ViewRoot(guest, view, self.ino)
        self.root = root
        self.st = await guest.getattr(view, b"/")
        return root

    async def build(self) -> None:
        if getattr(self, "root", None) is None:
            await self._resolve()
        await super().build()

    async def getattr(self) -> Attrs:
        st = self.st
        if st is None:
            # Not resolved yet: a stat of the directory must not launch an appliance.
            return (await Dir.getattr(self))._replace(mode=stat.S_IFDIR | 0o555)
        return _attrs(self.ino, st)

    # ls -l asks every entry for its ACL and SELinux label: answering those for an
    # unresolved view must not launch an appliance.
    async def listxattr(self) -> list[bytes]:
        if getattr(self, "root", None) is None:
            return []
        return await super().listxattr()

    async def getxattr(self, name: bytes) -> bytes:
        if getattr(self, "root", None) is None:
            raise SnapfsError("no such attribute", errno=errno.ENODATA)
        return await super().getxattr(name)


class VolumesDir(Dir):
    """``volumes/``: one directory per filesystem found on the snapshot's disks."""

    __slots__ = ("context",)

    def __init__(self, tree: Tree, parent: Dir, context: GuestContext, mtime_ns: int) -> None:
        super().__init__(tree, parent.child_ino(VOLUMES), VOLUMES, parent, mtime_ns=mtime_ns)
        self.context = context

    async def build(self) -> None:
        volumes = await self.context.require().volumes()
        children: dict[bytes, Node] = {}
        for volume in volumes:
            name = volume.name.encode()
            children[name] = ViewRootDir(
                self.tree,
                self,
                name,
                self.context,
                volume_name=volume.name,
                mtime_ns=self.mtime_ns,
            )
        self._children = children


class GuestFiles:
    """Adds ``files/`` and ``volumes/`` to snapshot directories; owns the contexts."""

    def __init__(self, pool: AppliancePool, settings: GuestfsSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.contexts: list[GuestContext] = []

    def add_to_snapshot(self, tree: Tree, snap_dir: Dir, vm: Vm, snap: Snapshot) -> None:
        disks_dir = tree.nodes.get(snap_dir.child_ino(b"disks"))
        if not isinstance(disks_dir, Dir) or disks_dir._children is None:
            return
        disk_files = [n for n in disks_dir._children.values() if isinstance(n, DiskFile)]
        if not disk_files:
            return
        context = GuestContext(vm, snap, disk_files, self.pool, self.settings)
        self.contexts.append(context)
        snap_dir.add(
            ViewRootDir(
                tree, snap_dir, FILES, context, volume_name=None, mtime_ns=snap_dir.mtime_ns
            )
        )
        snap_dir.add(VolumesDir(tree, snap_dir, context, snap_dir.mtime_ns))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for context in self.contexts:
                try:
                    await context.aclose()
                except Exception as exc:
                    log.error("closing guest session %s: %s", context.snap.name, exc)
