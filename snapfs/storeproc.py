"""The store process: a snapfs mount's page cache filled ahead of sequential readers from a
process of its own (FUSE_NOTIFY_STORE messages written to the mount's ``/dev/fuse``): zeros
for holes, and data it reads itself from the disk's NBD server.

Why a process and not threads of the daemon: pyfuse3 writes every reply to the kernel with
the GIL held (its read handler calls ``fuse_reply_buf`` without releasing it), and a 1 MiB
reply is a 1 MiB copy into fresh page-cache pages, 1-3 ms on this VM. Store threads of the
daemon need the GIL between their stores, so they wait on the loop's copies and fall behind
the reader; then the loop fills the holes itself, one reply after the other. Here the stores
run on threads of another interpreter and overlap the loop's replies (measured: 3 GiB of
holes stored in 1.3-1.7 s with 2-4 threads while a reader read the image, docs/benchmarks.md
session 8).

Data too, and over the process's own NBD connections: the daemon's loop receiving a MiB of
data from NBD and replying it to the kernel cost it 1.4-1.7 ms of CPU (its receive path is
Python driving libnbd AIO, chunk by chunk), where a blocking libnbd read in another
interpreter is a copy out of the socket with the GIL released.

Owns both ends: ``StoreProcess`` (the daemon side: spawn, submit, acknowledgements, stop) and
``main`` (the process: ``python -m snapfs.storeproc FD THREADS PARENTPID``).

Protocol: the daemon writes records ``<BxHQQI`` (kind, export, inode, offset, length) to the
process's stdin: ZEROS (store zeros), DATA (store the bytes the export's server has there),
WINDOW (the same as DATA, for the rest of a random read's window: acknowledged under its own
kind so that the daemon counts it apart) or EXPORT (export number ``export`` is the NBD unix
socket whose path, ``length`` bytes, follows the record; sent before the first DATA or
WINDOW job of that export). The process answers each ZEROS, DATA and WINDOW job with
``<BBI`` (kind, 0 stored / errno, length) on stdout. End of stdin: the
queued stores finish and the process exits. Each thread keeps one NBD connection per export,
made on its first job there; a failed read drops it, and the next job connects again.

Its fd of ``/dev/fuse`` is the daemon's own (inherited), so a store is exactly what
``pyfuse3.notify_store`` would send. It is started
through ``setpriv --pdeathsig TERM`` like the NBD servers (snapfs.nbd.server): the kernel
sends it SIGTERM when the daemon's main thread dies; and it exits at once if its parent is
gone before that took effect: it never outlives the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

JOB = struct.Struct("<BxHQQI")
ACK = struct.Struct("<BBI")
ZEROS, DATA, EXPORT, WINDOW = 0, 1, 2, 3
MAX_EXPORTS = 1 << 16
# struct fuse_out_header (len, error = the notify code, unique = 0) and
# struct fuse_notify_store_out (nodeid, offset, size, padding): include/uapi/linux/fuse.h.
_OUT_HEADER = struct.Struct("<IiQ")
_STORE_OUT = struct.Struct("<QQII")
FUSE_NOTIFY_STORE = 4
MAX_STORE = 1 << 20  # one read-ahead stripe at most (jobs are one stripe each)

Ack = Callable[[int, int, int], None]  # (kind, 0 or errno, length)


def store_message(ino: int, offset: int, length: int) -> bytes:
    """The header of a FUSE_NOTIFY_STORE of ``length`` bytes (the data follows it)."""
    size = _OUT_HEADER.size + _STORE_OUT.size + length
    return _OUT_HEADER.pack(size, FUSE_NOTIFY_STORE, 0) + _STORE_OUT.pack(ino, offset, length, 0)


def fuse_device_fd() -> int | None:
    """This process's one open ``/dev/fuse`` (the mount's session), or None if not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
    return found[0] if len(found) == 1 else None


