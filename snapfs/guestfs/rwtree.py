"""RwGuestTree: a restore disk's guest filesystems, mounted read-write in the appliance.

The read API is ``GuestTree``'s (volumes, views, getattr/lookup/listdir/readlink/xattrs/read,
non-UTF-8 names included); this subclass mounts volumes read-write (no fallback to a
read-only mount: a write must never succeed into nothing) and adds the changes: create,
write, truncate, mkdir, rmdir, unlink, rename, symlink, link, mknod, chmod, chown, utimens,
setxattr/removexattr, fsync/sync and close.

Caching: the read-only tree caches forever; here every change keeps the cache exact or
marks what it could only derive. The job that makes a namespace change also stats what it
touched (create, mkdir, rename: the entry and its directory in one ``lstatnslist`` with
``.``, together with that directory's stale entries), and the loop puts those stats into
the cached listings; a listing that cannot be updated exactly (a hard link's other names, a
renamed directory's subtree) is dropped and refetched on next use. chmod, chown and utimens,
and a pwrite of an inode with one name, make no stat: the new attributes are derived from
the cached entry (the host's clock for ctime and a write's mtime, an estimate of st_blocks)
and the entry is marked stale; chmod, chown and utimens are even deferred to the next
appliance call (``RwGuestSession``). A stale entry is re-read, with the other stale entries
of its directory in one ``lstatnslist``, by the next create/rename in that directory, by a
listing of it, and by a getattr/lookup once it has been stale for ``stale_grace_s`` (1 s,
the kernel's attribute cache time for these entries): until then getattr shows the derived
attributes. So rsync's per-file sequence (create, fchmod, write, close, lstat, utimens,
chmod, rename) costs 3 appliance round trips, 8 libguestfs calls (was 16 calls in 9 round
trips). A new file's owner is set only when the appliance did not give it already. Hard
links and a directory rename stay O(names) (rare); every other update is O(1).

Write-behind: FUSE writes come in pieces of at most 128 KiB, and one ``pwrite`` per piece is
one appliance round trip. Contiguous writes to one guest inode are gathered on the loop and
sent when ``WRITE_BEHIND`` bytes are buffered, on fsync/flush/release, before anything else
touches the file (read, truncate, chmod, utimens, …) and before any namespace change
(rename, unlink, link, rmdir: a buffer remembers its path). They go out as ``pwrite`` calls
of ``PWRITE_PIECE`` bytes in one job. ``getattr`` shows the buffered end as the size, so the
kernel never shrinks a file being written. An error while sending (ENOSPC on a full disk) is
raised to the write that triggered the send and kept until the next fsync/flush reports it.
Measured under TCG (2 cores): 1 MiB pwrite ~30 MB/s, 128 KiB pwrite ~22 MB/s,
``upload_offset`` of 16 MiB ~26 MB/s (4 MiB: 13 MB/s), so pwrite stays.

Names: the Python binding can only pass UTF-8 paths. Reads of non-UTF-8 names work (shell
listing, bind-mount aliases, see tree.py); a change whose path is not UTF-8 fails with
EINVAL and says why in the log. Aliases pin a file (a bind mount makes it busy), so they are
unmounted before every namespace change.

Durability: ``fsync`` sends the file's buffered writes, runs ``sync`` in the appliance (the
guest kernel flushes its drive: an NBD flush to qemu-nbd) and then ``after_sync`` (the owner's
own NBD flush of the export), so what was fsynced is in the image file, not in a cache of
the appliance or of qemu-nbd.

A dead appliance (its qemu killed or crashed: libguestfs drops the handle back to the
config state, and every later call would fail): ``RwGuestSession`` notices it on the failed
call, logs why, and shuts the appliance down for good (the owner's ``after_shutdown`` flushes
the export), so the next access launches a new one, whose kernel replays the guest
filesystem's journal. The call that met the death fails with EIO, and so does the next
write/fsync/close of every file whose data had been sent since the last sync (it may be lost);
buffered data of those files is dropped, that of other files is kept for the new appliance.

Thread rules: as ``GuestTree``: async methods on the trio loop, libguestfs calls in jobs run
by ``GuestSession.call`` (a worker thread, serialized per session). Caches and write buffers
are only touched on the loop, and cache updates follow a job with no await in between, so the
session's FIFO order is the cache's order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from snapfs.errors import (
    BackendUnavailable,
    GuestfsError,
    IsADirectory,
    NotFound,
    SnapfsError,
    guess_errno,
)

from .model import DirEntry, GuestStat, View, Volume
from .session import GuestSession, LaunchState
from .settings import GuestfsSettings
from .shell import sh_bytes
from .tree import GuestTree, _btrfs_subvolume, _Dir, _join, _split

if TYPE_CHECKING:
    from .pool import AppliancePool

log = logging.getLogger(__name__)

T = TypeVar("T")

# Buffered bytes per file before they are sent: 8 pwrite pieces per job amortise the thread
# hop and the session lock; small enough that ENOSPC shows up soon after the disk fills.
WRITE_BEHIND = 8 << 20
# pwrite's message limit is 4 MiB (a 4 MiB buffer is refused); 1 MiB measured fastest.
PWRITE_PIECE = 1 << 20
# Buffered bytes across all files before everything is sent (memory cap).
_PENDING_MAX = 64 << 20
# How long getattr may show an entry derived after a change before re-reading it.
STALE_GRACE_S = 1.0
# Filesystems whose chmod/chown/utimens of an existing inode succeed for root (deferrable).
_POSIX_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
# g.utimens: a nanoseconds field of -2 leaves that time unchanged (UTIME_OMIT).
_UTIME_OMIT = -2


class ApplianceDied(GuestfsError):
    """The appliance's qemu went away under a call (killed, crashed): EIO."""

    def __init__(self, message: str, generation: int) -> None:
        super().__init__(message, errno=errno.EIO)
        self.generation = generation  # which launch died


def _appliance_alive(g: Any) -> bool:
    """After a failed call: is the handle still connected to a running appliance?

    libguestfs puts a handle whose qemu died back into the config state."""
    try:
        return bool(g.is_ready())
    except Exception:
        return False


@dataclass(frozen=True, slots=True)
class DeferredChange:
    """A metadata change (chmod, chown, utimens) already answered, applied with the next call.

    ``key`` is (volume index, guest inode) for error reports; ``what`` names it in the log."""

    key: tuple[int, int]
    what: str
    op: Callable[[Any, LaunchState], None]
    queued_at: float


