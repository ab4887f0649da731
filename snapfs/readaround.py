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
With the store process reading data (``store_data``), the window's rest is read and stored
by that process instead (``widen_by_process``): the loop then reads just the asked part.

Store-ahead for sequential streams: a reader going through a disk in order gets the pages
ahead of it stored (``ahead`` bytes ahead of its latest request): zeros for the holes, and
the data, which the store process reads over NBD connections of its own
(snapfs.storeproc), while the loop answers the kernel's requests. The fills (copies into
fresh page-cache pages) are the cost of a whole-disk read here, not the NBD reads
(docs/benchmarks.md, sessions 6 and 9). One page per ``gap`` (a quarter of ``ahead``) is
left out: the kernel asks for it when the reader gets there (it reads only the pages
missing from its read-ahead window), and that request is how the daemon keeps seeing how
far the reader got. Leaving out the first page of every read-ahead ``stripe`` instead
cost one round trip per MiB, for which the reader waits (measured: session 9).

Only for data that cannot change under the page cache (snapshot disks, ``keep_cache``):
storing pages of a writable file could overwrite newer data.

Thread rules: ``window_for`` and ``reply`` run on the trio loop and never block; stores run
on store threads of their own (fed by a queue: no trio round trip per store), because a
store waits for page locks that the kernel holds while a read of those pages is queued for
this daemon, and only the loop can answer it. Hence also the
shutdown rule: stores must finish while the main loop still answers requests (``aclose``
before ``pyfuse3.terminate``), and after the main loop ended, a store that does not finish
is released by aborting the FUSE connection (``abort``) before the session is closed.

Stored-ahead pages are queued one stripe per job, so several threads share a stream. The
daemon's own store threads did not make whole-disk reads faster (measured,
docs/benchmarks.md session 8): pyfuse3 writes replies with the GIL held, and the threads wait
on those copies. Store-ahead therefore goes to the store process (snapfs.storeproc, with
``threads`` threads of its own interpreter) when it runs; the daemon then runs one store
thread, for read-around windows (and holes the process cannot take), and ``threads`` of
them only without the process.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pyfuse3
import trio

from snapfs.storeproc import DATA, MAX_STORE, WINDOW, StoreProcess, fuse_device_fd

log = logging.getLogger(__name__)

# A random read is served as asked while this many bytes wait to be stored: memory stays
# bounded when stores fall behind.
MAX_PENDING_BYTES = 32 << 20
# How long ``aclose`` waits for stores before it aborts the connection.
DRAIN_TIMEOUT_S = 5.0

# How many recent random reads of a handle say whether it reads mostly holes (see
# ``worth_widening``): the counts are halved when they reach this, so recent reads weigh most.
HOLE_SAMPLE = 64
# A sequential read this large marks a read-ahead stream (the kernel's windows grow to the
# read-ahead size; small sequential reads are left alone).
MIN_STREAM_READ = 128 << 10
PAGE = 4096

StoreFn = Callable[[int, int, bytes | memoryview], None]
HolesFn = Callable[[int, int], list[tuple[int, int]]]
# (start, end) → the NBD unix socket the store process may read the file's data from, and
# the data ranges of [start, end); None where data is not to be read ahead.
DataFn = Callable[[int, int], tuple[str, list[tuple[int, int]]] | None]


class _Job(NamedTuple):
    """Pages queued for the store thread."""

    ino: int
    pieces: list[tuple[int, bytes | memoryview]]  # (offset, bytes)
    nbytes: int  # counted as pending: read-around windows only
    stream: int | None  # the file handle whose reads these are stored ahead of, if any