class StoreProcess:
    """The daemon's handle on one store process. ``submit`` runs on the trio loop and never
    blocks (a full pipe refuses the job); acknowledgements arrive on a reader thread."""

    def __init__(self, proc: subprocess.Popen[bytes], on_ack: Ack, on_exit: Callable[[], None]):
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._jobs_fd = proc.stdin.fileno()
        os.set_blocking(self._jobs_fd, False)
        self._on_ack = on_ack
        self._on_exit = on_exit
        self._exports: dict[str, int] = {}  # socket path → export number (sent once)
        self.alive = True
        self._reader = threading.Thread(
            target=self._read_acks, name="snapfs-store-acks", daemon=True
        )
        self._reader.start()

    @classmethod
    def start(cls, fuse_fd: int, threads: int, on_ack: Ack, on_exit: Callable[[], None]
              ) -> StoreProcess:  # fmt: skip
        """Spawn it. Call from the main thread: the death signal follows the forking thread."""
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "snapfs.storeproc",
             str(fuse_fd), str(threads), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fuse_fd,),
            cwd="/", close_fds=True,
        )  # fmt: skip
        return cls(proc, on_ack, on_exit)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def submit(self, ino: int, offset: int, length: int) -> bool:
        """Queue zeros for ``length`` bytes at ``offset`` of inode ``ino``; False if the
        process cannot take it now (gone, or its pipe full): the caller stores it itself."""
        return self._send(JOB.pack(ZEROS, 0, ino, offset, length))

    def submit_data(
        self, socket_path: str, ino: int, offset: int, length: int, kind: int = DATA
    ) -> bool:
        """Queue a store of the bytes at ``offset`` of the export served on ``socket_path``
        (``length`` bytes, at the same offset of inode ``ino``), as a DATA or WINDOW job;
        False if the process cannot take it now: nothing is stored, the kernel asks the
        daemon as usual."""
        export = self._exports.get(socket_path)
        if export is None:
            path = os.fsencode(socket_path)
            if len(self._exports) >= MAX_EXPORTS or JOB.size + len(path) > select.PIPE_BUF:
                return False
            export = len(self._exports)
            if not self._send(JOB.pack(EXPORT, export, 0, 0, len(path)) + path):
                return False
            self._exports[socket_path] = export
        return self._send(JOB.pack(kind, export, ino, offset, length))

    def _send(self, record: bytes) -> bool:
        if not self.alive:
            return False
        try:
            written = os.write(self._jobs_fd, record)
        except BlockingIOError:
            return False
        except OSError:  # EPIPE: it died; the reader thread reports it
            return False
        # Pipe writes of at most PIPE_BUF bytes are atomic: all or nothing.
        return written == len(record)

    def _read_acks(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while data := stdout.read(ACK.size):
                if len(data) < ACK.size:
                    break
                kind, status, length = ACK.unpack(data)
                self._on_ack(kind, status, length)
        finally:
            self.alive = False
            self._on_exit()

    def close(self, timeout: float) -> bool:
        """No more jobs: wait up to ``timeout`` for the queued ones and the exit (blocking:
        call off the loop). Whether it ended by itself; if not, it is killed."""
        self.alive = False
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
            ended = True
        except subprocess.TimeoutExpired:
            ended = False
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout)
        return ended

    def kill(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self._proc.kill()


# -- the process ---------------------------------------------------------------------------
class _Connections:
    """One thread's NBD connections, by export number (libnbd blocking calls: they release
    the GIL). Imported here, not at the top: the daemon side must not need libnbd."""

    def __init__(self, sockets: dict[int, str]) -> None:
        import nbd

        self._nbd = nbd
        self._sockets = sockets
        self._handles: dict[int, Any] = {}
        self._buf = bytearray(MAX_STORE)
        self._view = memoryview(self._buf)

    def read(self, export: int, offset: int, length: int) -> memoryview:
        """The export's ``length`` bytes at ``offset`` (valid until the next read)."""
        handle = self._handles.get(export)
        if handle is None:
            path = self._sockets.get(export)
            if path is None:
                raise OSError(errno.EINVAL, f"no export {export}")
            handle = self._nbd.NBD()
            handle.set_pread_initialize(False)
            try:
                handle.connect_unix(path)
            except self._nbd.Error as exc:
                raise OSError(exc.errnum or errno.ECONNREFUSED, str(exc)) from exc
            self._handles[export] = handle
        view = self._view[:length]
        buf = self._nbd.Buffer.from_buffer(view)
        try:
            cookie = handle.aio_pread(buf, offset)
            while not handle.aio_command_completed(cookie):
                handle.poll(-1)
        except self._nbd.Error as exc:
            # Server gone or restarted (a new one on the same socket), or a read error:
            # this connection is done; the next job makes a new one.
            del self._handles[export]  # the handle closes with its last reference
            raise OSError(exc.errnum or errno.EIO, str(exc)) from exc
        return view

    def close(self) -> None:
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                handle.shutdown()
        self._handles.clear()


def _serve(fuse_fd: int, threads: int, jobs_in: int, acks_out: int) -> None:
    zeros = memoryview(bytes(MAX_STORE))
    jobs: queue.SimpleQueue[tuple[int, int, int, int, int] | None] = queue.SimpleQueue()
    sockets: dict[int, str] = {}  # export number → NBD unix socket (written before its jobs)
    ack_lock = threading.Lock()

    def ack(kind: int, status: int, length: int) -> None:
        with ack_lock:
            os.write(acks_out, ACK.pack(kind, status, length))

    def worker() -> None:
        connections = _Connections(sockets)
        try:
            while (job := jobs.get()) is not None:
                kind, export, ino, offset, length = job
                status = 0
                try:
                    if not 0 < length <= MAX_STORE or kind not in (ZEROS, DATA, WINDOW):
                        raise OSError(errno.EINVAL, "bad job")
                    data = zeros if kind == ZEROS else connections.read(export, offset, length)
                    os.writev(fuse_fd, [store_message(ino, offset, length), data[:length]])
                except OSError as exc:
                    status = exc.errno or errno.EIO
                ack(kind, status, length)
        finally:
            connections.close()

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, threads))]
    for w in workers:
        w.start()
    pending = b""
    while chunk := os.read(jobs_in, 64 * JOB.size):
        pending += chunk
        while len(pending) >= JOB.size:
            kind, export, ino, offset, length = JOB.unpack_from(pending)
            if kind == EXPORT:
                if len(pending) < JOB.size + length:
                    break  # the path's rest is still in the pipe
                sockets[export] = os.fsdecode(pending[JOB.size : JOB.size + length])
                pending = pending[JOB.size + length :]
                continue
            jobs.put((kind, export, ino, offset, length))
            pending = pending[JOB.size :]
    for _ in workers:
        jobs.put(None)
    for w in workers:
        w.join()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fuse_fd, threads, parent = int(args[0]), int(args[1]), int(args[2])
    if os.getppid() != parent:  # it died before setpriv's death signal took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon handles Ctrl-C and stops us
    try:
        _serve(fuse_fd, threads, sys.stdin.fileno(), sys.stdout.fileno())
    except BrokenPipeError:  # the daemon went away
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
