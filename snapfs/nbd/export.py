"""Disk exports: one qemu-nbd per image, a pool of AIO connections, lazy start, idle stop.

Owns ``DiskExport`` (one image: its server, its connections, its extent map, its failure
state) and ``ExportManager`` (all exports of a mount: the runtime directory, the nursery the
connection drivers run in, the idle reaper, and stopping everything at unmount).

Life of an export: started on first use (an open of the disk file, or a guest appliance
attaching), shared by every user, stopped after ``idle_timeout`` seconds without users and at
unmount. A connection that dies (server killed, I/O error) fails the reads in flight with
EIO; the export is then torn down and the next read starts it again, once. If that start
fails too, reads fail fast for ``RETRY_AFTER_S`` before another attempt, so a broken image
does not spawn a server per read.

Thread rules: all methods run on the trio loop. Blocking work (the NBD handshake, the block
status query) runs in worker threads; reads and writes use libnbd AIO on the loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nbd
import trio

from snapfs.config import NbdSettings
from snapfs.errors import BackendUnavailable, SnapfsError
from snapfs.nbd.client import ConnectionLost, NbdConnection, error_errno
from snapfs.nbd.extents import ExtentMap, dirty_ranges, query_extents
from snapfs.nbd.probe import bitmap_context
from snapfs.nbd.server import NbdkitRelay, QemuNbdServer, ServerSpec

log = logging.getLogger(__name__)

# The NBD protocol lets servers refuse requests over 32 MiB (qemu-nbd's maximum).
MAX_REQUEST = 32 << 20
# Zeros for hole reads and for filling holes inside a read (FUSE reads are at most 1 MiB;
# bigger internal reads fill in a loop).
_ZEROS = memoryview(bytes(4 << 20))
# Reusable read buffers per export, by request size (FUSE uses a handful of sizes), at most
# this many in all. Several per size: with fetch-ahead, two or three 1 MiB reads overlap, and
# a fresh 1 MiB buffer costs an mmap, page faults and zeroing (measured: ~15 % of the
# daemon's time in sequential data reads when the pool held one buffer per size).
_MAX_BUFFERS = 8
# How often a running export checks that its server process is still alive (a server
# that died while idle is then restarted before the read instead of failing it).
_LIVENESS_INTERVAL_S = 1.0
# After a failed (re)start, fail reads without retrying for this long.
RETRY_AFTER_S = 30.0
# Data reads bigger than this go out as pipelined pieces of this size (see
# NbdConnection.pread_pieces): qemu-nbd then reads one piece while sending the previous.
READ_PIECE = 256 << 10
# Sequential reads of immutable data: a read of at least this size that continues the previous
# read makes the export fetch the next range of about the same size at once, in the
# background, so that the server works on it while this reply is being copied into the page
# cache; the kernel's request for it then finds it under way or done. At most PREFETCH_MAX
# ranges held. A fetched range ends on a multiple of the largest power of two in the request
# size, and any request inside it is served from it: an uncached read into a buffer that does
# not start on a page boundary (a Python bytearray, rsync's) reaches the daemon as one
# request of 1 MiB - 16 bytes and one of 16 bytes, and ranges of exactly the request's size
# would never match the next request.
PREFETCH_MIN = 256 << 10
PREFETCH_MAX = 4
# How many ranges of a stream are fetched ahead of its latest request: with two, qemu-nbd
# still has work queued while the loop answers a request and receives the next range.
PREFETCH_DEPTH = 2
# Write-behind: a write is acknowledged once sent, before the server's reply, with up to this
# many bytes in flight per export. A writer at queue depth 1 (dd, cp) then streams instead of
# waiting a round trip per 1 MiB request. Errors are reported on the next write, flush or
# fsync of the export (as a page cache reports writeback errors); overlapping requests and
# reads of a range being written wait for it, so ordering is as if synchronous.
WRITE_BEHIND_MAX = 16 << 20
# Writes are sent by this many worker threads, each with a blocking libnbd handle of its own
# (when the server allows several connections): sending a 1 MiB write is a 1 MiB copy into
# the socket, and on the loop thread that copy competed with reading the next FUSE request.
WRITER_THREADS = 4
# Write-zeroes requests are split below the protocol's 32-bit length.
_ZERO_CHUNK = 1 << 30
# How often the reaper looks for idle exports.
REAP_INTERVAL_S = 5.0


# Threads for writer handles, all exports together (off trio's default thread limiter, so that
# a stream of writes does not starve other worker-thread jobs).
_WRITER_THREAD_LIMIT = trio.CapacityLimiter(16)


@dataclass
class _Prefetch:
    """A range being fetched ahead of its request (see PREFETCH_MIN)."""

    buf: bytearray
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


def _shutdown_handle(handle: Any, image: Path) -> None:
    try:
        if not handle.aio_is_dead() and not handle.aio_is_closed():
            handle.shutdown()
    except nbd.Error as exc:
        log.debug("shutdown of a writer of %s: %s", image, exc)


def _zero_fill(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        chunk = view[start : start + len(_ZEROS)]
        chunk[:] = _ZEROS[: len(chunk)]


class DiskExport:
    """One image served read-only (snapshot disks) or read-write (restore disks)."""

    def __init__(
        self,
        manager: ExportManager,
        key: str,
        image: Path,
        fmt: str,
        *,
        readonly: bool = True,
        uri: str | None = None,
        dirty_bitmap: str | None = None,
    ) -> None:
        self._manager = manager
        self.key = key
        self.image = image
        # An export of someone else's NBD server (a source listing NBD URIs): no qemu-nbd.
        self.uri = uri
        # A qemu:dirty-bitmap context naming what changed (NBD sources), and its ranges.
        self.dirty_bitmap = dirty_bitmap
        self.dirty: list[tuple[int, int]] | None = None
        self.format = fmt
        self.readonly = readonly
        self.socket_path = manager.runtime_dir / f"{key}.sock"
        self._server: QemuNbdServer | None = None
        # The unix-socket relay of a TCP/TLS ``uri`` for a guest appliance (``acquire_relay``):
        # up while it has users, never longer than the export's own connections.
        self.relay_socket_path = manager.runtime_dir / f"{key}.relay.sock"
        self._relay: NbdkitRelay | None = None
        self._relay_users = 0
        self._conns: list[NbdConnection] = []
        self._lock = trio.Lock()
        self.extents: ExtentMap | None = None
        self.size: int | None = None
        self.users = 0
        self.last_used = time.monotonic()
        self._in_flight = 0
        self._failed_at: float | None = None
        self._alive_checked = 0.0
        self._buffers: dict[int, list[bytearray]] = {}
        self._buffer_count = 0
        self._prefetched: dict[tuple[int, int], _Prefetch] = {}  # (offset, size) → fetch
        self._sequential_end = -1  # where the last read ended
        self._fetched_to = 0  # where the fetches ahead of the current stream end
        self._failure: str | None = None
        # Write-behind state: in-flight writes by id → (start, end); their total size; an
        # event set (and replaced) whenever one completes; the first error not yet reported.
        self._writes: dict[int, tuple[int, int]] = {}
        self._write_bytes = 0
        self._write_ids = itertools.count()
        self._write_done = trio.Event()
        self._write_error: SnapfsError | None = None
        self._writers: list[Any] = []  # idle blocking handles of the writer threads
        self._writer_limiter = trio.CapacityLimiter(WRITER_THREADS)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        if not self._conns:
            return False
        if self.uri is not None:
            return any(c.dead is None for c in self._conns)
        now = time.monotonic()
        if now - self._alive_checked < _LIVENESS_INTERVAL_S:
            return True
        # Polling the process costs a syscall: at most once a second.
        alive = self._server is not None and self._server.running
        self._alive_checked = now if alive else 0.0
        return alive

    async def acquire(self) -> None:
        """Register a user (an open file, an appliance) and make sure the server is up."""
        self.users += 1
        self.last_used = time.monotonic()
        try:
            await self.ensure_running()
        except BaseException:
            self.users -= 1
            raise

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        self.last_used = time.monotonic()

    @property
    def needs_relay(self) -> bool:
        """An export of a server a guest appliance cannot attach itself (TCP, TLS)."""
        if self.uri is None:
            return False
        parts = urlsplit(self.uri)
        return parts.scheme != "nbd+unix" or "socket" not in parse_qs(parts.query)

    async def acquire_relay(self) -> None:
        """``acquire``, and ``relay_socket_path`` accepts connections to ``uri`` on return."""
        assert self.uri is not None
        await self.acquire()
        try:
            async with self._lock:
                if not self._conns:
                    raise BackendUnavailable(f"{self.uri}: stopped while starting its relay")
                if self._relay is None or not self._relay.running:
                    await self._stop_relay()
                    self._relay = NbdkitRelay(self.uri, self.relay_socket_path)
                    await self._relay.start()
        except BaseException:
            self.release()
            raise
        self._relay_users += 1

    async def release_relay(self) -> None:
        """Undo ``acquire_relay``; the last user's release stops the relay."""
        self._relay_users = max(0, self._relay_users - 1)
        if not self._relay_users:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    await self._stop_relay()
        self.release()

    async def _stop_relay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.stop()

    async def ensure_running(self) -> None:
        if self.running:
            return
        async with self._lock:
            if self.running:
                return
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
                raise BackendUnavailable(f"{self.image}: {self._failure}")
            await self._teardown()
            try:
                await self._start()
            except BaseException as exc:
                await self._teardown()
                self._failed_at = time.monotonic()
                self._failure = str(exc)
                log.error("cannot serve %s: %s", self.image, exc)
                raise
            self._failed_at = None
            self._failure = None

    async def _connect(self, meta_contexts: tuple[str, ...] = ()) -> NbdConnection:
        if self.uri is not None:
            return await NbdConnection.connect_uri(self.uri, meta_contexts=meta_contexts)
        return await NbdConnection.connect_unix(str(self.socket_path), meta_contexts=meta_contexts)

    async def _start(self) -> None:
        settings = self._manager.settings
        started = time.monotonic()
        server: QemuNbdServer | None = None
        if self.uri is None:
            server = QemuNbdServer(
                ServerSpec(
                    image=self.image,
                    format=self.format,
                    socket_path=self.socket_path,
                    readonly=self.readonly,
                    discard=not self.readonly,
                )
            )
            self._server = server
            await server.start()
        if self.uri is not None and self._manager.prepare_uri is not None:
            # A source whose servers start on demand (a libvirt pull-mode backup job).
            await self._manager.prepare_uri(self.uri)
        contexts: tuple[str, ...] = (nbd.CONTEXT_BASE_ALLOCATION,)
        if self.dirty_bitmap is not None:
            contexts += (bitmap_context(self.dirty_bitmap),)
        try:
            first = await self._connect(contexts)
        except BackendUnavailable as exc:
            if server is None:
                raise
            reason = server.failure_reason()
            await server.stop()
            raise BackendUnavailable(f"{exc}; {reason}") from exc
        conns = [first]
        # Extra connections only where they are safe and welcome: our own read-only
        # qemu-nbd, or a server advertising multi-conn (another server may accept one
        # client at a time, and a writer without multi-conn needs one connection).
        ours_readonly = self.readonly and self.uri is None
        count = settings.connections if (ours_readonly or first.can_multi_conn) else 1
        for _ in range(count - 1):
            conns.append(await self._connect())
        writers: list[Any] = []
        if not self.readonly and first.can_multi_conn:
            for _ in range(WRITER_THREADS):
                writers.append((await self._connect()).handle)
        if self.extents is None and self.readonly:
            # Snapshot data is immutable: one block-status pass serves for the whole mount.
            # On the first connection, before its driver runs: servers may allow one client.
            self.extents = await trio.to_thread.run_sync(query_extents, first.handle, first.size)
            if self.dirty_bitmap is not None:
                self.dirty = await trio.to_thread.run_sync(
                    dirty_ranges, first.handle, first.size, self.dirty_bitmap
                )
        self.size = first.size
        for conn in conns:
            self._manager.nursery.start_soon(conn.run)
        self._conns = conns
        self._writers = writers
        log.info(
            "serving %s (%s, %d bytes, %d connections) in %.2f s",
            self.uri or self.image,
            self.format,
            first.size,
            len(conns),
            time.monotonic() - started,
        )

    @property
    def restartable_source(self) -> bool:
        """Each start is a new point in time (a live pull-mode job): nothing may be cached."""
        return self.uri is not None and self._manager.prepare_uri is not None

    async def _teardown(self) -> None:
        self._prefetched.clear()  # fetches under way fail with their connection
        self._fetched_to = 0
        if self.restartable_source:
            self.extents = None
            self.dirty = None
        with trio.CancelScope(shield=True):
            # The relay goes first: upstream (a job) may go away once the export is down.
            await self._stop_relay()
            # Writes acknowledged to their writers reach the server before it goes away.
            await self._drain_writes()
        conns, self._conns = self._conns, []
        writers, self._writers = self._writers, []
        with trio.CancelScope(shield=True):
            for handle in writers:
                await trio.to_thread.run_sync(_shutdown_handle, handle, self.image)
            if not self.readonly:
                # What was written must be on disk before the server goes away.
                for conn in conns:
                    if conn.dead is None and conn.can_flush:
                        try:
                            await conn.flush()
                        except Exception as exc:
                            log.error("flush of %s before stopping failed: %s", self.image, exc)
            for conn in conns:
                await conn.close()
            if self._server is not None:
                await self._server.stop()
                self._server = None

    async def stop(self) -> None:
        async with self._lock:
            await self._teardown()

    @property
    def idle(self) -> bool:
        return self.users == 0 and self._in_flight == 0 and bool(self._conns)

    # -- I/O -------------------------------------------------------------------------
    def _pick(self) -> NbdConnection:
        best: NbdConnection | None = None
        for conn in self._conns:
            if conn.dead is None and (best is None or conn.in_flight < best.in_flight):
                best = conn
                if not conn.in_flight:
                    break
        if best is None:
            raise ConnectionLost(f"{self.image}: no live NBD connection")
        return best

    async def _io_failed(self, exc: BaseException) -> None:
        """A connection died: drop the server so that the next request starts a new one."""
        reason = self._server.failure_reason() if self._server else ""
        log.error("I/O on %s failed: %s (%s)", self.image, exc, reason)
        await self.stop()

    def may_hold_data(self, offset: int, size: int) -> bool:
        """False only when the extent map says ``[offset, offset+size)`` is all holes."""
        return self.extents is None or self.extents.has_data(offset, size)

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        """The hole ranges of ``[start, end)`` (clipped to the disk); empty when unknown."""
        return self._ranges(start, end, data=False)

    def data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The data ranges of ``[start, end)`` (clipped to the disk); empty when unknown."""
        return self._ranges(start, end, data=True)

    def _ranges(self, start: int, end: int, *, data: bool) -> list[tuple[int, int]]:
        extents = self.extents
        if extents is None or self.size is None:
            return []
        end = min(end, self.size)
        if start >= end:
            return []
        return [(s.start, s.end) for s in extents.segments(start, end - start) if s.data == data]

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes of the disk at ``offset`` (short at the end of the disk); a fresh copy."""
        return bytes(await self.read_transient(offset, size))

    async def read_transient(self, offset: int, size: int) -> memoryview:
        """Like ``read``, into a reused buffer: valid only until the caller next awaits.

        For the FUSE read path, which hands the view to the kernel synchronously on return.
        Reusing buffers avoids allocating and zeroing a fresh MiB per request (a third of the
        daemon's time in sequential reads, measured).
        """
        await self.ensure_running()
        assert self.size is not None
        if offset >= self.size or size <= 0:
            return memoryview(b"")
        size = min(size, self.size - offset, MAX_REQUEST)
        if self._writes:
            await self._wait_writes(offset, offset + size)
        self.last_used = time.monotonic()
        extents = self.extents
        if extents is None:
            segments = [(offset, offset + size, True)]
        else:
            if size <= len(_ZEROS) and not extents.has_data(offset, size):
                self._sequential_end = offset + size
                return _ZEROS[:size]  # a hole: no round trip, no copy
            ahead = self._prefetch_after(offset, size)
            if ahead is not None:
                entry, skip, last = ahead
                await entry.done.wait()
                if entry.error is None:
                    if last:  # no later request reads from it: back to the pool
                        self._give_buffer(entry.buf)
                    return memoryview(entry.buf)[skip : skip + size]
                # The fetch failed: read it again below, which reports its own error.
            # Split only when the read goes to the server (not for a fetched range).
            segments = [(s.start, s.end, s.data) for s in extents.segments(offset, size)]
        # Out of the pool while this read fills it; back in when done (below).
        buf = self._take_buffer(size)
        view = memoryview(buf)
        self._in_flight += 1
        try:
            await self._fill(view, offset, segments)
        except ConnectionLost as exc:
            await self._io_failed(exc)
            raise
        finally:
            self._in_flight -= 1
            self._give_buffer(buf)
        return view

    def _take_buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes from the pool, or a new one (contents undefined)."""
        free = self._buffers.get(size)
        if free:
            self._buffer_count -= 1
            return free.pop()
        return bytearray(size)

    def _give_buffer(self, buf: bytearray) -> None:
        """Back into the pool (if it has room): only once no reader holds a view of it but
        the caller about to hand it to the kernel, which runs before any other task."""
        if self._buffer_count < _MAX_BUFFERS:
            self._buffers.setdefault(len(buf), []).append(buf)
            self._buffer_count += 1

    async def _fill(
        self, view: memoryview, offset: int, segments: list[tuple[int, int, bool]]
    ) -> None:
        """Fill ``view`` (the disk from ``offset``): zeros for holes, data from the server."""
        pieces: list[tuple[memoryview, int]] = []
        for start, end, data in segments:
            if not data:
                _zero_fill(view[start - offset : end - offset])
                continue
            for piece in range(start, end, READ_PIECE):
                piece_end = min(end, piece + READ_PIECE)
                pieces.append((view[piece - offset : piece_end - offset], piece))
        if len(pieces) == 1:
            await self._pick().pread_into(*pieces[0])
        elif pieces:
            await self._pick().pread_pieces(pieces)

    def _prefetched_range(self, offset: int, size: int) -> tuple[_Prefetch, int, bool] | None:
        """The fetch started for a range holding this read, if any: the fetch, where the read
        starts in it, and whether the read ends it (it is then forgotten)."""
        for (start, length), entry in self._prefetched.items():
            if start <= offset and offset + size <= start + length:
                last = offset + size == start + length
                if last:
                    del self._prefetched[(start, length)]
                return entry, offset - start, last
        return None

    def _prefetch_after(self, offset: int, size: int) -> tuple[_Prefetch, int, bool] | None:
        """The fetch already started for this read, if any (``_prefetched_range``); and when
        this read continues the previous one, start fetching the range after it (immutable
        exports only)."""
        hit = self._prefetched_range(offset, size)
        sequential = offset == self._sequential_end
        end = self._sequential_end = offset + size
        extents = self.extents
        if not sequential:
            self._fetched_to = 0  # a new stream (or none): its fetches start after its reads
        if not (sequential and size >= PREFETCH_MIN and self.readonly and extents is not None):
            return hit
        assert self.size is not None
        # Ranges follow each other from the end of the stream's last fetch (or of this read),
        # each ending on a multiple of the request size's largest power of two.
        unit = 1 << (size.bit_length() - 1)
        start = max(end, self._fetched_to)
        while start < min(end + PREFETCH_DEPTH * size, self.size):
            stop = min(-(-(start + size) // unit) * unit, self.size)
            self._fetched_to = stop
            if extents.has_data(start, stop - start):  # holes cost nothing to read
                self._fetch(extents, start, stop - start)
            start = stop
        return hit

    def _fetch(self, extents: ExtentMap, start: int, length: int) -> None:
        """Start fetching ``[start, start+length)`` in the background (``_prefetch``)."""
        while len(self._prefetched) >= PREFETCH_MAX:
            del self._prefetched[next(iter(self._prefetched))]  # the oldest: not asked for
        segments = [(s.start, s.end, s.data) for s in extents.segments(start, length)]
        entry = _Prefetch(self._take_buffer(length))
        self._prefetched[(start, length)] = entry
        self._manager.nursery.start_soon(self._prefetch, entry, start, segments)

    async def _prefetch(
        self, entry: _Prefetch, offset: int, segments: list[tuple[int, int, bool]]
    ) -> None:
        self._in_flight += 1
        try:
            await self._fill(memoryview(entry.buf), offset, segments)
        except Exception as exc:  # the read that wants it reads again and reports
            entry.error = exc
        finally:
            self._in_flight -= 1
            entry.done.set()

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """Send a write and return (write-behind); ``data`` must not change afterwards.

        An error of an earlier write-behind is raised here (or by the next flush).
        """
        await self.ensure_running()
        self._raise_write_error()
        end = offset + len(data)
        while self._writes and (
            self._write_bytes + len(data) > WRITE_BEHIND_MAX or self._overlaps(offset, end)
        ):
            await self._write_completed()
        self._raise_write_error()
        conn = self._pick()
        write_id = next(self._write_ids)
        self._writes[write_id] = (offset, end)
        self._write_bytes += len(data)
        self._in_flight += 1
        self.last_used = time.monotonic()
        self._manager.nursery.start_soon(self._write_behind, conn, write_id, offset, data)
        return len(data)

    async def _send_write(self, conn: NbdConnection, offset: int, data: bytes | memoryview) -> None:
        """One write, by a writer thread when there are any, else on ``conn`` (AIO)."""
        if not self._writers:
            await conn.pwrite(data, offset)
            return
        async with self._writer_limiter:
            handle = self._writers.pop()
            try:
                await trio.to_thread.run_sync(
                    handle.pwrite, data, offset, limiter=_WRITER_THREAD_LIMIT
                )
            except nbd.Error as exc:
                if handle.aio_is_dead() or handle.aio_is_closed():
                    raise ConnectionLost(f"NBD writer of {self.image} died: {exc}") from exc
                raise
            finally:
                self._writers.append(handle)

    async def _write_behind(
        self, conn: NbdConnection, write_id: int, offset: int, data: bytes | memoryview
    ) -> None:
        lost: ConnectionLost | None = None
        try:
            await self._send_write(conn, offset, data)
        except ConnectionLost as exc:
            self._record_write_error(exc, offset, len(data))
            lost = exc
        except Exception as exc:  # nbd.Error: the server refused it (ENOSPC, EIO…)
            self._record_write_error(exc, offset, len(data))
        finally:
            start, end = self._writes.pop(write_id)
            self._write_bytes -= end - start
            self._in_flight -= 1
            done, self._write_done = self._write_done, trio.Event()
            done.set()
        if lost is not None:
            # After the bookkeeping: stopping drains the writes in flight, this one included.
            await self._io_failed(lost)

    def _record_write_error(self, exc: BaseException, offset: int, count: int) -> None:
        log.error("write of %d bytes at %d to %s failed: %s", count, offset, self.image, exc)
        if self._write_error is None:
            self._write_error = SnapfsError(
                f"{self.image}: a write at offset {offset} failed: {exc}",
                errno=error_errno(exc),
            )

    def _raise_write_error(self) -> None:
        """Report (once) a failed write-behind."""
        exc, self._write_error = self._write_error, None
        if exc is not None:
            raise exc

    def _overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._writes.values())

    async def _write_completed(self) -> None:
        await self._write_done.wait()

    async def _wait_writes(self, start: int, end: int) -> None:
        """Wait until no in-flight write overlaps [start, end) (a read sees what was written)."""
        while self._overlaps(start, end):
            await self._write_completed()

    async def _drain_writes(self) -> None:
        while self._writes:
            await self._write_completed()

    async def zero(self, offset: int, count: int) -> None:
        """Make ``count`` bytes at ``offset`` read as zeros (NBD write-zeroes, trimming)."""
        await self.ensure_running()
        await self._wait_writes(offset, offset + count)
        self._raise_write_error()
        conn = self._pick()
        if not conn.can_zero:
            raise SnapfsError("the server cannot write zeroes", errno=errno.EOPNOTSUPP)
        end = offset + count
        self._in_flight += 1
        try:
            while offset < end:
                step = min(end - offset, _ZERO_CHUNK)
                await conn.zero(step, offset)
                offset += step
        except ConnectionLost as exc:
            await self._io_failed(exc)
            raise
        finally:
            self._in_flight -= 1

    async def flush(self) -> None:
        """Every write sent and answered (errors raised), then flushed by the server."""
        await self._drain_writes()
        self._raise_write_error()
        if not self.running:
            return
        for conn in self._conns:
            if conn.can_flush and conn.dead is None:
                await conn.flush()


class ExportManager:
    """All disk exports of one mount, and the runtime directory their sockets live in."""

    def __init__(
        self, runtime_dir: Path, nursery: trio.Nursery, settings: NbdSettings | None = None
    ) -> None:
        self.runtime_dir = runtime_dir
        self.nursery = nursery
        self.settings = settings or NbdSettings()
        self._exports: dict[str, DiskExport] = {}
        # Called with an export's URI before connecting to it: sources whose NBD servers
        # start on first access (libvirt pull-mode backups) start them here.
        self.prepare_uri: Callable[[str], Awaitable[None]] | None = None

    def export_for(self, image: Path, fmt: str, *, readonly: bool = True) -> DiskExport:
        """The export of ``image`` (created on first request, not started)."""
        # Socket names must stay short (108-byte limit): a hash of the image path.
        key = hashlib.sha256(f"{image}\0{fmt}\0{readonly}".encode()).hexdigest()[:16]
        export = self._exports.get(key)
        if export is None:
            export = DiskExport(self, key, image, fmt, readonly=readonly)
            self._exports[key] = export
        return export

    def export_for_uri(self, uri: str, dirty_bitmap: str | None = None) -> DiskExport:
        """The export of an NBD server somebody else runs (read-only use)."""
        key = hashlib.sha256(f"uri\0{uri}".encode()).hexdigest()[:16]
        export = self._exports.get(key)
        if export is None:
            export = DiskExport(
                self, key, Path(uri), "raw", readonly=True, uri=uri, dirty_bitmap=dirty_bitmap
            )
            self._exports[key] = export
        return export

    @property
    def exports(self) -> list[DiskExport]:
        return list(self._exports.values())

    async def reap_idle(self) -> None:
        """Stop servers nobody used for ``idle_timeout`` seconds (runs until cancelled)."""
        while True:
            await trio.sleep(min(REAP_INTERVAL_S, self.settings.idle_timeout / 2))
            now = time.monotonic()
            for export in self.exports:
                if export.idle and now - export.last_used >= self.settings.idle_timeout:
                    log.info("stopping idle server for %s", export.image)
                    await export.stop()

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for export in self.exports:
                with contextlib.suppress(Exception):
                    await export.flush()
                await export.stop()
