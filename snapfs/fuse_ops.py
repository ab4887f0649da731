"""The pyfuse3 adapter: FUSE requests in, tree operations out, errnos back.

A protocol adapter only (as borg's fuse.py): what the tree looks like is ``vfs``; here we
translate inode numbers and ``EntryAttributes`` in, and turn every failure into a
``FUSEError`` — the only exception pyfuse3 lets a handler raise (anything else would end
``pyfuse3.main`` and with it the mount). The ``errno_boundary`` decorator does that:
``SnapfsError`` → its errno, ``nbd.Error`` → its errno or EIO, anything else → logged, EIO.

Thread rules: handlers run as trio tasks on the loop thread; they only do dict lookups and
await the tree's async methods, which keep blocking work off the loop.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from snapfs.errors import IsADirectory, NotADirectory, SnapfsError, to_errno
from snapfs.readaround import ReadAround
from snapfs.vfs import AttrChanges, Attrs, Caller, Dir, File, Node, OpenFile, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Errors that are an answer, not a fault: not worth more than a debug line.
_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.EROFS, errno.ENOTDIR})


# Requests served, by operation: logged at unmount (where a benchmark's time went).
REQUEST_COUNTS: collections.Counter[str] = collections.Counter()


def errno_boundary(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Let only FUSEError out of a handler; log why a request failed; count requests."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        REQUEST_COUNTS[name] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as exc:
            level = logging.DEBUG if exc.errno in _QUIET_ERRNOS else logging.ERROR
            log.log(level, "%s: %s", fn.__name__, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            code = to_errno(exc)
            if type(exc).__module__ == "nbd":
                log.error("%s: NBD error: %s", fn.__name__, exc)
            else:
                log.exception("%s: unexpected error", fn.__name__)
                code = errno.EIO
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def entry_attributes(attrs: Attrs) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attrs.ino
    entry.generation = 0
    entry.entry_timeout = attrs.ttl
    entry.attr_timeout = attrs.ttl
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.nlink
    entry.st_uid = attrs.uid
    entry.st_gid = attrs.gid
    entry.st_rdev = attrs.rdev
    entry.st_size = attrs.size
    entry.st_blksize = attrs.blksize
    entry.st_blocks = attrs.blocks
    entry.st_atime_ns = attrs.atime_ns
    entry.st_mtime_ns = attrs.mtime_ns
    entry.st_ctime_ns = attrs.ctime_ns
    return entry


def _wants_write(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


class Operations(pyfuse3.Operations):  # type: ignore[misc]
    """FUSE operations over a ``vfs.Tree``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, tree: Tree, read_around: ReadAround | None = None, *, disk_page_cache: bool = True
    ) -> None:
        super().__init__()
        self.tree = tree
        self.read_around = read_around
        # False: snapshot disk images are opened without the page cache ([nbd] page_cache).
        self.disk_page_cache = disk_page_cache
        self._fh_counter = itertools.count(1)
        self._open_files: dict[int, OpenFile] = {}
        self._open_inodes: dict[int, int] = {}  # fh → inode, for page-cache stores
        self._open_dirs: dict[int, tuple[Dir, list[tuple[bytes, Node]]]] = {}

    # -- names and attributes --------------------------------------------------------
    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        return entry_attributes(await node.getattr())

    @errno_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self.tree.get(parent_inode)
        if not isinstance(parent, Dir):
            raise NotADirectory("not a directory")
        return await self._entry(await parent.lookup(name))

    @errno_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._entry(self.tree.get(inode))

    @errno_boundary
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return await self.tree.get(inode).readlink()

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Nodes are never dropped while mounted (their inodes are derived, not counted).
        return None

    # -- directories -----------------------------------------------------------------
    @errno_boundary
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self.tree.get(inode)
        if not isinstance(node, Dir):
            raise NotADirectory("not a directory")
        # The listing is taken once per open, so a reader sees one consistent snapshot of it;
        # a failure here is the caller's error (never an empty directory).
        entries = await node.entries()
        fh = next(self._fh_counter)
        self._open_dirs[fh] = (node, entries)
        return fh

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        opened = self._open_dirs.get(fh)
        if opened is None:
            raise SnapfsError("bad directory handle", errno=errno.EBADF)
        entries = opened[1]
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if not pyfuse3.readdir_reply(token, name, await self._entry(node), index + 1):
                break

    @errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Without this pyfuse3 answers ENOSYS and the kernel reports success without a sync:
        # a mkdir or rename in a restore disk would not be durable until some file's fsync.
        opened = self._open_dirs.get(fh)
        if opened is None:
            raise SnapfsError("bad directory handle", errno=errno.EBADF)
        await opened[0].fsync()

    @errno_boundary
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------
    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self.tree.get(inode)
        if isinstance(node, Dir):
            raise IsADirectory("is a directory")
        if not isinstance(node, File):
            raise SnapfsError("cannot open this node", errno=errno.EINVAL)
        handle = await node.open(_wants_write(flags))
        if flags & os.O_TRUNC:
            # libfuse negotiates atomic O_TRUNC: no separate setattr comes for it.
            try:
                await node.setattr(AttrChanges(size=0))
            except BaseException:
                await handle.release()
                raise
        if self._uncached(handle, flags):
            # Reads go straight to the daemon and from its reply into the reader's buffer:
            # no page-cache pages to fill (docs/design.md, "Reads without the page cache").
            # keep_cache stays: the pages other opens have cached remain valid.
            handle.direct_io = True
        fh = next(self._fh_counter)
        self._open_files[fh] = handle
        self._open_inodes[fh] = inode
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache, direct_io=handle.direct_io)

    def _uncached(self, handle: OpenFile, flags: int) -> bool:
        """Whether a handle of immutable data is served without the page cache: its opener
        asked for O_DIRECT, or it is a snapshot disk and ``[nbd] page_cache`` is off."""
        if not handle.keep_cache:  # changing data: its handles keep their own rules
            return False
        return bool(flags & os.O_DIRECT) or (handle.nbd_disk and not self.disk_page_cache)

    def _handle(self, fh: int) -> OpenFile:
        handle = self._open_files.get(fh)
        if handle is None:
            raise SnapfsError("bad file handle", errno=errno.EBADF)
        return handle

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        handle = self._handle(fh)
        around = self.read_around
        # Without the page cache nothing would read the pages read-around or store-ahead
        # put there.
        if around is not None and not handle.direct_io:
            window = around.window_for(fh, off, size)
            if window is not None and around.worth_widening(fh, handle.may_widen(off, size)):
                ino = self._open_inodes[fh]
                if around.widen_by_process(ino, window, off, size, handle.holes, handle.data_ahead):
                    return await handle.read(off, size)
                data = await handle.read(*window)
                return around.reply(ino, window[0], data, off, size)
            # Queued before this read is answered: the store thread fills pages meanwhile.
            around.store_ahead(
                fh, self._open_inodes[fh], off, size, handle.holes, handle.data_ahead
            )
        return await handle.read(off, size)

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._handle(fh).write(off, buf)

    @errno_boundary
    async def flush(self, fh: int) -> None:
        await self._handle(fh).flush()

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._handle(fh).fsync()

    @errno_boundary
    async def release(self, fh: int) -> None:
        handle = self._open_files.pop(fh, None)
        self._open_inodes.pop(fh, None)
        if self.read_around is not None:
            self.read_around.forget(fh)
        if handle is not None:
            await handle.release()

    # -- the filesystem --------------------------------------------------------------
    @errno_boundary
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_namemax = 255
        return data

    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        return await self.tree.get(inode).getxattr(name)

    @errno_boundary
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return await self.tree.get(inode).listxattr()

    # -- changes: the node decides (read-only nodes answer EROFS) ------------------------
    def _dir(self, inode: int) -> Dir:
        node = self.tree.get(inode)
        if not isinstance(node, Dir):
            raise NotADirectory("not a directory")
        return node

    @staticmethod
    def _caller(ctx: Any) -> Caller:
        if ctx is None:
            return Caller(os.getuid(), os.getgid())
        return Caller(ctx.uid, ctx.gid, ctx.umask)

    @errno_boundary
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        changes = AttrChanges(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return entry_attributes(await self.tree.get(inode).setattr(changes))

    @errno_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = await self._dir(parent_inode).mknod(name, mode, rdev, self._caller(ctx))
        return await self._entry(node)

    @errno_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = await self._dir(parent_inode).mkdir(name, mode, self._caller(ctx))
        return await self._entry(node)

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._dir(parent_inode).unlink(name)

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._dir(parent_inode).rmdir(name)

    @errno_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = await self._dir(parent_inode).symlink(name, target, self._caller(ctx))
        return await self._entry(node)

    @errno_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        new_parent = self._dir(parent_inode_new)
        await self._dir(parent_inode_old).rename(name_old, new_parent, name_new, flags)

    @errno_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = await self._dir(new_parent_inode).link(new_name, self.tree.get(inode))
        return await self._entry(node)

    @errno_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, handle = await self._dir(parent_inode).create(name, mode, flags, self._caller(ctx))
        fh = next(self._fh_counter)
        self._open_files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache), await self._entry(node)

    @errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.tree.get(inode).setxattr(name, value)

    @errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.tree.get(inode).removexattr(name)
