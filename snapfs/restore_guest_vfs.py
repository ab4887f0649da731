"""Writable guest filesystems of a restore disk: ``restore/<name>/files/`` and ``volumes/<v>/``.

Owns the nodes over ``snapfs.guestfs.rwtree.RwGuestTree`` and the life of each restore
disk's read-write appliance (``RestoreGuest``), created on first access to ``files/`` or
``volumes/`` (listing ``restore/<name>/`` launches nothing).

Consistency guard: the appliance attaches to the restore disk's own writable qemu-nbd (the
one ``disk.img`` uses; never two writers on one qcow2). Its session's ``before_launch`` hook
calls ``RestoreState.begin_guest_rw`` (EBUSY while ``disk.img`` is open for writing) and
acquires the export; ``after_shutdown`` releases the export, flushes it, forgets every
guest cache (``disk.img`` may be rewritten before the next launch) and calls
``end_guest_rw``. The appliance stays while any guest file is open (the session is pinned:
``busy``), and is shut down by the pool when idle, or at unmount (``RestoreGuests.aclose``:
buffered writes sent, ``sync``, ``umount_all``, shutdown, NBD flush). ``fsync`` of a guest
file is the appliance's ``sync`` and then an NBD flush of the export. A dead appliance is
shut down by its ``RwGuestSession`` (the same ``after_shutdown``), and the next access
launches a new one.

Nodes keep no guest metadata: every getattr/lookup asks the tree, whose cache is exact after
each change (rwtree.py); the kernel caches entries and attributes for ``GUEST_TTL_S`` and
keeps no pages across opens. A node remembers the paths it is known under (hard links,
renames update them), so an open file follows its renames.

Thread rules: on the trio loop; every libguestfs call is made by ``snapfs.guestfs`` in worker
threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from snapfs.errors import NotFound, SnapfsError
from snapfs.guestfs import AppliancePool, GuestfsSettings, GuestStat, View
from snapfs.guestfs.rwtree import RwGuestSession, RwGuestTree
from snapfs.vfs import AttrChanges, Attrs, Caller, Dir, File, Node, OpenFile, Tree, derive_inode

if TYPE_CHECKING:
    from snapfs.nbd.export import DiskExport
    from snapfs.restore_tree import RestoreDir, RestoreDiskFile

log = logging.getLogger(__name__)

FILES = b"files"
VOLUMES = b"volumes"
# Guest files of a restore disk change (through this mount only, but also by a relaunch
# after disk.img was written): short kernel caching, as for disk.img.
GUEST_TTL_S = 1.0
# renameat2 flags (linux/fs.h)
_RENAME_NOREPLACE = 1


class RestoreGuest:
    """The read-write appliance of one restore disk and its ``RwGuestTree``, made on first
    use."""

    def __init__(
        self, restore_dir: RestoreDir, pool: AppliancePool | None, settings: GuestfsSettings
    ) -> None:
        self.restore_dir = restore_dir
        self._pool = pool
        self._settings = settings
        self._export: DiskExport | None = None
        self._acquired = False
        self._guest_rw = False
        self._pins = 0
        self.session: RwGuestSession | None = None
        self.guest: RwGuestTree | None = None

    @property
    def name(self) -> str:
        return self.restore_dir.restore.name

    def require(self) -> RwGuestTree:
        if self.guest is not None:
            return self.guest
        restore = self.restore_dir.restore
        disk_file = self._disk_file()
        export = disk_file.export()
        self._export = export
        # Volume names follow the disk's name in the VM (vda1), as under the snapshot.
        disk_name = restore.source.disk if restore.source is not None else "vda"
        session = RwGuestSession(
            f"restore/{restore.name}",
            [(disk_name, str(export.socket_path))],
            self._settings,
            self._pool,
        )
        session.before_launch = self._before_launch
        session.after_shutdown = self._after_shutdown
        self.session = session
        self.guest = RwGuestTree(session, ino_salt=f"restore/{restore.name}".encode())
        self.guest.after_sync = self._flush_export
        return self.guest

    async def _flush_export(self) -> None:
        """After the appliance's sync (fsync of a guest file): qemu-nbd writes its caches
        (qcow2 metadata) and fdatasyncs the image, whatever the appliance's drive does with
        flushes."""
        if self._acquired and self._export is not None:
            await self._export.flush()

    def _disk_file(self) -> RestoreDiskFile:
        from snapfs.restore_tree import DISK_FILE, RestoreDiskFile

        children = self.restore_dir._children or {}
        node = children.get(DISK_FILE)
        if not isinstance(node, RestoreDiskFile):
            raise SnapfsError(f"restore disk {self.name} has no disk image")
        return node

    async def _before_launch(self) -> None:
        # EBUSY while disk.img is open for writing: the loser of the guard is the launch.
        self.restore_dir.state.begin_guest_rw(self.name)
        self._guest_rw = True
        try:
            assert self._export is not None
            await self._export.acquire()
            self._acquired = True
        except BaseException:
            self._guest_rw = False
            self.restore_dir.state.end_guest_rw()
            raise

    async def _after_shutdown(self) -> None:
        try:
            if self._acquired and self._export is not None:
                self._acquired = False
                try:
                    # The appliance flushed its drive on shutdown; this makes qemu-nbd write
                    # it to the qcow2 file before disk.img may be opened again.
                    await self._export.flush()
                except Exception as exc:
                    log.error("restore disk %s: NBD flush after the appliance: %s",
                              self.name, exc)
                finally:
                    self._export.release()
        finally:
            if self.guest is not None:
                self.guest.forget()
            if self._guest_rw:
                self._guest_rw = False
                self.restore_dir.state.end_guest_rw()

    def pin(self) -> None:
        """An open guest file keeps the appliance (the pool never evicts a busy session)."""
        self._pins += 1
        if self.session is not None:
            self.session.busy += 1

    def unpin(self) -> None:
        if self._pins > 0:
            self._pins -= 1
            if self.session is not None:
                self.session.busy -= 1

    async def aclose(self) -> None:
        """Send buffered writes, sync, unmount, stop the appliance (shielded)."""
        with trio.CancelScope(shield=True):
            if self.guest is not None:
                await self.guest.close()


class RestoreGuests:
    """Every restore disk's guest side in one mount; ``aclose`` at unmount (before the NBD
    servers stop: the appliance syncs into them)."""

    def __init__(self, pool: AppliancePool | None, settings: GuestfsSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.contexts: list[RestoreGuest] = []

    def add(self, tree: Tree, restore_dir: RestoreDir) -> RestoreGuest:
        context = add_guest_dirs(tree, restore_dir, self.pool, self.settings)
        self.contexts.append(context)
        return context

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for context in self.contexts:
                try:
                    await context.aclose()
                except Exception as exc:
                    log.error("closing restore disk %s's appliance: %s", context.name, exc)


def add_guest_dirs(
    tree: Tree, restore_dir: RestoreDir, pool: AppliancePool | None, settings: GuestfsSettings
) -> RestoreGuest:
    """Add ``files/`` and ``volumes/`` to ``restore_dir`` (a static Dir that already holds
    ``disk.img``); the returned context must be closed at unmount (``RestoreGuests`` does)."""
    context = RestoreGuest(restore_dir, pool, settings)
    mtime = restore_dir.mtime_ns
    restore_dir.add(RwViewRoot(tree, restore_dir, FILES, context, volume_name=None,
                               mtime_ns=mtime))
    restore_dir.add(RwVolumesDir(tree, restore_dir, context, mtime))
    return context


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
        ttl=GUEST_TTL_S,
    )


def _join(path: bytes, name: bytes) -> bytes:
    return path.rstrip(b"/") + b"/" + name


def _parent(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[0] or b"/"


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or name in (b".", b".."):
        raise SnapfsError(f"bad name {name!r}", errno=errno.EINVAL)
    if len(name) > 255:
        raise SnapfsError(f"name too long: {name[:40]!r}…", errno=errno.ENAMETOOLONG)


class _RwRoot:
    """What every node of one view shares: the tree, the view, the inode salt, and which
    node each known path is (with the known paths under each directory path, so that a
    rename moves a subtree without looking at every known path)."""

    __slots__ = ("by_path", "context", "guest", "kids", "salt", "view")

    def __init__(self, context: RestoreGuest, guest: RwGuestTree, view: View, salt: int) -> None:
        self.context = context
        self.guest = guest
        self.view = view
        self.salt = salt
        self.by_path: dict[bytes, _RwNode] = {}
        self.kids: dict[bytes, set[bytes]] = {}

    def ino(self, st: GuestStat) -> int:
        return derive_inode(self.salt, st.ino.to_bytes(8, "little"))

    def node(self, tree: Tree, parent: Dir, name: bytes, st: GuestStat) -> Node:
        """The node for ``st`` found as ``name`` in ``parent`` (the same node for hard links
        and for the same path seen again)."""
        assert isinstance(parent, _RwNode)
        path = _join(parent.path, name)
        ino = self.ino(st)
        existing = tree.nodes.get(ino)
        kind = stat.S_IFMT(st.mode)
        if (
            isinstance(existing, _RwNode)
            and existing.root is self
            and stat.S_IFMT(existing.kind) == kind
        ):
            existing.name = name
            existing.parent = parent
            self.bind(path, existing)
            return existing
        node: _RwNode
        if kind == stat.S_IFDIR:
            node = RwGuestDir(tree, ino, name, parent, self, path)
        elif kind == stat.S_IFLNK:
            node = RwGuestSymlink(ino, name, parent, self, path)
        else:
            node = RwGuestFile(tree, ino, name, parent, self, path, kind)
        tree.nodes[ino] = node
        self.bind(path, node)
        return node

    def bind(self, path: bytes, node: _RwNode) -> None:
        old = self.by_path.get(path)
        if old is not None and old is not node:
            self.unbind(path)
        self._set(path, node)
        if path in node.paths:
            node.paths.remove(path)
        node.paths.append(path)  # the most recent name last

    def _set(self, path: bytes, node: _RwNode) -> None:
        self.by_path[path] = node
        self.kids.setdefault(_parent(path), set()).add(path)

    def _pop(self, path: bytes) -> _RwNode | None:
        node = self.by_path.pop(path, None)
        if node is not None:
            parent = _parent(path)
            kids = self.kids.get(parent)
            if kids is not None:
                kids.discard(path)
                if not kids:
                    del self.kids[parent]
        return node

    def unbind(self, path: bytes) -> None:
        node = self._pop(path)
        if node is not None and path in node.paths and len(node.paths) > 1:
            node.paths.remove(path)  # the last name stays for messages

    def move(self, old: bytes, new: bytes) -> None:
        """``old`` was renamed to ``new``: every node at or under ``old`` follows (the known
        paths under it, found through ``kids``: as many steps as the subtree has)."""
        if old == new:
            return
        moved: list[bytes] = []
        todo = [old]
        while todo:
            path = todo.pop()
            if path in self.by_path:
                moved.append(path)
            todo.extend(self.kids.get(path, ()))
        self.unbind(new)
        nodes = [(path, self._pop(path)) for path in moved]
        for path, node in nodes:
            if node is None:
                continue
            target = new + path[len(old):]
            node.paths[:] = [target if p == path else p for p in node.paths]
            self._set(target, node)


class _RwNode(Node):
    """A node of a restore disk's guest filesystem (mixin data: its root and paths)."""

    __slots__ = ()
    root: _RwRoot
    paths: list[bytes]
    kind: int

    @property
    def path(self) -> bytes:
        return self.paths[-1]

    async def _stat(self) -> GuestStat:
        return await self.root.guest.getattr(self.root.view, self.path)

    async def getattr(self) -> Attrs:
        return _attrs(self.ino, await self._stat())

    async def setattr(self, changes: AttrChanges) -> Attrs:
        guest, view, path = self.root.guest, self.root.view, self.path
        st: GuestStat | None = None
        if changes.size is not None:
            st = await guest.truncate(view, path, changes.size)
        if changes.mode is not None:
            st = await guest.chmod(view, path, changes.mode)
        if changes.uid is not None or changes.gid is not None:
            uid = -1 if changes.uid is None else changes.uid
            gid = -1 if changes.gid is None else changes.gid
            st = await guest.chown(view, path, uid, gid)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            st = await guest.utimens(view, path, changes.atime_ns, changes.mtime_ns)
        if st is None:
            st = await self._stat()
        # Derived locally (chmod, chown, utimens) when the tree says the entry is stale: right
        # but for the ctime (the host's now until the guest's is re-read, within GUEST_TTL_S).
        # Cached by the kernel like any reply: with a TTL of 0 every write after an fchmod
        # made the kernel ask again (file_remove_privs), one appliance round trip per file.
        return _attrs(self.ino, st)

    async def listxattr(self) -> list[bytes]:
        return await self.root.guest.listxattr(self.root.view, self.path)

    async def getxattr(self, name: bytes) -> bytes:
        return await self.root.guest.getxattr(self.root.view, self.path, name)

    async def setxattr(self, name: bytes, value: bytes) -> None:
        await self.root.guest.setxattr(self.root.view, self.path, name, value)

    async def removexattr(self, name: bytes) -> None:
        await self.root.guest.removexattr(self.root.view, self.path, name)


