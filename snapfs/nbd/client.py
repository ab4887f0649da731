"""One libnbd handle driven asynchronously on the trio loop (libnbd AIO).

Owns a handle and the task that moves its state machine. Commands are issued with the
non-blocking ``aio_*`` calls and several may be in flight on one handle (NBD pipelining);
a driver task waits for the socket with ``trio.lowlevel.wait_readable/wait_writable`` and
calls ``aio_notify_*``. No thread hop per request: on this machine that halves the cost of a
small read (measured: 440 µs vs 840 µs per 4 KiB read through ``trio.to_thread``).

Thread rules: everything here runs on the trio loop. The only blocking step, connecting
(a unix-socket connect and the NBD handshake), runs in a worker thread.

Errors: a failed command raises ``nbd.Error`` (it carries ``.errnum``). A dead connection
fails every command in flight with ``ConnectionLost`` and the handle is not reused.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nbd
import trio

from snapfs.errors import BackendUnavailable

log = logging.getLogger(__name__)


class ConnectionLost(BackendUnavailable):
    """The NBD connection died (server gone, protocol error): the handle is unusable."""


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    keepalive: Any = None  # the nbd.Buffer must outlive the command


class NbdConnection:
    """An NBD client connection with pipelined async commands."""

    def __init__(self, handle: Any, name: str) -> None:
        self._h = handle
        self.name = name
        self._fd: int = handle.aio_get_fd()
        _grow_send_buffer(self._fd)
        self._pending: dict[int, _Pending] = {}
        self._work = trio.Event()
        self._wait_scope: trio.CancelScope | None = None
        self._inline = False  # a requesting task is polling the socket (_poll_until_done)
        self.dead: BaseException | None = None
        self._driver_scope: trio.CancelScope | None = None
        self._driver_done = trio.Event()
        self.size: int = handle.get_size()
        self.can_flush: bool = bool(handle.can_flush())
        self.can_trim: bool = bool(handle.can_trim())
        self.can_zero: bool = bool(handle.can_zero())
        self.readonly: bool = bool(handle.is_read_only())
        self.can_multi_conn: bool = bool(handle.can_multi_conn())

    @classmethod
    async def _connect(
        cls, name: str, meta_contexts: tuple[str, ...], connect: Callable[[Any], None]
    ) -> NbdConnection:
        """A new handle with ``meta_contexts``, connected by ``connect`` in a worker thread."""

        def run() -> Any:
            h = nbd.NBD()
            # libnbd zeroes every read buffer first, in case a failed read were used anyway;
            # ours never are (an error fails the request), and the memset was 5 % of the
            # daemon's CPU in sequential reads of data (perf, docs/benchmarks.md session 6).
            h.set_pread_initialize(False)
            for ctx in meta_contexts:
                h.add_meta_context(ctx)
            connect(h)
            return h

        try:
            handle = await trio.to_thread.run_sync(run)
        except nbd.Error as exc:
            raise BackendUnavailable(f"cannot connect to NBD server {name}: {exc}") from exc
        return cls(handle, name)

    @classmethod
    async def connect_unix(
        cls, path: str, *, export_name: str = "", meta_contexts: tuple[str, ...] = ()
    ) -> NbdConnection:
        """Connect to a unix-socket export (the handshake runs in a worker thread)."""

        def connect(h: Any) -> None:
            h.set_export_name(export_name)
            h.connect_unix(path)

        return await cls._connect(path, meta_contexts, connect)

    @classmethod
    async def connect_uri(cls, uri: str, *, meta_contexts: tuple[str, ...] = ()) -> NbdConnection:
        """Connect to an NBD URI (nbd://, nbds://, nbd+unix://; TLS settings in the query)."""

        def connect(h: Any) -> None:
            # The URI comes from the user's own source file: let it name TLS key files.
            h.set_uri_allow_local_file(True)
            h.connect_uri(uri)

        return await cls._connect(uri, meta_contexts, connect)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def can_meta_context(self, ctx: str) -> bool:
        return bool(self._h.can_meta_context(ctx))

    @property
    def handle(self) -> Any:
        """The raw libnbd handle, for synchronous use from a worker thread only."""
        return self._h

    async def run(self) -> None:
        """Drive the handle until it dies or the surrounding scope is cancelled."""
        h = self._h
        try:
            with trio.CancelScope() as self._driver_scope:
                await self._drive(h)
        except nbd.Error as exc:
            self._die(ConnectionLost(f"NBD connection {self.name} failed: {exc}"))
        finally:
            self._die(ConnectionLost(f"NBD connection {self.name} closed"), expected=True)
            self._driver_done.set()

    async def _drive(self, h: Any) -> None:
        while True:
            if not self._pending or self._inline:
                # Nothing to do, or a requesting task is polling the socket itself.
                self._work = trio.Event()
                await self._work.wait()
                continue
            with trio.CancelScope() as self._wait_scope:
                await self._step(h)
            self._wait_scope = None
            self._reap()

    async def _step(self, h: Any) -> None:
        """Wait for the socket in the direction libnbd needs, then let libnbd proceed."""
        if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            await trio.lowlevel.wait_writable(self._fd)
            h.aio_notify_write()
        else:
            await trio.lowlevel.wait_readable(self._fd)
            h.aio_notify_read()

    def _reap(self) -> None:
        h = self._h
        for cookie in list(self._pending):
            try:
                finished = h.aio_command_completed(cookie)
            except nbd.Error as exc:
                entry = self._pending.pop(cookie)
                entry.error = exc
                entry.done.set()
                continue
            if finished:
                self._pending.pop(cookie).done.set()
        if self._pending and h.aio_is_dead():
            self._die(ConnectionLost(f"NBD connection {self.name} died: {h.get_error() or ''}"))

    def _die(self, exc: BaseException, *, expected: bool = False) -> None:
        if self.dead is None:
            self.dead = exc
            if not expected:
                log.warning("%s", exc)
        for entry in self._pending.values():
            entry.error = exc
            entry.done.set()
        self._pending.clear()

    def _send(self, issue: Callable[[], int]) -> int:
        """Send one command (non-blocking); its cookie."""
        if self.dead is not None:
            raise self.dead
        try:
            return issue()
        except nbd.Error as exc:
            if self._h.aio_is_dead() or self._h.aio_is_closed():
                self._die(ConnectionLost(f"NBD connection {self.name} died: {exc}"))
                raise self.dead from exc  # type: ignore[misc]
            raise

    def _issue(self, issue: Callable[[], int], keepalive: Any) -> _Pending:
        """Send one command; its entry completes when the reply is in."""
        entry = _Pending(keepalive=keepalive)
        self._pending[self._send(issue)] = entry
        return entry

    async def _await(self, entries: list[_Pending]) -> None:
        """Wait (the driver task polls) until every entry completed; raise the first error."""
        with trio.CancelScope(shield=True):
            # A command cannot be withdrawn once sent; its buffer must outlive it.
            self._work.set()
            if (
                self._wait_scope is not None
                and self._h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
            ):
                # The driver is waiting to read, but a command still has bytes to send.
                self._wait_scope.cancel()
            for entry in entries:
                await entry.done.wait()
        for entry in entries:
            if entry.error is not None:
                raise entry.error

    async def _submit(self, issue: Callable[[], int], keepalive: Any) -> None:
        await self._submit_all([(issue, keepalive)])

    async def _submit_all(self, commands: list[tuple[Callable[[], int], Any]]) -> None:
        """Send ``commands`` (issue function, buffer to keep alive) and wait for them all.

        On an idle connection this task polls the socket itself (``_poll_until_done``);
        otherwise the driver task does and this one waits for events.
        """
        if self._pending or self._inline or self._driver_scope is None:
            entries: list[_Pending] = []
            try:
                for issue, keepalive in commands:
                    entries.append(self._issue(issue, keepalive))
            finally:
                # Whatever was sent must complete before its buffer may be reused.
                if entries:
                    await self._await(entries)
            return
        sent: list[tuple[int, Any]] = []
        try:
            for issue, keepalive in commands:
                sent.append((self._send(issue), keepalive))
        finally:
            if sent:
                await self._poll_until_done(sent)

    async def _poll_until_done(self, sent: list[tuple[int, Any]]) -> None:
        """Complete commands sent on an idle connection, polling from this task.

        The common case of a reader at queue depth 1 (random reads), kept lean: no event,
        no cancel scope, no wake-up of the driver task (together ~30 µs per read here).
        Commands other tasks submit meanwhile are reaped as their replies come in.
        """
        h = self._h
        waiting = dict(sent)  # cookie → what must outlive it
        error: nbd.Error | None = None
        self._inline = True
        try:
            while True:
                for cookie in list(waiting):
                    try:
                        finished = h.aio_command_completed(cookie)
                    except nbd.Error as exc:
                        finished = True  # it failed: retired, with its own errno
                        error = error or exc
                    if finished:
                        del waiting[cookie]
                if not waiting:
                    break
                try:
                    await self._step(h)
                except nbd.Error as exc:
                    self._die(ConnectionLost(f"NBD connection {self.name} failed: {exc}"))
                if self._pending:
                    self._reap()
                if self.dead is not None or h.aio_is_dead():
                    waiting.clear()  # a dead handle retires every command
                    if self.dead is None:
                        self._die(ConnectionLost(f"NBD connection {self.name} died"))
                    raise self.dead  # type: ignore[misc]
            if error is not None:
                raise error
        finally:
            for cookie, keepalive in waiting.items():
                # Cancelled while commands are in flight: they cannot be withdrawn. The
                # driver finishes them; the entries keep their buffers alive until then.
                self._pending[cookie] = _Pending(keepalive=keepalive)
            self._inline = False
            if self._pending:
                self._work.set()

    async def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the export's bytes at ``offset``."""
        buf = nbd.Buffer.from_buffer(view)
        await self._submit(lambda: self._h.aio_pread(buf, offset), buf)

    async def pread_pieces(self, pieces: list[tuple[memoryview, int]]) -> None:
        """Fill each (view, offset) piece; all requests are in flight at once (pipelined).

        A 1 MiB read sent as four 256 KiB requests arrives sooner than as one: qemu-nbd
        reads the next piece while the previous one is on the wire (measured here: ~480 µs
        vs ~810 µs per MiB).
        """
        commands: list[tuple[Callable[[], int], Any]] = []
        for view, offset in pieces:
            buf = nbd.Buffer.from_buffer(view)
            commands.append((functools.partial(self._h.aio_pread, buf, offset), buf))
        await self._submit_all(commands)

    async def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        buf = nbd.Buffer.from_buffer(data)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        await self._submit(lambda: self._h.aio_pwrite(buf, offset, flags=flags), buf)

    async def flush(self) -> None:
        await self._submit(lambda: self._h.aio_flush(), None)

    async def trim(self, count: int, offset: int) -> None:
        await self._submit(lambda: self._h.aio_trim(count, offset), None)

    async def zero(self, count: int, offset: int) -> None:
        await self._submit(lambda: self._h.aio_zero(count, offset), None)

    async def close(self) -> None:
        """Shut the connection down politely (in a thread: it waits for the server)."""
        h = self._h

        def shutdown() -> None:
            try:
                if not h.aio_is_dead() and not h.aio_is_closed():
                    h.shutdown()
            except nbd.Error as exc:
                log.debug("shutdown of %s: %s", self.name, exc)
            # libnbd 1.14's binding has no close(): the handle is freed with its last reference.

        with trio.CancelScope(shield=True):
            if self._driver_scope is not None:
                # Stop the driver before the fd goes away under its wait.
                self._driver_scope.cancel()
                await self._driver_done.wait()
            self._die(ConnectionLost(f"NBD connection {self.name} closed"), expected=True)
            await trio.to_thread.run_sync(shutdown)


# A 1 MiB write request then leaves in one or two sends instead of five or six (the default
# unix-socket send buffer is 208 KiB), each a wake-up of the loop and a libnbd call.
_SEND_BUFFER = 4 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _grow_send_buffer(fd: int) -> None:
    """Raise the socket's send buffer (beyond net.core.wmem_max when allowed: root)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    with sock:
        for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SEND_BUFFER)
                return
            except OSError:
                continue


def error_errno(exc: BaseException) -> int:
    """The errno for a failed NBD command (libnbd's own when it has one).

    nbd.Error's ``errno`` is the errno's *name* ("ENOSPC"); the number is ``errnum``.
    """
    for attr in ("errnum", "errno"):
        code = getattr(exc, attr, None)
        if isinstance(code, int) and code > 0:
            return code
    return errno.EIO
