"""Read-around: a small random read of immutable data brings its whole window into the
kernel's page cache.

Owns when a read counts as random, the window read in its place, and the page-cache stores
of the window's rest (FUSE_NOTIFY_STORE through ``pyfuse3.notify_store``, in worker
threads), including stopping them before the FUSE session goes away.

Why: the kernel sends a random 4 KiB read as one 4 KiB FUSE request, and on this machine a
FUSE request through pyfuse3 + trio plus an NBD round trip costs more than nbdfuse's whole
read (docs/benchmarks.md). The kernel's own answer for random page faults on mapped files is
the same: it reads the read-ahead window around the faulting page ("read-around"). Here the
window is read from NBD in one request, the asked-for part is the reply, and the rest goes
into the page cache, so later reads nearby are page-cache hits that never reach the daemon.
Sequential readers are left to the kernel's read-ahead: a read that starts where the
previous read of the same file handle ended is served as asked.

Only for data that cannot change under the page cache (snapshot disks, ``keep_cache``):
storing pages of a writable file could overwrite newer data.

Thread rules: ``window_for`` and ``reply`` run on the trio loop and never block; stores run
in worker threads, because a store waits for page locks that the kernel holds while a read
of those pages is queued for this daemon, and only the loop can answer it. Hence also the
shutdown rule: stores must finish while the main loop still answers requests (``aclose``
before ``pyfuse3.terminate``), and after the main loop ended, a store that does not finish
is released by aborting the FUSE connection (``abort``) before the session is closed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pyfuse3
import trio

log = logging.getLogger(__name__)

# Stores run on at most this many worker threads (each is a copy into the page cache).
STORE_THREADS = 2
# A random read is served as asked while this many bytes wait to be stored: memory stays
# bounded when stores fall behind.
MAX_PENDING_BYTES = 32 << 20
# How long ``aclose`` waits for stores before it aborts the connection.
DRAIN_TIMEOUT_S = 5.0

StoreFn = Callable[[int, int, bytes], None]


class ReadAround:
    """Read-around for one mount: ``window`` bytes per random read (0: off)."""

    def __init__(self, window: int, nursery: trio.Nursery, *, store: StoreFn | None = None) -> None:
        self.window = max(0, window)
        self._nursery = nursery
        self._store_fn: StoreFn = store or pyfuse3.notify_store
        self._limiter = trio.CapacityLimiter(STORE_THREADS)
        self._ends: dict[int, int] = {}  # file handle → end of its previous read
        self._pending = 0
        self._pending_bytes = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closed = False
        self._warned = False
        self.reads = 0  # random reads served with their window
        self.stored_bytes = 0
        self.failed_stores = 0

    def window_for(self, fh: int, offset: int, size: int) -> tuple[int, int] | None:
        """The (offset, length) to read in place of this read, or None to read as asked."""
        previous_end = self._ends.get(fh)
        self._ends[fh] = offset + size
        window = self.window
        if (
            window == 0
            or size >= window
            or previous_end == offset  # sequential: the kernel's read-ahead has it
            or self._closed
            or self._pending_bytes >= MAX_PENDING_BYTES
        ):
            return None
        start = offset - offset % window
        end = -(-(offset + size) // window) * window
        return start, end - start

    def forget(self, fh: int) -> None:
        """The file handle was released."""
        self._ends.pop(fh, None)

    def reply(
        self, ino: int, start: int, data: bytes | bytearray | memoryview, offset: int, size: int
    ) -> memoryview:
        """The asked-for part of ``data`` (the window read at ``start``); the rest of the window
        is queued for the page cache of inode ``ino``.

        ``data`` may be a reused buffer: what is stored is copied before this returns.
        """
        view = memoryview(data)
        head = offset - start
        tail = min(head + size, len(view))
        pieces: list[tuple[int, bytes]] = []
        if head > 0:
            pieces.append((start, bytes(view[:head])))
        if tail < len(view):
            pieces.append((start + tail, bytes(view[tail:])))
        if pieces and not self._closed:
            self.reads += 1
            nbytes = sum(len(piece) for _, piece in pieces)
            self._pending += 1
            self._pending_bytes += nbytes
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._nursery.start_soon(self._store, ino, pieces, nbytes)
        return view[head:tail]

    async def _store(self, ino: int, pieces: list[tuple[int, bytes]], nbytes: int) -> None:
        try:
            await trio.to_thread.run_sync(self._store_sync, ino, pieces, limiter=self._limiter)
        finally:
            self._pending -= 1
            self._pending_bytes -= nbytes
            if self._pending == 0:
                self._idle.set()

    def _store_sync(self, ino: int, pieces: list[tuple[int, bytes]]) -> None:
        """In a worker thread: may wait for page locks of reads the loop is answering."""
        for offset, data in pieces:
            try:
                self._store_fn(ino, offset, data)
            except OSError as exc:
                self.failed_stores += 1
                # ENOENT: the kernel dropped the inode meanwhile (file closed and evicted);
                # ENODEV/ENOTCONN: the connection ended. Neither loses anything: a store is
                # only a hint, and the pages are read again when asked for.
                quiet = exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN)
                if not quiet and not self._warned:
                    self._warned = True
                    log.warning("read-around: cannot store pages of inode %d: %s", ino, exc)
                return
            self.stored_bytes += len(data)

    async def aclose(self, abort: Callable[[], bool] | None = None) -> None:
        """Stop storing and wait for the stores in flight.

        Call it while the main loop still answers requests. If stores are still running
        after ``DRAIN_TIMEOUT_S`` (the loop has stopped answering), ``abort`` ends the FUSE
        connection, which fails the reads whose pages they wait for, and they return.
        """
        self._closed = True
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await self._idle.wait()
            return
        aborted = abort() if abort is not None else False
        log.warning(
            "read-around: %d page-cache stores still waiting after %.0f s; %s",
            self._pending,
            DRAIN_TIMEOUT_S,
            "aborted the FUSE connection" if aborted else "cannot abort the FUSE connection",
        )
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await self._idle.wait()
            return
        # Not reached unless the kernel keeps the pages locked: shutting down beats hanging.
        log.error("read-around: %d page-cache stores did not end; going on", self._pending)

    def summary(self) -> str:
        return (
            f"read-around: {self.reads} random reads widened, "
            f"{self.stored_bytes / (1 << 20):.1f} MiB stored in the page cache"
            + (f", {self.failed_stores} stores failed" if self.failed_stores else "")
        )