class RwGuestDir(_RwNode, Dir):
    """A directory of a restore disk's guest filesystem: every change goes to the guest."""

    __slots__ = ("kind", "paths", "root")

    def __init__(
        self, tree: Tree, ino: int, name: bytes, parent: Dir, root: _RwRoot, path: bytes
    ) -> None:
        Node.__init__(self, ino, name, parent)
        self.tree = tree
        self.mtime_ns = tree.mounted_ns
        self.error = None
        self._children = None
        self.root = root
        self.paths = [path]
        self.kind = stat.S_IFDIR
        tree.nodes[ino] = self

    async def _ready(self) -> _RwRoot:
        return self.root

    async def fsync(self) -> None:
        # mkdir, rename, unlink… in this directory reach the image: the appliance syncs
        # (the whole filesystem: libguestfs has no per-directory sync) and NBD flushes.
        await self.root.guest.sync()

    async def children(self) -> dict[bytes, Node]:
        root = await self._ready()
        entries = await root.guest.listdir(root.view, self.path)
        return {e.name: root.node(self.tree, self, e.name, e.stat) for e in entries}

    async def lookup(self, name: bytes) -> Node:
        if name == b".":
            return self
        if name == b"..":
            return self.parent or self
        root = await self._ready()
        st = await root.guest.lookup(root.view, self.path, name)
        return root.node(self.tree, self, name, st)

    async def entries(self) -> list[tuple[bytes, Node]]:
        return list((await self.children()).items())

    # -- changes -----------------------------------------------------------------------------

    async def mkdir(self, name: bytes, mode: int, caller: Caller) -> Node:
        _check_name(name)
        root = await self._ready()
        st = await root.guest.mkdir(
            root.view, _join(self.path, name), mode & ~caller.umask, caller.uid, caller.gid
        )
        return root.node(self.tree, self, name, st)

    async def create(
        self, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, OpenFile]:
        _check_name(name)
        root = await self._ready()
        path = _join(self.path, name)
        try:
            st = await root.guest.create(
                root.view, path, mode & ~caller.umask, caller.uid, caller.gid
            )
        except SnapfsError as exc:
            # O_CREAT without O_EXCL on a name the kernel did not know yet: open it.
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            st = await root.guest.getattr(root.view, path)
            node = root.node(self.tree, self, name, st)
            if not isinstance(node, RwGuestFile):
                raise
            handle = await node.open(True)
            if flags & os.O_TRUNC:
                await root.guest.truncate(root.view, path, 0)
            return node, handle
        node = root.node(self.tree, self, name, st)
        assert isinstance(node, RwGuestFile)
        return node, await node.open(True)

    async def mknod(self, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        _check_name(name)
        root = await self._ready()
        kind, perms = stat.S_IFMT(mode), stat.S_IMODE(mode) & ~caller.umask
        st = await root.guest.mknod(
            root.view, _join(self.path, name), kind | perms, rdev, caller.uid, caller.gid
        )
        return root.node(self.tree, self, name, st)

    async def symlink(self, name: bytes, target: bytes, caller: Caller) -> Node:
        _check_name(name)
        root = await self._ready()
        st = await root.guest.symlink(
            root.view, _join(self.path, name), target, caller.uid, caller.gid
        )
        return root.node(self.tree, self, name, st)

    async def link(self, name: bytes, target: Node) -> Node:
        _check_name(name)
        root = await self._ready()
        if not isinstance(target, _RwNode) or target.root is not root:
            raise SnapfsError("hard link across filesystems", errno=errno.EXDEV)
        st = await root.guest.link(root.view, target.path, _join(self.path, name))
        return root.node(self.tree, self, name, st)

    async def unlink(self, name: bytes) -> None:
        root = await self._ready()
        path = _join(self.path, name)
        await root.guest.unlink(root.view, path)
        root.unbind(path)

    async def rmdir(self, name: bytes) -> None:
        root = await self._ready()
        path = _join(self.path, name)
        await root.guest.rmdir(root.view, path)
        root.unbind(path)

    async def rename(self, name: bytes, new_parent: Dir, new_name: bytes, flags: int) -> None:
        _check_name(new_name)
        root = await self._ready()
        if not isinstance(new_parent, RwGuestDir) or (await new_parent._ready()) is not root:
            raise SnapfsError("rename across filesystems", errno=errno.EXDEV)
        if flags & ~_RENAME_NOREPLACE:
            # RENAME_EXCHANGE / WHITEOUT: libguestfs has no renameat2.
            raise SnapfsError(f"rename flags {flags:#x} not supported", errno=errno.EINVAL)
        old, new = _join(self.path, name), _join(new_parent.path, new_name)
        await root.guest.rename(root.view, old, new, noreplace=bool(flags & _RENAME_NOREPLACE))
        node = root.by_path.get(old)
        root.move(old, new)
        if node is not None:
            node.name = new_name
            node.parent = new_parent


class _RwHandle(OpenFile):
    """An open guest file: writes are gathered by the tree (write-behind), sent on flush."""

    keep_cache = False  # written through this mount, and changed by relaunches
    # fuse_ops answers fsync with flush(): until it calls fsync() itself, every close syncs
    # the appliance, so that what was fsynced is in the image.
    sync_on_flush = False  # fsync syncs the appliance; a close only sends buffered writes

    def __init__(self, node: RwGuestFile, writable: bool) -> None:
        self._node = node
        self._writable = writable
        self._released = False
        node.root.context.pin()

    async def read(self, offset: int, size: int) -> bytes:
        node = self._node
        return await node.root.guest.read(node.root.view, node.path, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self._writable:
            raise SnapfsError("not open for writing", errno=errno.EBADF)
        node = self._node
        return await node.root.guest.write(node.root.view, node.path, offset, data)

    async def flush(self) -> None:
        if not self._writable:
            return
        if self.sync_on_flush:
            await self.fsync()
        else:
            node = self._node
            await node.root.guest.flush(node.root.view, node.path)

    async def fsync(self) -> None:
        node = self._node
        await node.root.guest.fsync(node.root.view, node.path)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._writable:
                node = self._node
                # Unlinked while open (NotFound): its buffered data has nowhere to go.
                with contextlib.suppress(NotFound):
                    await node.root.guest.flush(node.root.view, node.path)
        finally:
            self._node.root.context.unpin()


class RwGuestFile(_RwNode, File):
    """A regular file (or device node, fifo, socket) of a restore disk's guest filesystem."""

    __slots__ = ("kind", "paths", "root")

    def __init__(
        self,
        tree: Tree,
        ino: int,
        name: bytes,
        parent: Dir,
        root: _RwRoot,
        path: bytes,
        kind: int,
    ) -> None:
        Node.__init__(self, ino, name, parent)
        self.tree = tree
        self.mtime_ns = tree.mounted_ns
        self.root = root
        self.paths = [path]
        self.kind = kind

    async def open(self, writable: bool) -> OpenFile:
        if self.kind != stat.S_IFREG:
            raise SnapfsError("not a regular file", errno=errno.EACCES)
        return _RwHandle(self, writable)


class RwGuestSymlink(_RwNode):
    __slots__ = ("kind", "paths", "root")

    def __init__(self, ino: int, name: bytes, parent: Dir, root: _RwRoot, path: bytes) -> None:
        super().__init__(ino, name, parent)
        self.root = root
        self.paths = [path]
        self.kind = stat.S_IFLNK

    async def readlink(self) -> bytes:
        return await self.root.guest.readlink(self.root.view, self.path)


class RwViewRoot(RwGuestDir):
    """``files/`` or ``volumes/<name>/`` of a restore disk, resolved on first use."""

    __slots__ = ("context", "volume_name")

    def __init__(
        self,
        tree: Tree,
        parent: Dir,
        name: bytes,
        context: RestoreGuest,
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
        self.paths = [b"/"]
        self.kind = stat.S_IFDIR
        tree.register(self)

    def _resolved(self) -> bool:
        return getattr(self, "root", None) is not None

    async def _ready(self) -> _RwRoot:
        if self._resolved():
            return self.root
        guest = self.context.require()
        if self.volume_name is None:
            view = await guest.files_view()
            if view is None:
                raise SnapfsError(
                    f"restore disk {self.context.name}: no operating system found and not "
                    "exactly one filesystem: see volumes/"
                )
        else:
            view = await guest.volume_view(self.volume_name)
        if not self._resolved():
            root = _RwRoot(self.context, guest, view, self.ino)
            root.by_path[b"/"] = self
            self.root = root
        return self.root

    async def _stat(self) -> GuestStat:
        root = await self._ready()
        return await root.guest.getattr(root.view, b"/")

    async def getattr(self) -> Attrs:
        if not self._resolved() or self.context.session is None or (
            not self.context.session.launched
        ):
            # A stat of files/ must not launch an appliance (that would also make disk.img
            # read-only): a placeholder until someone looks inside.
            attrs = await Dir.getattr(self)
            return attrs._replace(mode=stat.S_IFDIR | 0o755, ttl=GUEST_TTL_S)
        return _attrs(self.ino, await self._stat())

    # ls -l asks every entry for its ACL and SELinux label: not worth a launch either.
    async def listxattr(self) -> list[bytes]:
        if not self._resolved():
            return []
        return await super().listxattr()

    async def getxattr(self, name: bytes) -> bytes:
        if not self._resolved():
            raise SnapfsError("no such attribute", errno=errno.ENODATA)
        return await super().getxattr(name)


class RwVolumesDir(Dir):
    """``restore/<name>/volumes/``: one writable directory per filesystem on the disk."""

    __slots__ = ("context",)

    def __init__(self, tree: Tree, parent: Dir, context: RestoreGuest, mtime_ns: int) -> None:
        super().__init__(tree, parent.child_ino(VOLUMES), VOLUMES, parent, mtime_ns=mtime_ns)
        self.context = context

    async def build(self) -> None:
        volumes = await self.context.require().volumes()
        children: dict[bytes, Node] = {}
        for volume in volumes:
            name = volume.name.encode()
            children[name] = RwViewRoot(
                self.tree, self, name, self.context, volume_name=volume.name,
                mtime_ns=self.mtime_ns,
            )
        self._children = children

    async def getattr(self) -> Attrs:
        return (await super().getattr())._replace(ttl=GUEST_TTL_S)
