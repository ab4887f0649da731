"""The store process: zeros for holes put into a snapfs mount's page cache from a process of
their own (FUSE_NOTIFY_STORE messages written to the mount's ``/dev/fuse``).

Why a process and not threads of the daemon: pyfuse3 writes every reply to the kernel with
the GIL held (its read handler calls ``fuse_reply_buf`` without releasing it), and a 1 MiB
reply is a 1 MiB copy into fresh page-cache pages, 1-3 ms on this VM. Store threads of the
daemon need the GIL between their stores, so they wait on the loop's copies and fall behind
the reader; then the loop fills the holes itself, one reply after the other. Here the stores
run on threads of another interpreter and overlap the loop's replies (measured: 3 GiB of
holes stored in 1.3-1.7 s with 2-4 threads while a reader read the image, docs/benchmarks.md
session 8).

Owns both ends: ``StoreProcess`` (the daemon side: spawn, submit, acknowledgements, stop) and
``main`` (the process: ``python -m snapfs.storeproc FD THREADS``).

Protocol: the daemon writes records ``<QQI`` (inode, offset, length) to the process's stdin;
the process answers each with ``<BI`` (0 stored / errno, length) on stdout. End of stdin: the
queued stores finish and the process exits. Its fd of ``/dev/fuse`` is the daemon's own
(inherited), so a store is exactly what ``pyfuse3.notify_store`` would send. It is started
through ``setpriv --pdeathsig TERM`` like the NBD servers (snapfs.nbd.server): the kernel
sends it SIGTERM when the daemon's main thread dies; and it exits at once if its parent is
gone before that took effect: it never outlives the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

JOB = struct.Struct("<QQI")
ACK = struct.Struct("<BI")
# struct fuse_out_header (len, error = the notify code, unique = 0) and
# struct fuse_notify_store_out (nodeid, offset, size, padding): include/uapi/linux/fuse.h.
_OUT_HEADER = struct.Struct("<IiQ")
_STORE_OUT = struct.Struct("<QQII")
FUSE_NOTIFY_STORE = 4
MAX_STORE = 1 << 20  # one read-ahead stripe at most (jobs are one stripe each)

Ack = Callable[[int, int], None]  # (0 or errno, length)


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
        if not self.alive:
            return False
        try:
            written = os.write(self._jobs_fd, JOB.pack(ino, offset, length))
        except BlockingIOError:
            return False
        except OSError:  # EPIPE: it died; the reader thread reports it
            return False
        # Pipe writes of at most PIPE_BUF bytes are atomic: all or nothing.
        return written == JOB.size

    def _read_acks(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while data := stdout.read(ACK.size):
                if len(data) < ACK.size:
                    break
                status, length = ACK.unpack(data)
                self._on_ack(status, length)
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
def _serve(fuse_fd: int, threads: int, jobs_in: int, acks_out: int) -> None:
    zeros = memoryview(bytes(MAX_STORE))
    jobs: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    ack_lock = threading.Lock()

    def ack(status: int, length: int) -> None:
        with ack_lock:
            os.write(acks_out, ACK.pack(status, length))

    def worker() -> None:
        while (job := jobs.get()) is not None:
            ino, offset, length = job
            status = 0
            if not 0 < length <= MAX_STORE:
                status = errno.EINVAL
            else:
                try:
                    os.writev(fuse_fd, [store_message(ino, offset, length), zeros[:length]])
                except OSError as exc:
                    status = exc.errno or errno.EIO
            ack(status, length)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, threads))]
    for w in workers:
        w.start()
    pending = b""
    while chunk := os.read(jobs_in, 64 * JOB.size):
        pending += chunk
        whole = len(pending) - len(pending) % JOB.size
        for start in range(0, whole, JOB.size):
            jobs.put(JOB.unpack_from(pending, start))  # type: ignore[arg-type]
        pending = pending[whole:]
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