class ReadAround:
    """Read-around for one mount: ``window`` bytes per random read (0: off), and zeros
    stored ``ahead`` bytes ahead of sequential streams (0: off) whose kernel read-ahead
    windows are ``stripe`` bytes."""

    def __init__(
        self,
        window: int,
        *,
        ahead: int = 0,
        stripe: int = 1 << 20,
        store: StoreFn | None = None,
        threads: int = 1,
        data_ahead: bool = False,
    ) -> None:
        self.window = max(0, window)
        self.ahead = max(0, ahead)
        self.data_ahead = data_ahead
        self.threads = max(1, threads)
        self.set_stripe(stripe)
        self._store_fn: StoreFn = store or pyfuse3.notify_store
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        # Per file handle: end of its previous read (read by the store thread too: a dict
        # read under the GIL), and for a sequential stream its stripe phase and how far
        # store-ahead has been queued.
        self._ends: dict[int, int] = {}
        self._random: dict[int, list[int]] = {}  # file handle → [random reads, of holes only]
        self._phase: dict[int, int] = {}
        self._ahead_to: dict[int, int] = {}
        # Shared with the store thread, under the lock.
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        self._idle = threading.Event()
        self._idle.set()
        # The store process for holes (``start_store_process``), and its jobs not yet
        # acknowledged (counted in ``_pending`` too).
        self._process: StoreProcess | None = None
        self._process_pending = 0
        self._closed = False
        self._warned = False
        self.reads = 0  # random reads served with their window
        self.process_reads = 0  # of them, windows the store process read and stored
        self.stored_bytes = 0
        self.ahead_bytes = 0  # zeros stored ahead of sequential streams
        self.stale_bytes = 0  # ahead stores skipped: the reader had caught up
        self.process_bytes = 0  # of ahead_bytes, stored by the store process
        self.failed_stores = 0
        self.data_ahead_bytes = 0  # data stored ahead of sequential streams (store process)
        self.failed_data = 0
        self._warned_data = False

    def set_stripe(self, stripe: int) -> None:
        """The kernel's read-ahead window for this mount (once known, before any read)."""
        self.stripe = max(PAGE, stripe - stripe % PAGE)
        # The page left to the kernel: one per ``gap``, a quarter of the distance ahead.
        self.gap = max(1, self.ahead // 4 // self.stripe) * self.stripe
        self._zeros = bytes(self.stripe)

    def window_for(self, fh: int, offset: int, size: int) -> tuple[int, int] | None:
        """The (offset, length) to read in place of this read, or None to read as asked."""
        sequential = self._follow(fh, offset, size)
        window = self.window
        if (
            window == 0
            or size >= window
            or sequential  # the kernel's read-ahead has it
            or self._closed
            or self._pending_bytes >= MAX_PENDING_BYTES
        ):
            return None
        start = offset - offset % window
        end = -(-(offset + size) // window) * window
        return start, end - start

    def worth_widening(self, fh: int, holds_data: bool) -> bool:
        """Record whether a random read of ``fh`` (one ``window_for`` widened) touches data;
        whether to widen it.

        Only reads of data are widened (a hole costs no server read). And not while most of
        the handle's recent random reads fell on holes: such a reader is spread over a
        sparse disk, later reads seldom land near an earlier one, and each widened read
        fills 63 pages that nobody reads (measured: random reads over the mostly sparse
        bench image, docs/benchmarks.md session 6). Readers of a guest's filesystem, of a
        database file, read data, and keep read-around.
        """
        counts = self._random.setdefault(fh, [0, 0])
        counts[0] += 1
        counts[1] += not holds_data
        if counts[0] >= HOLE_SAMPLE:
            counts[0] //= 2
            counts[1] //= 2
        return holds_data and 2 * counts[1] <= counts[0]

    def _follow(self, fh: int, offset: int, size: int) -> bool:
        """Record this read of ``fh``; whether it continues the handle's sequential reads.

        Within a stream whose holes are stored ahead, the kernel asks only for what is not
        in the page cache: a read anywhere up to the stored-ahead end continues it.
        """
        previous_end = self._ends.get(fh)
        self._ends[fh] = offset + size
        if previous_end == offset or (
            fh in self._phase
            and previous_end is not None
            and previous_end < offset <= self._ahead_to.get(fh, 0)
        ):
            if fh not in self._phase and size >= MIN_STREAM_READ:
                self._phase[fh] = offset % self.stripe
            return True
        self._phase.pop(fh, None)
        self._ahead_to.pop(fh, None)
        return False

    def store_ahead(
        self, fh: int, ino: int, offset: int, size: int, holes: HolesFn,
        data: DataFn | None = None,
    ) -> None:  # fmt: skip
        """After a read of a sequential stream: queue stores of what lies ahead of it.

        From one stripe past this read (the kernel's next window, which it may be asking
        for already) to ``ahead`` bytes past it, in whole stripes, without the first page
        of each ``gap``: zeros for the ``holes``, and, when the store process runs with
        ``data_ahead`` and ``data`` names an NBD socket for them, the data ranges, which
        the process reads itself. Call after ``window_for`` for the same read.
        """
        phase = self._phase.get(fh)
        if phase is None or not self.ahead or self._closed:
            return
        stripe = self.stripe
        end = offset + size
        first = max(self._ahead_to.get(fh, 0), end + stripe)
        first += -(first - phase) % stripe  # up to a stripe boundary
        last = end + self.ahead
        last -= (last - phase) % stripe
        if last - first < stripe:
            return
        self._ahead_to[fh] = last
        zeros = memoryview(self._zeros)
        for pos, piece_end in self._stripe_pieces(holes(first, last), phase):
            if not self._submit_zeros(ino, pos, piece_end - pos):
                self._enqueue(_Job(ino, [(pos, zeros[: piece_end - pos])], 0, fh))
        if data is None or not self.data_ahead or self._process is None:
            return
        ahead_data = data(first, last)
        if ahead_data is not None:
            socket_path, ranges = ahead_data
            for pos, piece_end in self._stripe_pieces(ranges, phase):
                # Refused (pipe full, process gone): the kernel asks for it as usual.
                self._submit_data(socket_path, ino, pos, piece_end - pos)

    def _stripe_pieces(
        self, ranges: list[tuple[int, int]], phase: int
    ) -> Iterator[tuple[int, int]]:
        """``ranges`` cut at stripe boundaries, the first page of each ``gap`` left out (the
        kernel asks for it: how the daemon sees the reader's progress). One job per piece:
        the store threads (or the process's) share the stream."""
        stripe = self.stripe
        gap = self.gap
        for start, stop in ranges:
            pos = start
            while pos < stop:
                boundary = pos - (pos - phase) % stripe
                if pos == boundary and (boundary - phase) % gap == 0:
                    pos += PAGE
                    continue
                piece_end = min(stop, boundary + stripe)
                yield pos, piece_end
                pos = piece_end

    # -- the store process --------------------------------------------------------------
    def start_store_process(self) -> bool:
        """Start the store process (snapfs.storeproc), on this mount's ``/dev/fuse``. Call
        from the main thread after ``pyfuse3.init``. Whether it runs; if not, the store
        threads store the holes, and data is not stored ahead."""
        if not self.ahead or self._process is not None:
            return self._process is not None
        fd = fuse_device_fd()
        if fd is None:
            log.warning("store process: cannot tell this mount's /dev/fuse; using threads")
            return False
        try:
            self._process = StoreProcess.start(fd, self.threads, self._acked, self._gone)
        except OSError as exc:
            log.warning("store process: cannot start (%s); using threads", exc)
            return False
        log.info("store process pid %d: %d threads", self._process.pid, self.threads)
        return True

    def _submit_zeros(self, ino: int, offset: int, length: int) -> bool:
        return self._to_process(lambda process: process.submit(ino, offset, length))

    def _submit_data(self, socket_path: str, ino: int, offset: int, length: int) -> bool:
        return self._to_process(
            lambda process: process.submit_data(socket_path, ino, offset, length)
        )

    def _to_process(self, submit: Callable[[StoreProcess], bool]) -> bool:
        """One job for the store process, counted as pending unless it refuses it."""
        process = self._process
        if process is None:
            return False
        with self._lock:  # counted before the ack can arrive
            self._pending += 1
            self._process_pending += 1
            self._idle.clear()
        if submit(process):
            return True
        with self._lock:
            self._end_process_jobs(1)
        return False

    def _end_process_jobs(self, count: int) -> None:
        """``count`` store process jobs are no longer pending (under the lock)."""
        self._pending -= count
        self._process_pending -= count
        if self._pending == 0:
            self._idle.set()

    def _acked(self, kind: int, status: int, length: int) -> None:
        """A store process job ended (on its reader thread)."""
        read = kind in (DATA, WINDOW)  # the process read it from NBD itself
        with self._lock:
            self._end_process_jobs(1)
            if status == 0 and kind == WINDOW:
                self.stored_bytes += length
            elif status == 0 and kind == DATA:
                self.data_ahead_bytes += length
            elif status == 0:
                self.ahead_bytes += length
                self.process_bytes += length
            elif read:
                self.failed_data += 1
            else:
                self.failed_stores += 1
        if read and status != 0:
            # Its server stopped or restarted, or a read failed: the kernel asks the daemon
            # for those pages, whose read reports a real error to the reader.
            if not self._warned_data:
                self._warned_data = True
                log.info("read-around: store process cannot read data ahead: %s",
                         os.strerror(status))  # fmt: skip
            return
        quiet = status in (0, errno.ENOENT, errno.ENODEV, errno.ENOTCONN)
        if not quiet and not self._warned:
            self._warned = True
            log.warning("read-around: store process cannot store pages: %s", os.strerror(status))

    def _gone(self) -> None:
        """The store process ended (on its reader thread): its unacknowledged jobs are void."""
        with self._lock:
            self._end_process_jobs(self._process_pending)
        if not self._closed:
            log.warning("read-around: the store process ended; storing holes on threads")

    def forget(self, fh: int) -> None:
        """The file handle was released."""
        self._ends.pop(fh, None)
        self._random.pop(fh, None)
        self._phase.pop(fh, None)
        self._ahead_to.pop(fh, None)

    def widen_by_process(
        self, ino: int, window: tuple[int, int], offset: int, size: int, holes: HolesFn,
        data: DataFn,
    ) -> bool:  # fmt: skip
        """Have the store process read and store the rest of a random read's ``window``
        (from ``window_for``) over its own NBD connection, while the loop reads only the
        asked ``[offset, offset+size)``; whether it took the window. A miss then costs the
        loop one small NBD read, as in nbdfuse, and the window's read and its page fills run
        in the other process (docs/design.md, "Read-around"). Not without the process
        reading data (``store_data``), nor for a file it may not read (``data`` says None).
        """
        if self._process is None or not self.data_ahead or self._closed:
            return False
        start, length = window
        source = data(start, start + length)
        if source is None:
            return False
        socket_path, ranges = source
        # Data and holes tile the window up to the disk's end: where the window stops.
        stop = max((end for _, end in ranges + holes(start, start + length)), default=start)
        taken = False
        for piece_start, piece_end in ((start, offset), (offset + size, stop)):
            # One job stores at most MAX_STORE bytes (a window may be up to 16 MiB).
            for at in range(piece_start, piece_end, MAX_STORE):
                submit = functools.partial(
                    StoreProcess.submit_data, socket_path=socket_path, ino=ino, offset=at,
                    length=min(MAX_STORE, piece_end - at), kind=WINDOW,
                )  # fmt: skip
                taken |= self._to_process(submit)
        if taken:
            self.reads += 1
            self.process_reads += 1
        return taken

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
            self._enqueue(_Job(ino, list(pieces), nbytes, None))
        return view[head:tail]

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            self._pending += 1
            self._pending_bytes += job.nbytes
            self._idle.clear()
        if not self._workers:
            for number in range(self.daemon_threads):
                worker = threading.Thread(
                    target=self._store_loop, name=f"snapfs-store-{number}", daemon=True
                )
                worker.start()
                self._workers.append(worker)
        self._queue.put(job)

    @property
    def daemon_threads(self) -> int:
        """How many store threads the daemon itself runs: ``threads``, or one while the
        store process runs. Then they store only read-around windows (one per random read
        of data), and each more thread took the GIL from the loop: 20,000 random reads with
        4, 2 and 1 daemon threads took 4.22/2.88/2.46, 3.77/2.06/1.95 and 2.63/1.98/2.13 s
        (paired rounds, docs/benchmarks.md session 9)."""
        return 1 if self._process is not None else self.threads

    def _store_loop(self) -> None:
        """A store thread: one queued job after the other, until ``None``.

        A daemon thread: a store the kernel never lets finish must not keep the process.
        """
        while (job := self._queue.get()) is not None:
            ino, pieces, nbytes, stream = job
            try:
                self._store_sync(ino, pieces, stream)
            except Exception:
                log.exception("read-around: store thread error (the store is skipped)")
            finally:
                with self._lock:
                    self._pending -= 1
                    self._pending_bytes -= nbytes
                    if self._pending == 0:
                        self._idle.set()

    def _store_sync(
        self, ino: int, pieces: list[tuple[int, bytes | memoryview]], stream: int | None
    ) -> None:
        """On the store thread: may wait for page locks of reads the loop is answering.

        Pieces stored ahead of ``stream`` (a file handle) that the reader's requests have
        nearly reached are skipped: the kernel is about to ask for them (or has), and the
        loop's reply fills them.
        """
        for offset, data in pieces:
            if stream is not None and offset < self._ends.get(stream, 0) + self.stripe:
                with self._lock:
                    self.stale_bytes += len(data)
                continue
            try:
                self._store_fn(ino, offset, data)
            except OSError as exc:
                with self._lock:
                    self.failed_stores += 1
                # ENOENT: the kernel dropped the inode meanwhile (file closed and evicted);
                # ENODEV/ENOTCONN: the connection ended. Neither loses anything: a store is
                # only a hint, and the pages are read again when asked for.
                quiet = exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN)
                if not quiet and not self._warned:
                    self._warned = True
                    log.warning("read-around: cannot store pages of inode %d: %s", ino, exc)
                return
            with self._lock:  # several store threads count
                if stream is None:
                    self.stored_bytes += len(data)
                else:
                    self.ahead_bytes += len(data)

    async def aclose(self, abort: Callable[[], bool] | None = None) -> None:
        """Stop storing and wait for the stores in flight; then the store process (if any) ends.

        Call it while the main loop still answers requests. If stores are still running
        after ``DRAIN_TIMEOUT_S`` (the loop has stopped answering), ``abort`` ends the FUSE
        connection, which fails the reads whose pages they wait for, and they return.
        """
        try:
            await self._drain(abort)
        finally:
            if self._process is not None:
                # Idle by now (or stuck past the abort): it exits at the end of its input,
                # or is killed; reaped off the loop.
                await trio.to_thread.run_sync(self._process.close, DRAIN_TIMEOUT_S)

    async def _drain(self, abort: Callable[[], bool] | None) -> None:
        self._closed = True
        if await self.wait_idle():
            self._stop_threads()
            return
        aborted = abort() if abort is not None else False
        log.warning(
            "read-around: %d page-cache stores still waiting after %.0f s; %s",
            self._pending,
            DRAIN_TIMEOUT_S,
            "aborted the FUSE connection" if aborted else "cannot abort the FUSE connection",
        )
        if await self.wait_idle():
            self._stop_threads()
            return
        # Not reached unless the kernel keeps the pages locked: shutting down beats hanging.
        log.error("read-around: %d page-cache stores did not end; going on", self._pending)
        self._stop_threads()  # a thread ends whenever its store returns

    async def wait_idle(self) -> bool:
        """Whether the queued stores ended within ``DRAIN_TIMEOUT_S`` (waited for off the
        loop)."""
        if self._idle.is_set():
            return True
        ended: bool = await trio.to_thread.run_sync(
            self._idle.wait, DRAIN_TIMEOUT_S, cancellable=True
        )
        return ended

    def _stop_threads(self) -> None:
        for _ in self._workers:
            self._queue.put(None)  # each ends after the (already finished) queue

    def summary(self) -> str:
        return (
            f"read-around: {self.reads} random reads widened, "
            f"{self.stored_bytes / (1 << 20):.1f} MiB stored in the page cache "
            f"({self.process_reads} windows read by the store process); "
            f"{self.ahead_bytes / (1 << 20):.1f} MiB of holes stored ahead of sequential "
            f"reads ({self.process_bytes / (1 << 20):.1f} MiB of it by the store process, "
            f"{self.stale_bytes / (1 << 20):.1f} MiB skipped: the reader caught up); "
            f"{self.data_ahead_bytes / (1 << 20):.1f} MiB of data stored ahead"
            + (f" ({self.failed_data} reads failed)" if self.failed_data else "")
            + (f", {self.failed_stores} stores failed" if self.failed_stores else "")
        )
