"""Read-around: a small random read of immutable data brings its whole window into the
kernel's page cache.

Owns when a read counts as random, the window read in its place, and the page-cache stores
of the window's rest (FUSE_NOTIFY_STORE through ``pyfuse3.notify_store``, on a thread of
their own), including stopping them before the FUSE session goes away.

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
on one store thread of their own (fed by a queue: no trio round trip per store), because a
store waits for page locks that the kernel holds while a read of those pages is queued for
this daemon, and only the loop can answer it. Hence also the
shutdown rule: stores must finish while the main loop still answers requests (``aclose``
before ``pyfuse3.terminate``), and after the main loop ended, a store that does not finish
is released by aborting the FUSE connection (``abort``) before the session is closed.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable

import pyfuse3
import trio

log = logging.getLogger(__name__)

# A random read is served as asked while this many bytes wait to be stored: memory stays
# bounded when stores fall behind.
MAX_PENDING_BYTES = 32 << 20
# How long ``aclose`` waits for stores before it aborts the connection.
DRAIN_TIMEOUT_S = 5.0

StoreFn = Callable[[int, int, bytes], None]


class ReadAround:
    """Read-around for one mount: ``window`` bytes per random read (0: off)."""

    def __init__(self, window: int, *, store: StoreFn | None = None) -> None:
        self.window = max(0, window)
        self._store_fn: StoreFn = store or pyfuse3.notify_store
        self._queue: queue.SimpleQueue[tuple[int, list[tuple[int, bytes]], int] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._ends: dict[int, int] = {}  # file handle → end of its previous read
        # Shared with the store thread, under the lock.
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        self._idle = threading.Event()
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
            with self._lock:
                self._pending += 1
                self._pending_bytes += nbytes
                self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._store_loop, name="snapfs-read-around", daemon=True
                )
                self._thread.start()
            self._queue.put((ino, pieces, nbytes))
        return view[head:tail]

    def _store_loop(self) -> None:
        """The store thread: one queued window after the other, until ``None``.

        A daemon thread: a store the kernel never lets finish must not keep the process.
        """
        while (job := self._queue.get()) is not None:
            ino, pieces, nbytes = job
            try:
                self._store_sync(ino, pieces)
            except Exception:
                log.exception("read-around: store thread error (the store is skipped)")
            finally:
                with self._lock:
                    self._pending -= 1
                    self._pending_bytes -= nbytes
                    if self._pending == 0:
                        self._idle.set()

    def _store_sync(self, ino: int, pieces: list[tuple[int, bytes]]) -> None:
        """On the store thread: may wait for page locks of reads the loop is answering."""
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
        if await self._wait_idle():
            self._stop_thread()
            return
        aborted = abort() if abort is not None else False
        log.warning(
            "read-around: %d page-cache stores still waiting after %.0f s; %s",
            self._pending,
            DRAIN_TIMEOUT_S,
            "aborted the FUSE connection" if aborted else "cannot abort the FUSE connection",
        )
        if await self._wait_idle():
            self._stop_thread()
            return
        # Not reached unless the kernel keeps the pages locked: shutting down beats hanging.
        log.error("read-around: %d page-cache stores did not end; going on", self._pending)
        self._stop_thread()  # the thread ends whenever its store returns

    async def _wait_idle(self) -> bool:
        """Whether the stores ended within ``DRAIN_TIMEOUT_S`` (waited for off the loop)."""
        if self._idle.is_set():
            return True
        ended: bool = await trio.to_thread.run_sync(
            self._idle.wait, DRAIN_TIMEOUT_S, cancellable=True
        )
        return ended

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # it ends after the (already finished) queue

    def summary(self) -> str:
        return (
            f"read-around: {self.reads} random reads widened, "
            f"{self.stored_bytes / (1 << 20):.1f} MiB stored in the page cache"
            + (f", {self.failed_stores} stores failed" if self.failed_stores else "")
        )