class RwGuestSession(GuestSession):
    """A session with writable drives that survives the death of its appliance.

    A call that fails because the appliance is gone raises ``ApplianceDied`` (EIO), after
    the appliance is shut down (``after_shutdown`` runs: the owner flushes and releases its
    NBD export) and ``on_died`` has been told; the next call launches a new appliance.

    Deferred changes (``defer``): metadata changes the caller has already answered are
    applied, in the order they came, at the start of the next call's worker-thread job, in
    front of that call's own work, so they cost no round trip of their own (rsync's chmod and
    utimens ride on the rename that follows them). Every call carries the changes queued
    before it, so nothing the appliance does can see the guest without them; ``drain`` (the
    pool's tick: at most ``DEFER_MAX_S`` later) and an appliance shutdown apply what no call
    carried. A deferred change that fails is logged and handed to ``on_deferred_failed``.
    """

    def __init__(
        self,
        name: str,
        disks: Sequence[tuple[str, str]],
        settings: GuestfsSettings | None = None,
        pool: AppliancePool | None = None,
    ) -> None:
        super().__init__(name, disks, settings, pool, readonly=False)
        self.on_died: Callable[[ApplianceDied], None] | None = None
        self.on_deferred_failed: Callable[[DeferredChange, GuestfsError], None] | None = None
        self.deaths = 0
        self._deferred: list[DeferredChange] = []
        self.deferred_stats = {"queued": 0, "drains": 0}

    def defer(
        self, key: tuple[int, int], what: str, op: Callable[[Any, LaunchState], None]
    ) -> None:
        """Queue ``op`` for the start of the next call (see the class docstring)."""
        self._deferred.append(DeferredChange(key, what, op, trio.current_time()))
        self.deferred_stats["queued"] += 1

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def _apply_deferred_sync(
        self, g: Any, state: LaunchState, batch: Sequence[DeferredChange]
    ) -> list[tuple[DeferredChange, GuestfsError]]:
        """Apply ``batch`` in order (in the job's thread). A dead appliance stops it (the
        RuntimeError is raised); other failures are returned."""
        failed: list[tuple[DeferredChange, GuestfsError]] = []
        for change in batch:
            try:
                change.op(g, state)
            except GuestfsError as exc:
                failed.append((change, exc))
            except RuntimeError as exc:
                if not _appliance_alive(g):
                    raise
                message = str(exc)
                failed.append((change, GuestfsError(message, errno=guess_errno(message))))
        return failed

    def _report_deferred(self, failed: Sequence[tuple[DeferredChange, GuestfsError]]) -> None:
        for change, exc in failed:
            log.error(
                "guestfs %s: %s, already answered as done, failed in the appliance: %s",
                self.name,
                change.what,
                exc.message,
            )
            if self.on_deferred_failed is not None:
                self.on_deferred_failed(change, exc)

    async def call(self, fn: Callable[[Any, LaunchState], T], *, launch: bool = True) -> T:
        batch, self._deferred = self._deferred, []
        started = False  # the job ran (and with it the batch)
        failed: list[tuple[DeferredChange, GuestfsError]] = []

        def job(g: Any, state: LaunchState) -> T:
            nonlocal started
            started = True
            try:
                if batch:
                    failed.extend(self._apply_deferred_sync(g, state, batch))
                return fn(g, state)
            except Exception as exc:
                if _appliance_alive(g):
                    raise
                text = str(exc).strip().splitlines()
                raise ApplianceDied(
                    f"guestfs {self.name}: the appliance died (its qemu was killed or "
                    f"crashed): {text[0] if text else type(exc).__name__}",
                    state.generation,
                ) from exc

        try:
            return await super().call(job, launch=launch)
        except ApplianceDied as exc:
            # Applied or not, nothing of the batch was synced: it may be lost.
            self._report_deferred([(c, exc) for c in batch])
            batch, failed = [], []
            await self._died(exc)
            raise
        finally:
            if not started:
                # The job never ran (a launch failed, launch=False, cancelled): keep the batch
                # in front of what was queued meanwhile.
                self._deferred[:0] = batch
            self._report_deferred(failed)

    async def drain(self, older_than: float = 0.0) -> None:
        """Apply the deferred changes now if the oldest waited ``older_than`` seconds."""
        if not self._deferred or not self.launched:
            return
        if trio.current_time() - self._deferred[0].queued_at < older_than:
            return
        self.deferred_stats["drains"] += 1
        with contextlib.suppress(BackendUnavailable, GuestfsError):  # logged where raised
            await self.call(lambda g, state: None, launch=False)

    async def _shutdown_locked(self) -> None:
        # Deferred changes go in before the appliance stops (an idle or LRU shutdown).
        g, state, batch = self._g, self._state, self._deferred
        if g is not None and state is not None and batch:
            self._deferred = []
            try:
                failed = await trio.to_thread.run_sync(
                    self._apply_deferred_sync, g, state, batch, limiter=self._limiter
                )
            except RuntimeError as exc:  # the appliance is gone: any of them may be lost
                failed = [(c, GuestfsError(str(exc), errno=errno.EIO)) for c in batch]
            self._report_deferred(failed)
        await super()._shutdown_locked()

    async def _died(self, exc: ApplianceDied) -> None:
        with trio.CancelScope(shield=True):
            async with self._lock:
                # Only the launch that died (another caller may have relaunched already).
                if self._state is None or self._state.generation != exc.generation:
                    return
                self.deaths += 1
                log.error("%s; data not synced to it is lost; the next access starts a new "
                          "appliance", exc.message)
                if self.on_died is not None:
                    self.on_died(exc)
                lost, self._deferred = self._deferred, []
                self._report_deferred([(c, exc) for c in lost])
                await GuestSession._shutdown_locked(self)


@dataclass
class _Pending:
    """Contiguous buffered writes to one guest inode, sent through ``vpath``."""

    vol: Volume
    vpath: bytes
    start: int
    end: int
    parts: list[bytes] = field(default_factory=list)


class RwGuestTree(GuestTree):
    """The guest files of a restore disk, writable. ``session`` must be ``readonly=False``."""

    def __init__(self, session: GuestSession, *, ino_salt: bytes = b"") -> None:
        if session.readonly:
            raise ValueError("RwGuestTree needs a session with writable drives")
        # Reads go through the appliance: its page cache holds what the disk does not yet.
        super().__init__(session, read_raw=None, ino_salt=ino_salt, fast_path=False)
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._inflight_end: dict[tuple[int, int], int] = {}
        self._pending_bytes = 0
        self._flush_locks: dict[tuple[int, int], trio.Lock] = {}
        self._write_errors: dict[tuple[int, int], SnapfsError] = {}
        # Inodes whose data was sent to the appliance since its last sync (lost if it dies).
        self._unsynced: set[tuple[int, int]] = set()
        self._prepared_generation = -1
        self._closed = False
        # Cached entries whose metadata was derived locally after a change (chmod, chown,
        # utimens): right but for what only the guest knows (ctime). (volume, parent) →
        # names; volumes whose root is such. Re-read from the guest (one ``lstatnslist``
        # per directory) before getattr/lookup/listdir shows them, or with the next change
        # in their directory.
        self._stale: dict[tuple[int, bytes], dict[bytes, float]] = {}  # name → since when
        # A getattr/lookup shows a stale entry as derived for this long before it re-reads
        # it (the kernel caches attributes for as long: GUEST_TTL_S of restore_guest_vfs);
        # a listing, and a change in the same directory, re-read stale entries at once.
        self.stale_grace_s = STALE_GRACE_S
        self._stale_roots: set[int] = set()
        self.stats["derived"] = 0
        self.stats["refreshes"] = 0
        # The owner's NBD flush, run after each sync (fsync): the image file holds the data.
        self.after_sync: Callable[[], Awaitable[None]] | None = None
        if isinstance(session, RwGuestSession):
            session.on_died = self._appliance_died
            session.on_deferred_failed = self._deferred_failed

    def _deferrable(self, vol: Volume, vpath: bytes) -> bool:
        """Can a change of ``vpath`` wait? Only on filesystems where chmod, chown and utimens
        of an existing inode do not fail (vfat, ntfs refuse some: EPERM must reach the caller
        now), and not when the path cannot be passed (EINVAL; the appliance's mountpoints are
        ASCII)."""
        if vol.fstype not in _POSIX_FILESYSTEMS:
            return False
        try:
            vpath.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def _deferred_failed(self, change: DeferredChange, exc: GuestfsError) -> None:
        """A deferred change failed (or may be lost): the file's next flush/fsync/close
        reports it, and what the cache derived from it is re-read from the guest."""
        self._write_errors.setdefault(
            change.key, SnapfsError(f"{change.what}: {exc.message}", errno=exc.errno or errno.EIO)
        )
        index, guest_ino = change.key
        self._forget_inode_names(index, guest_ino)
        root = self._roots.get(index)
        if root is not None and root[0].guest_ino == guest_ino:
            self._stale_roots.add(index)

    def _appliance_died(self, exc: ApplianceDied) -> None:
        """The appliance is gone with whatever it had not synced: every file written since
        the last sync fails its next write/fsync/close with EIO; their buffered data is
        dropped (it would land after a lost part). Other buffered writes wait for the next
        appliance."""
        error = SnapfsError(
            f"{exc.message}; data written since the last fsync may be lost", errno=errno.EIO
        )
        lost = set(self._unsynced) | set(self._inflight_end)
        self._unsynced.clear()
        for key in lost:
            self._write_errors.setdefault(key, error)
            pending = self._pending.pop(key, None)
            if pending is not None:
                self._pending_bytes -= pending.end - pending.start

    # -- cache life ----------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop every cache (the appliance is gone; disk.img may be written before the next
        launch). Write buffers are kept: the session is pinned while files are open."""
        self._dirs.clear()
        self._dir_locks.clear()
        self._roots.clear()
        self._chunks.clear()
        self._stale.clear()
        self._stale_roots.clear()
        self._discovery = None
        self.session.discovery = None

    # -- mounting read-write -------------------------------------------------------------------

    _MOUNT_MODE = " read-write"

    def _mount_attempts(self, vol: Volume) -> list[tuple[str, str]]:
        # Read-write, with the filesystem's own log replay: no fallbacks.
        if vol.device.startswith("btrfsvol:"):
            dev, sub = _btrfs_subvolume(vol.device)
            return [(f"subvol={sub}", dev)]
        return [("", vol.device)]

    def _mounted_sync(self, g: Any, state: LaunchState) -> None:
        if self._prepared_generation != state.generation:
            # Modes are given exactly (the kernel applied the caller's umask already).
            g.umask(0)
            self._prepared_generation = state.generation

    def _apath_sync(self, g: Any, state: LaunchState, vol: Volume, vpath: bytes) -> str:
        """The appliance path of ``vpath`` for a change (mounting the volume), as str."""
        raw = self._mount_sync(g, state, vol).encode() + (b"" if vpath == b"/" else vpath)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestfsError(
                f"guestfs {self.session.name}: {vol.name}:{vpath!r}: the name is not UTF-8; "
                "the libguestfs Python binding cannot pass it, so it cannot be changed here "
                "(reads work)",
                errno=errno.EINVAL,
            ) from None

    def _lstat_sync(self, g: Any, vol: Volume, apath: str) -> GuestStat:
        return self._stat_from_statns(vol, g.lstatns(apath))

    def _drop_aliases_sync(self, g: Any, state: LaunchState) -> None:
        # A bind-mount alias makes its file busy (EBUSY on unlink/rename): release them all.
        for alias in list(state.aliases.values()):
            try:
                g.debug("sh", [f"umount /sysroot{alias}; rm -f /sysroot{alias}"])
            except RuntimeError as exc:
                log.warning("guestfs %s: cannot drop alias %s: %s", self.session.name, alias, exc)
        state.aliases.clear()

    # -- cache updates (loop only, right after the job that made the change) -------------------

    def _put(
        self,
        vol: Volume,
        vpath: bytes,
        st: GuestStat | None,
        *,
        link: bytes | None = None,
        xattrs: dict[bytes, bytes] | None = None,
        exact: bool = True,
    ) -> None:
        """Set (or with ``st`` None remove) the cached entry of ``vpath``; ``exact`` False:
        ``st`` was derived locally and is re-read from the guest before it is shown."""
        if vpath == b"/":
            if st is not None:
                old = self._roots.get(vol.index)
                keep = xattrs if xattrs is not None else (old[1] if old else {})
                self._roots[vol.index] = (st, keep)
                if exact:
                    self._stale_roots.discard(vol.index)
                else:
                    self._stale_roots.add(vol.index)
            return
        parent, name = _split(vpath)
        key = (vol.index, parent)
        listing = self._dirs.get(key)
        if listing is None:
            return  # fetched fresh on its first use
        listing.extents = None
        stale = self._stale.get(key)
        if st is None:
            listing.entries.pop(name, None)
            listing.links.pop(name, None)
            listing.xattrs.pop(name, None)
            if stale is not None:
                stale.pop(name, None)
            return
        listing.entries[name] = st
        if link is not None:
            listing.links[name] = link
        if xattrs is not None:
            if xattrs:
                listing.xattrs[name] = xattrs
            else:
                listing.xattrs.pop(name, None)
        if not exact:
            self._stale.setdefault(key, {}).setdefault(name, time.monotonic())
        elif stale is not None:
            stale.pop(name, None)
            if not stale:
                del self._stale[key]

    def _cached(self, vol: Volume, vpath: bytes) -> GuestStat | None:
        """The cached entry of ``vpath`` (None: not cached), without fetching."""
        if vpath == b"/":
            root = self._roots.get(vol.index)
            return root[0] if root is not None else None
        parent, name = _split(vpath)
        listing = self._dirs.get((vol.index, parent))
        return listing.entries.get(name) if listing is not None else None

    def _is_stale(self, vol: Volume, vpath: bytes) -> bool:
        if vpath == b"/":
            return vol.index in self._stale_roots
        parent, name = _split(vpath)
        return name in self._stale.get((vol.index, parent), ())

    def _must_refresh(self, vol: Volume, vpath: bytes) -> bool:
        """Stale for longer than ``stale_grace_s`` (a stale root: always)."""
        if vpath == b"/":
            return vol.index in self._stale_roots
        parent, name = _split(vpath)
        since = self._stale.get((vol.index, parent), {}).get(name)
        return since is not None and time.monotonic() - since >= self.stale_grace_s

    async def stale(self, view: View, path: bytes) -> bool:
        """Is the cached metadata of ``path`` partly derived (to be re-read from the guest)?"""
        vol, vpath = await self._locate(view, path)
        return self._is_stale(vol, vpath)

    def _stale_names(self, vol: Volume, parent: bytes) -> list[bytes]:
        """The stale names of a cached directory listing, UTF-8 ones only (the others are
        dropped with their listing: fetched fresh on next use)."""
        key = (vol.index, parent)
        names = self._stale.get(key)
        if not names:
            return []
        if key not in self._dirs:
            del self._stale[key]
            return []
        out = []
        for name in names:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                self._stale.pop(key, None)
                self._drop_listing(key)
                return []
            out.append(name)
        return out

    def _lstat_names_sync(
        self, g: Any, vol: Volume, apath: str, names: Sequence[bytes]
    ) -> list[GuestStat | None]:
        """One ``lstatnslist`` round trip: entries ``names`` of directory ``apath`` (b"." is
        the directory itself); None where a name is gone."""
        if not names:
            return []
        result = g.lstatnslist(apath, [n.decode("utf-8") for n in names])
        return [None if st["st_ino"] == -1 else self._stat_from_statns(vol, st)
                for st in result]

    def _apply_names(
        self, vol: Volume, parent: bytes, names: Sequence[bytes],
        stats: Sequence[GuestStat | None],
    ) -> None:
        """Put what ``_lstat_names_sync`` returned for names (not b".") of ``parent``."""
        listing = self._dirs.get((vol.index, parent))
        for name, st in zip(names, stats, strict=True):
            if name == b"." or st is None:
                continue
            if listing is not None and name in listing.entries:
                self._put(vol, _join(parent, name), st)

    async def _refresh(self, vol: Volume, vpath: bytes) -> None:
        """Re-read from the guest the stale entries of the directory holding ``vpath`` (or the
        stale root): one round trip."""
        if vpath == b"/":
            if vol.index not in self._stale_roots:
                return

            def root_job(g: Any, state: LaunchState) -> GuestStat:
                return self._lstat_sync(g, vol, self._apath_sync(g, state, vol, b"/"))

            st = await self._call(root_job)
            self.stats["refreshes"] += 1
            if vol.index in self._stale_roots:
                self._put(vol, b"/", st)
            return
        parent = _split(vpath)[0]
        names = self._stale_names(vol, parent)
        if not names:
            return

        def job(g: Any, state: LaunchState) -> list[GuestStat | None]:
            return self._lstat_names_sync(g, vol, self._apath_sync(g, state, vol, parent), names)

        stats = await self._call(job)
        self.stats["refreshes"] += 1
        self._apply_names(vol, parent, names, stats)
        listing = self._dirs.get((vol.index, parent))
        if listing is not None and any(
            st is None and name in listing.entries for name, st in zip(names, stats, strict=True)
        ):  # changed behind the cache: list the directory again
            self._drop_listing((vol.index, parent))

    def _update_inode(self, vol: Volume, vpath: bytes, st: GuestStat) -> None:
        """Every cached name of guest inode ``st.guest_ino`` gets ``st``: only ``vpath``
        unless the inode has other names (hard links; a directory has one name)."""
        if st.is_dir or st.nlink <= 1:
            self._put(vol, vpath, st)
            return
        for (index, parent), listing in self._dirs.items():
            if index != vol.index:
                continue
            for name, old in listing.entries.items():
                if old.guest_ino == st.guest_ino:
                    listing.entries[name] = st
                    stale = self._stale.get((index, parent))
                    if stale is not None:
                        stale.pop(name, None)
        root = self._roots.get(vol.index)
        if root is not None and root[0].guest_ino == st.guest_ino:
            self._roots[vol.index] = (st, root[1])
            self._stale_roots.discard(vol.index)

    def _drop_listing(self, key: tuple[int, bytes]) -> None:
        """Forget a cached listing (fetched fresh, stale entries and all, on next use)."""
        self._dirs.pop(key, None)
        self._stale.pop(key, None)

    def _forget_inode_names(self, index: int, guest_ino: int) -> None:
        """Drop the listings of volume ``index`` that hold a name of ``guest_ino`` (its
        nlink/ctime changed, or what was derived of it is wrong)."""
        stale = [
            key for key, listing in self._dirs.items()
            if key[0] == index
            and any(s.guest_ino == guest_ino for s in listing.entries.values())
        ]
        for key in stale:
            self._drop_listing(key)

    def _forget_subtree(self, vol: Volume, vpath: bytes) -> None:
        prefix = vpath.rstrip(b"/") + b"/"
        for key in [k for k in self._dirs if k[0] == vol.index
                    and (k[1] == vpath or k[1].startswith(prefix))]:
            self._drop_listing(key)

    def _drop_chunks(self, vol: Volume, guest_ino: int | None = None) -> None:
        for key in [k for k in self._chunks
                    if k[0] == vol.index and (guest_ino is None or k[1] == guest_ino)]:
            self._chunks.pop(key, None)

    # -- helpers --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SnapfsError(f"guestfs {self.session.name}: closed", errno=errno.EIO)

    async def _call(self, fn: Callable[[Any, LaunchState], T]) -> T:
        self._check_open()
        return await self.session.call(fn)

    async def _target(self, view: View, path: bytes) -> tuple[Volume, bytes]:
        """Where a new or removed name lives; a view's mountpoint cannot be one."""
        vol, vpath = await self._locate(view, path)
        if vpath == b"/":
            raise SnapfsError(f"{view.name}:{path!r} is a mountpoint", errno=errno.EBUSY)
        return vol, vpath

    def _parent_apath(self, apath: str) -> str:
        parent = apath.rsplit("/", 1)[0]
        return parent or "/"

    # -- reads that must see buffered writes ----------------------------------------------------

    def _overlay(self, vol: Volume, st: GuestStat) -> GuestStat:
        if not st.is_reg:
            return st
        key = (vol.index, st.guest_ino)
        end = max(
            self._pending[key].end if key in self._pending else 0,
            self._inflight_end.get(key, 0),
        )
        return dataclasses.replace(st, size=end) if end > st.size else st

    async def getattr(self, view: View, path: bytes) -> GuestStat:
        if self._stale or self._stale_roots:
            vol, vpath = await self._locate(view, path)
            if self._must_refresh(vol, vpath):
                await self._refresh(vol, vpath)
        st = await super().getattr(view, path)
        if not (self._pending or self._inflight_end):
            return st
        vol, _ = await self._locate(view, path)
        return self._overlay(vol, st)

    async def listdir(self, view: View, path: bytes) -> list[DirEntry]:
        if self._stale or self._stale_roots:
            vol, vpath = await self._locate(view, path)
            if self._stale.get((vol.index, vpath)):
                await self._refresh(vol, _join(vpath, b"x"))
            for _, mounted in view.mounts:  # a mountpoint shows its volume's root
                if mounted.index in self._stale_roots:
                    await self._refresh(mounted, b"/")
        entries = await super().listdir(view, path)
        if not (self._pending or self._inflight_end):
            return entries
        out = []
        for entry in entries:
            vol, _ = await self._locate(view, path.rstrip(b"/") + b"/" + entry.name)
            out.append(DirEntry(entry.name, self._overlay(vol, entry.stat)))
        return out

    async def read(self, view: View, path: bytes, offset: int, size: int) -> bytes:
        if self._pending or self._inflight_end:
            vol, _ = await self._locate(view, path)
            st = await super().getattr(view, path)
            await self._flush_key((vol.index, st.guest_ino))
        return await super().read(view, path, offset, size)

    # -- data -----------------------------------------------------------------------------------

    async def write(self, view: View, path: bytes, offset: int, data: bytes) -> int:
        """Buffer ``data`` at ``offset`` (sent later, see the module docstring)."""
        vol, vpath = await self._locate(view, path)
        st = await super().getattr(view, path)
        if st.is_dir:
            raise IsADirectory(f"{view.name}:{path!r} is a directory")
        if not st.is_reg:
            raise SnapfsError(f"{view.name}:{path!r} is not a regular file", errno=errno.EINVAL)
        key = (vol.index, st.guest_ino)
        error = self._write_errors.get(key)
        if error is not None:
            raise SnapfsError(error.message, errno=error.errno)
        if not data:
            return 0
        pending = self._pending.get(key)
        if pending is not None and (pending.end != offset or pending.vpath != vpath):
            await self._flush_key(key)
            pending = self._pending.get(key)  # a write that came meanwhile
            if pending is not None and (pending.end != offset or pending.vpath != vpath):
                await self._flush_key(key)
                pending = None
        if pending is None:
            pending = _Pending(vol, vpath, offset, offset)
            self._pending[key] = pending
        pending.parts.append(bytes(data))
        pending.end += len(data)
        self._pending_bytes += len(data)
        if pending.end - pending.start >= WRITE_BEHIND:
            await self._flush_key(key)
        elif self._pending_bytes > _PENDING_MAX:
            await self.flush_all()
        return len(data)

    async def _flush_key(self, key: tuple[int, int]) -> None:
        """Send the buffered writes of one guest inode (in order: one sender at a time)."""
        lock = self._flush_locks.setdefault(key, trio.Lock())
        async with lock:
            pending = self._pending.pop(key, None)
            if pending is None:
                return
            size = pending.end - pending.start
            self._pending_bytes -= size
            self._inflight_end[key] = pending.end
            self._unsynced.add(key)
            data = b"".join(pending.parts)
            pending.parts.clear()
            vol, vpath, start = pending.vol, pending.vpath, pending.start

            # With one name, the new size and times are derived (the entry goes stale, to be
            # re-read with its directory's other stale entries); a hard-linked inode is
            # re-read now, so that every name of it is updated.
            cached = self._cached(vol, vpath)
            derive = cached is not None and cached.nlink <= 1

            def job(g: Any, state: LaunchState) -> GuestStat | None:
                ap = self._apath_sync(g, state, vol, vpath)
                view = memoryview(data)
                done = 0
                while done < len(view):
                    n: int = g.pwrite(ap, bytes(view[done : done + PWRITE_PIECE]), start + done)
                    if n <= 0:
                        raise GuestfsError(f"pwrite {ap}: wrote nothing", errno=errno.EIO)
                    done += n
                return None if derive else self._lstat_sync(g, vol, ap)

            try:
                st = await self._call(job)
            except SnapfsError as exc:
                self._write_errors[key] = exc
                log.error("guestfs %s: writing %d bytes at %d of %s:%r failed: %s",
                          self.session.name, size, start, vol.name, vpath, exc.message)
                raise
            finally:
                self._inflight_end.pop(key, None)
                if not lock.statistics().tasks_waiting:
                    self._flush_locks.pop(key, None)
            if st is not None:
                self._update_inode(vol, vpath, st)
            else:
                cur = self._cached(vol, vpath)
                if cur is not None and cur.guest_ino == key[1]:
                    now = time.time_ns()
                    self.stats["derived"] += 1
                    self._put(
                        vol,
                        vpath,
                        dataclasses.replace(
                            cur,
                            size=max(cur.size, pending.end),
                            blocks=max(cur.blocks, _blocks_for(pending.end, cur.blksize)),
                            mtime_ns=now,
                            ctime_ns=now,
                        ),
                        exact=False,
                    )
            self._drop_chunks(vol, key[1])

    async def flush_all(self) -> None:
        """Send every buffered write (the first failure is raised after trying them all)."""
        first: SnapfsError | None = None
        for key in list(self._pending):
            try:
                await self._flush_key(key)
            except SnapfsError as exc:
                first = first or exc
        if first is not None:
            raise first

    async def flush(self, view: View, path: bytes) -> None:
        """Send the file's buffered writes; report (once) an error an earlier send hit."""
        vol, _ = await self._locate(view, path)
        try:
            st = await super().getattr(view, path)
        except NotFound:
            return
        key = (vol.index, st.guest_ino)
        try:
            await self._flush_key(key)
        finally:
            error = self._write_errors.pop(key, None)
        if error is not None:
            raise SnapfsError(error.message, errno=error.errno)

    async def fsync(self, view: View, path: bytes) -> None:
        """``flush`` and then sync the appliance (data reaches the NBD server's image)."""
        await self.flush(view, path)
        await self.sync()

    async def sync(self) -> None:
        """Everything buffered sent, synced by the appliance, then ``after_sync``."""
        await self.flush_all()
        covered = set(self._unsynced)  # what was sent before this sync (FIFO session)
        await self._call(lambda g, s: g.sync())
        self._unsynced -= covered
        if self.after_sync is not None:
            await self.after_sync()

    async def _before_change(self, vol: Volume, guest_ino: int | None) -> None:
        if guest_ino is not None:
            await self._flush_key((vol.index, guest_ino))

    async def _before_namespace_change(self) -> None:
        await self.flush_all()

    async def _inode_of(self, view: View, path: bytes) -> tuple[Volume, bytes, GuestStat]:
        vol, vpath = await self._locate(view, path)
        return vol, vpath, await super().getattr(view, path)

    # -- changes of one inode -------------------------------------------------------------------

    async def _change_inode(
        self,
        view: View,
        path: bytes,
        op: Callable[[Any, str], None],
        *,
        xattrs: bool = False,
        derive: Callable[[GuestStat], GuestStat | None] | None = None,
        what: str = "change",
    ) -> GuestStat:
        """Run ``op`` on the guest path. ``derive`` (the new metadata from the old, None when
        it cannot tell) saves the ``lstat``: the entry is then stale until re-read (its ctime
        is the guest's), and the change itself is deferred to the next appliance call (see
        ``RwGuestSession``). Only for an inode with one name: other names would go stale."""
        vol, vpath, st = await self._inode_of(view, path)
        await self._before_change(vol, st.guest_ino)
        if derive is not None and not xattrs:
            st = await super().getattr(view, path)  # after the flush: the current size
            if (st.is_dir or st.nlink <= 1) and derive(st) is not None:

                def quick(g: Any, state: LaunchState) -> None:
                    op(g, self._apath_sync(g, state, vol, vpath))

                session = self.session
                if isinstance(session, RwGuestSession) and self._deferrable(vol, vpath):
                    # Answered now, applied in front of the next appliance call.
                    self._check_open()
                    key = (vol.index, st.guest_ino)
                    session.defer(key, f"{what} of {vol.name}:{vpath!r}", quick)
                    self._unsynced.add(key)  # lost if the appliance dies before a sync
                else:
                    await self._call(quick)
                cur = self._cached(vol, vpath)
                derived = derive(cur) if cur is not None else None
                if derived is not None:
                    # The guest's ctime is its clock's when the change lands: the host's
                    # now is what a stat shows until the entry is re-read.
                    derived = dataclasses.replace(derived, ctime_ns=time.time_ns())
                    self.stats["derived"] += 1
                    self._put(vol, vpath, derived, exact=False)
                    return derived
                # Not cached any more (a listing dropped meanwhile): ask the guest.
                return await self.getattr(view, path)

        def job(g: Any, state: LaunchState) -> tuple[GuestStat, dict[bytes, bytes] | None]:
            ap = self._apath_sync(g, state, vol, vpath)
            op(g, ap)
            new = self._lstat_sync(g, vol, ap)
            attrs = None
            if xattrs:
                try:
                    attrs = {x["attrname"].encode(): bytes(x["attrval"])
                             for x in g.lgetxattrs(ap)}
                except UnicodeError:
                    attrs = None
            return new, attrs

        new, attrs = await self._call(job)
        self._update_inode(vol, vpath, new)
        if xattrs:
            if attrs is None:
                parent, _ = _split(vpath)
                self._drop_listing((vol.index, parent))
            else:
                self._put(vol, vpath, new, xattrs=attrs)
        return new

    async def truncate(self, view: View, path: bytes, size: int) -> GuestStat:
        if size < 0:
            raise SnapfsError("negative size", errno=errno.EINVAL)
        _, _, st = await self._inode_of(view, path)
        if st.is_dir:
            raise IsADirectory(f"{view.name}:{path!r} is a directory")
        new = await self._change_inode(view, path, lambda g, ap: g.truncate_size(ap, size))
        vol, _ = await self._locate(view, path)
        self._drop_chunks(vol, new.guest_ino)
        return new

    async def chmod(self, view: View, path: bytes, mode: int) -> GuestStat:
        _, _, st = await self._inode_of(view, path)
        if st.is_link:
            return st  # Linux has no mode on symlinks (lchmod is not supported)
        perms = mode & 0o7777
        return await self._change_inode(
            view, path, lambda g, ap: g.chmod(perms, ap),
            derive=lambda old: dataclasses.replace(old, mode=(old.mode & ~0o7777) | perms),
            what=f"chmod {perms:o}",
        )

    async def chown(self, view: View, path: bytes, uid: int, gid: int) -> GuestStat:
        """lchown; -1 leaves that id unchanged."""

        def derive(old: GuestStat) -> GuestStat | None:
            if old.mode & 0o6000 and not old.is_dir:
                return None  # the kernel drops setuid/setgid bits on chown: ask the guest
            return dataclasses.replace(
                old, uid=old.uid if uid == -1 else uid, gid=old.gid if gid == -1 else gid
            )

        return await self._change_inode(
            view, path, lambda g, ap: g.lchown(uid, gid, ap), derive=derive,
            what=f"chown {uid}:{gid}",
        )

    async def utimens(
        self, view: View, path: bytes, atime_ns: int | None, mtime_ns: int | None
    ) -> GuestStat:
        """Set access/modification times in nanoseconds (None: unchanged); not following
        symlinks."""

        def split(ns: int | None) -> tuple[int, int]:
            if ns is None:
                return 0, _UTIME_OMIT
            return ns // 1_000_000_000, ns % 1_000_000_000

        (a_s, a_ns), (m_s, m_ns) = split(atime_ns), split(mtime_ns)

        def derive(old: GuestStat) -> GuestStat:
            # What the filesystem keeps may be coarser (128-byte ext4 inodes: seconds): the
            # entry is stale, so a stat shows the guest's values.
            return dataclasses.replace(
                old,
                atime_ns=old.atime_ns if atime_ns is None else atime_ns,
                mtime_ns=old.mtime_ns if mtime_ns is None else mtime_ns,
            )

        return await self._change_inode(
            view, path, lambda g, ap: g.utimens(ap, a_s, a_ns, m_s, m_ns), derive=derive,
            what="utimens",
        )

    def _xattr_name(self, name: bytes) -> str:
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise SnapfsError(
                f"xattr name {name!r} is not UTF-8: the libguestfs binding cannot pass it",
                errno=errno.EINVAL,
            ) from None

    async def setxattr(self, view: View, path: bytes, name: bytes, value: bytes) -> GuestStat:
        xname = self._xattr_name(name)
        try:
            text: str | None = value.decode("utf-8") if b"\0" not in value else None
        except UnicodeDecodeError:
            text = None

        def op(g: Any, ap: str) -> None:
            if text is not None:
                g.lsetxattr(xname, text, len(value), ap)
            else:
                self._setxattr_shell(g, ap, name, value)

        return await self._change_inode(view, path, op, xattrs=True)

    def _setxattr_shell(self, g: Any, apath: str, name: bytes, value: bytes) -> None:
        """lsetxattr's value is a C string in the binding (UTF-8, NUL ends it): binary values
        go through setfattr in the appliance, as hex."""
        script = "; ".join([
            sh_bytes("F", b"/sysroot" + apath.encode()),
            sh_bytes("N", name),
            f'setfattr -h -n "$N" -v 0x{value.hex()} -- "$F" 2>&1',
            "echo rc=$?",
        ])
        out: str = g.debug("sh", [script])
        if not out.rstrip().endswith("rc=0"):
            message = f"setxattr {apath} {name!r}: {out.strip()}"
            raise GuestfsError(message, errno=guess_errno(message))

    async def removexattr(self, view: View, path: bytes, name: bytes) -> GuestStat:
        xname = self._xattr_name(name)
        if name not in await self._xattrs(view, path):
            raise SnapfsError(f"{path!r}: no attribute {name!r}", errno=errno.ENODATA)
        return await self._change_inode(
            view, path, lambda g, ap: g.lremovexattr(xname, ap), xattrs=True
        )

    # -- new names ------------------------------------------------------------------------------

    async def _make(
        self,
        view: View,
        path: bytes,
        op: Callable[[Any, str], None],
        uid: int,
        gid: int,
        link: bytes | None = None,
    ) -> GuestStat:
        vol, vpath = await self._target(view, path)
        parent, name = _split(vpath)
        # The new entry and its directory in one lstatnslist, with the directory's stale
        # entries; the owner is set only if the new inode did not get it already (the
        # appliance creates as root; a setgid directory gives its group).
        names = [b".", name, *[n for n in self._stale_names(vol, parent) if n != name]]

        def job(g: Any, state: LaunchState) -> list[GuestStat | None]:
            ap = self._apath_sync(g, state, vol, vpath)
            pap = self._parent_apath(ap)
            op(g, ap)
            stats = self._lstat_names_sync(g, vol, pap, names)
            st = stats[1]
            if st is not None and (uid not in (-1, st.uid) or gid not in (-1, st.gid)):
                g.lchown(uid, gid, ap)
                stats = self._lstat_names_sync(g, vol, pap, names)
            if stats[0] is None or stats[1] is None:
                raise GuestfsError(f"{ap}: gone right after it was made", errno=errno.EIO)
            return stats

        stats = await self._call(job)
        st, parent_st = stats[1], stats[0]
        assert st is not None and parent_st is not None
        self._put(vol, vpath, st, link=link, xattrs={})
        self._put(vol, parent, parent_st)
        self._apply_names(vol, parent, names[2:], stats[2:])
        if st.is_dir and (vol.index, vpath) not in self._dirs:
            self._dirs[(vol.index, vpath)] = _Dir({}, {}, {})  # just made: empty
        self._drop_chunks(vol, st.guest_ino)  # an inode number freed and reused
        return st

    async def create(
        self, view: View, path: bytes, mode: int, uid: int = -1, gid: int = -1
    ) -> GuestStat:
        """A new empty regular file (EEXIST if the name exists)."""
        ifreg = stat_mod.S_IFREG | (mode & 0o7777)
        return await self._make(view, path, lambda g, ap: g.mknod(ifreg, 0, 0, ap), uid, gid)

    async def mkdir(
        self, view: View, path: bytes, mode: int, uid: int = -1, gid: int = -1
    ) -> GuestStat:
        return await self._make(
            view, path, lambda g, ap: g.mkdir_mode(ap, mode & 0o7777), uid, gid
        )

    async def mknod(
        self, view: View, path: bytes, mode: int, rdev: int, uid: int = -1, gid: int = -1
    ) -> GuestStat:
        """A fifo, socket, character or block device (or a regular file) node."""
        kind = stat_mod.S_IFMT(mode)
        if kind not in (stat_mod.S_IFIFO, stat_mod.S_IFCHR, stat_mod.S_IFBLK,
                        stat_mod.S_IFSOCK, stat_mod.S_IFREG):
            raise SnapfsError(f"mknod of mode {mode:o}", errno=errno.EINVAL)
        major, minor = os.major(rdev), os.minor(rdev)
        full = kind | (mode & 0o7777)
        return await self._make(
            view, path, lambda g, ap: g.mknod(full, major, minor, ap), uid, gid
        )

    async def symlink(
        self, view: View, path: bytes, target: bytes, uid: int = -1, gid: int = -1
    ) -> GuestStat:
        try:
            text = target.decode("utf-8")
        except UnicodeDecodeError:
            raise SnapfsError(
                f"symlink target {target!r} is not UTF-8: the libguestfs binding cannot pass it",
                errno=errno.EINVAL,
            ) from None
        return await self._make(view, path, lambda g, ap: g.ln_s(text, ap), uid, gid,
                                link=target)

    async def link(self, view: View, existing: bytes, new: bytes) -> GuestStat:
        """A hard link ``new`` to ``existing`` (EXDEV across volumes)."""
        old_vol, old_vpath, st = await self._inode_of(view, existing)
        vol, vpath = await self._target(view, new)
        if vol is not old_vol:
            raise SnapfsError("hard link across filesystems", errno=errno.EXDEV)
        if st.is_dir:
            raise SnapfsError("hard link to a directory", errno=errno.EPERM)
        await self._before_namespace_change()

        def job(g: Any, state: LaunchState) -> tuple[GuestStat, GuestStat]:
            self._drop_aliases_sync(g, state)
            old_ap = self._apath_sync(g, state, vol, old_vpath)
            ap = self._apath_sync(g, state, vol, vpath)
            g.ln(old_ap, ap)
            return self._lstat_sync(g, vol, ap), self._lstat_sync(g, vol, self._parent_apath(ap))

        new_st, parent_st = await self._call(job)
        old_listing = self._dirs.get((vol.index, _split(old_vpath)[0]))
        old_xattrs = old_listing.xattrs.get(_split(old_vpath)[1]) if old_listing else None
        self._update_inode(vol, vpath, new_st)
        if old_listing is None or old_xattrs is not None or st.is_link:
            self._drop_listing((vol.index, _split(vpath)[0]))  # xattrs/target not known
        else:
            self._put(vol, vpath, new_st, xattrs={})
        self._put(vol, _split(vpath)[0], parent_st)
        return new_st

    # -- removed names --------------------------------------------------------------------------

    async def unlink(self, view: View, path: bytes) -> None:
        vol, vpath = await self._target(view, path)
        st = await super().getattr(view, path)
        if st.is_dir:
            raise IsADirectory(f"{view.name}:{path!r} is a directory")
        await self._remove(vol, vpath, st, lambda g, ap: g.rm(ap))

    async def rmdir(self, view: View, path: bytes) -> None:
        vol, vpath = await self._target(view, path)
        st = await super().getattr(view, path)
        if not st.is_dir:
            raise SnapfsError(f"{view.name}:{path!r}: not a directory", errno=errno.ENOTDIR)
        await self._remove(vol, vpath, st, lambda g, ap: g.rmdir(ap))
        self._forget_subtree(vol, vpath)

    async def _remove(
        self, vol: Volume, vpath: bytes, st: GuestStat, op: Callable[[Any, str], None]
    ) -> None:
        await self._before_namespace_change()

        def job(g: Any, state: LaunchState) -> GuestStat:
            self._drop_aliases_sync(g, state)
            ap = self._apath_sync(g, state, vol, vpath)
            op(g, ap)
            return self._lstat_sync(g, vol, self._parent_apath(ap))

        parent_st = await self._call(job)
        self._put(vol, vpath, None)
        if st.nlink > 1 and not st.is_dir:
            self._forget_inode_names(vol.index, st.guest_ino)
        self._put(vol, _split(vpath)[0], parent_st)
        self._drop_chunks(vol, st.guest_ino)
        self._write_errors.pop((vol.index, st.guest_ino), None)

    async def rename(
        self, view: View, old: bytes, new: bytes, *, noreplace: bool = False
    ) -> GuestStat:
        """rename(2): replaces ``new`` (a file, or an empty directory); EXDEV across volumes;
        ``noreplace`` fails with EEXIST instead."""
        vol, old_vpath = await self._target(view, old)
        new_vol, new_vpath = await self._target(view, new)
        if new_vol is not vol:
            raise SnapfsError("rename across filesystems", errno=errno.EXDEV)
        st = await super().getattr(view, old)
        if old_vpath == new_vpath:
            return st
        if st.is_dir and new_vpath.startswith(old_vpath.rstrip(b"/") + b"/"):
            raise SnapfsError("rename of a directory into itself", errno=errno.EINVAL)
        try:
            replaced: GuestStat | None = await super().getattr(view, new)
        except NotFound:
            replaced = None
        if replaced is not None and noreplace:
            raise SnapfsError(f"{view.name}:{new!r} exists", errno=errno.EEXIST)
        await self._before_namespace_change()
        old_parent, old_name = _split(old_vpath)
        new_parent, new_name = _split(new_vpath)
        # The moved entry and both directories (one lstatnslist each), with the stale
        # entries of those directories.
        new_names = [b".", new_name, *[n for n in self._stale_names(vol, new_parent)
                                       if n not in (new_name, old_name)]]
        old_names = [b"."] if old_parent == new_parent else [
            b".", *[n for n in self._stale_names(vol, old_parent) if n != old_name]]

        def job(g: Any, state: LaunchState) -> tuple[list[GuestStat | None], ...]:
            self._drop_aliases_sync(g, state)
            old_ap = self._apath_sync(g, state, vol, old_vpath)
            ap = self._apath_sync(g, state, vol, new_vpath)
            if noreplace and g.exists(ap):
                raise GuestfsError(f"rename: {ap}: File exists", errno=errno.EEXIST)
            g.rename(old_ap, ap)
            new_stats = self._lstat_names_sync(g, vol, self._parent_apath(ap), new_names)
            old_stats = (new_stats if old_parent == new_parent else
                         self._lstat_names_sync(g, vol, self._parent_apath(old_ap), old_names))
            if None in (new_stats[0], new_stats[1], old_stats[0]):
                raise GuestfsError(f"rename {old_ap} {ap}: gone right after", errno=errno.EIO)
            return new_stats, old_stats

        new_stats, old_stats = await self._call(job)
        new_st, new_parent_st, old_parent_st = new_stats[1], new_stats[0], old_stats[0]
        assert new_st is not None and new_parent_st is not None and old_parent_st is not None
        old_listing = self._dirs.get((vol.index, old_parent))
        link = old_listing.links.get(old_name) if old_listing else None
        xattrs = old_listing.xattrs.get(old_name, {}) if old_listing else None
        self._put(vol, old_vpath, None)
        if replaced is not None:
            self._put(vol, new_vpath, None)
            if replaced.is_dir:
                self._forget_subtree(vol, new_vpath)
            elif replaced.nlink > 1:
                self._forget_inode_names(vol.index, replaced.guest_ino)
            self._drop_chunks(vol, replaced.guest_ino)
        if old_listing is None or (st.is_link and link is None):
            self._drop_listing((vol.index, new_parent))
        else:
            self._put(vol, new_vpath, new_st, link=link, xattrs=xattrs)
        if st.is_dir:
            self._forget_subtree(vol, old_vpath)
        self._put(vol, old_parent, old_parent_st)
        self._put(vol, new_parent, new_parent_st)
        self._apply_names(vol, new_parent, new_names[2:], new_stats[2:])
        if old_parent != new_parent:
            self._apply_names(vol, old_parent, old_names[1:], old_stats[1:])
        return new_st

    # -- the end --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Send buffered writes, sync, unmount every volume, then shut the session down.

        Shielded: an unmount must finish even when the mount is being cancelled. Errors are
        logged and the shutdown goes on (libguestfs' autosync unmounts and syncs again)."""
        with trio.CancelScope(shield=True):
            if self._closed:
                return
            try:
                await self.flush_all()
            except SnapfsError as exc:
                log.error("guestfs %s: buffered writes lost at close: %s",
                          self.session.name, exc.message)
            if self.session.launched:
                def finish(g: Any, state: LaunchState) -> None:
                    self._drop_aliases_sync(g, state)
                    g.sync()
                    g.umount_all()
                    state.mounted.clear()

                started = time.monotonic()
                try:
                    await self._call(finish)
                except SnapfsError as exc:
                    log.error("guestfs %s: sync/unmount at close failed: %s",
                              self.session.name, exc.message)
                else:
                    deferred = getattr(self.session, "deferred_stats", {})
                    log.info(
                        "guestfs %s: synced and unmounted in %.1f s (appliance calls %d, "
                        "derived attributes %d, deferred changes %d, pool drains %d, "
                        "stale entries re-read %d times)",
                        self.session.name,
                        time.monotonic() - started,
                        self.session.calls,
                        self.stats["derived"],
                        deferred.get("queued", 0),
                        deferred.get("drains", 0),
                        self.stats["refreshes"],
                    )
            self._closed = True
            await self.session.aclose()


def _blocks_for(size: int, blksize: int) -> int:
    """512-byte blocks a file written densely up to ``size`` takes (an estimate until the
    guest's own figure is re-read)."""
    unit = blksize if blksize > 0 else 4096
    return -(-size // unit) * unit // 512
