"""The store process (snapfs.storeproc) as a real process, with a pipe standing in for
``/dev/fuse``: the bytes it writes are exactly the FUSE_NOTIFY_STORE messages the kernel
reads (header, store header, zeros), each job is acknowledged with its status, and it ends
at the end of its input or when its parent dies.

The kernel side of those messages (pages really stored) is checked through a real mount in
tests/integration/test_read_around.py.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from snapfs.storeproc import ACK, DATA, JOB, WINDOW, ZEROS, StoreProcess, store_message

MiB = 1 << 20


def read_messages(fd: int, count: int) -> list[tuple[int, int, int, int, bytes]]:
    """``count`` notify messages from ``fd``: (error code, nodeid, offset, size, data)."""
    out = []
    stream = os.fdopen(fd, "rb", buffering=0, closefd=False)
    for _ in range(count):
        head = _read_exactly(stream, 16 + 24)
        length, error, unique = struct.unpack_from("<IiQ", head)
        nodeid, offset, size, _pad = struct.unpack_from("<QQII", head, 16)
        assert unique == 0 and length == 40 + size
        out.append((error, nodeid, offset, size, _read_exactly(stream, size)))
    return out


def _read_exactly(stream: object, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))  # type: ignore[attr-defined]
        assert chunk, "stream ended early"
        buf += chunk
    return buf


def test_message_layout_is_the_kernels() -> None:
    # include/uapi/linux/fuse.h: fuse_out_header {len, error, unique},
    # fuse_notify_store_out {nodeid, offset, size, padding}; FUSE_NOTIFY_STORE = 4.
    msg = store_message(7, 3 * MiB, 4096)
    assert msg == struct.pack("<IiQQQII", 40 + 4096, 4, 0, 7, 3 * MiB, 4096, 0)


def test_jobs_become_store_messages_and_are_acknowledged() -> None:
    fake_fuse_r, fake_fuse_w = os.pipe()
    acks: list[tuple[int, int]] = []
    gone = threading.Event()
    # One thread: a pipe (unlike /dev/fuse) interleaves concurrent writes of over 4 KiB.
    proc = StoreProcess.start(
        fake_fuse_w, 1, lambda kind, status, n: acks.append((status, n)), gone.set
    )
    os.close(fake_fuse_w)
    try:
        jobs = [(11, MiB + 4096, MiB - 4096), (11, 2 * MiB + 4096, MiB - 4096), (12, 0, 8192)]
        reader = threading.Thread(target=lambda: got.extend(read_messages(fake_fuse_r, 3)))
        got: list[tuple[int, int, int, int, bytes]] = []
        reader.start()
        for job in jobs:
            assert proc.submit(*job)
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert sorted((n, o, s) for _, n, o, s, _ in got) == sorted(jobs)
        assert all(err == 4 and data == bytes(size) for err, _, _, size, data in got)
        # A job the kernel would refuse (too big) fails with its errno, and is still acked.
        assert proc.submit(13, 0, 2 * MiB)
        assert proc.close(timeout=30)  # end of input: the queued jobs end, then the process
        assert gone.wait(10)
        assert sorted(acks) == sorted([(0, MiB - 4096), (0, MiB - 4096), (0, 8192),
                                       (22, 2 * MiB)])  # fmt: skip
        assert not proc.submit(11, 0, 4096)  # closed: refused, the caller stores it itself
    finally:
        proc.kill()
        os.close(fake_fuse_r)


def _serve(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    """A real read-only qemu-nbd on ``sock`` (as snapfs's own servers are)."""
    sock.unlink(missing_ok=True)
    server = subprocess.Popen(["qemu-nbd", "--persistent", "--read-only", "--format=raw",
                               f"--socket={sock}", str(image)])  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert server.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return server


def test_data_jobs_store_the_servers_bytes_and_reconnect(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    content = os.urandom(4 * MiB)
    image.write_bytes(content)
    sock = tmp_path / "nbd.sock"
    server = _serve(image, sock)
    fake_fuse_r, fake_fuse_w = os.pipe()
    acks: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def ack(kind: int, status: int, n: int) -> None:
        with lock:
            acks.append((kind, status, n))

    def acked(count: int) -> list[tuple[int, int, int]]:
        deadline = time.monotonic() + 30
        while len(acks) < count:
            assert time.monotonic() < deadline, f"acks so far: {acks}"
            time.sleep(0.02)
        return acks[:count]

    proc = StoreProcess.start(fake_fuse_w, 1, ack, lambda: None)
    os.close(fake_fuse_w)
    got: list[tuple[int, int, int, int, bytes]] = []
    try:
        reader = threading.Thread(target=lambda: got.extend(read_messages(fake_fuse_r, 3)))
        reader.start()
        # A DATA job, then a WINDOW job (the same work, acknowledged under its own kind).
        assert proc.submit_data(str(sock), 7, MiB + 4096, MiB - 4096)
        assert proc.submit_data(str(sock), 7, 3 * MiB, 8192, kind=WINDOW)
        assert acked(2) == [(DATA, 0, MiB - 4096), (WINDOW, 0, 8192)]
        # The server dies (killed, or stopped while idle): the next job fails with an errno
        # and stores nothing; after a restart on the same socket, jobs connect again.
        server.kill()
        server.wait()
        assert proc.submit_data(str(sock), 7, 0, 4096)
        kind, status, n = acked(3)[2]
        assert (kind, n) == (DATA, 4096) and status != 0
        server = _serve(image, sock)
        assert proc.submit_data(str(sock), 7, 2 * MiB, 4096)
        assert acked(4)[3] == (DATA, 0, 4096)
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert [(e, ino, off, size) for e, ino, off, size, _ in got] == [
            (4, 7, MiB + 4096, MiB - 4096), (4, 7, 3 * MiB, 8192), (4, 7, 2 * MiB, 4096)
        ]  # fmt: skip
        for _, _, off, size, data in got:
            assert data == content[off : off + size]
        # A socket nobody serves: an errno, and zeros jobs still work beside it.
        assert proc.submit_data(str(tmp_path / "none.sock"), 7, 0, 4096)
        assert proc.submit(7, 0, 4096)
        assert proc.close(timeout=30)
        assert acks[4][0] == DATA and acks[4][1] != 0
        assert acks[5] == (ZEROS, 0, 4096)
    finally:
        proc.kill()
        server.kill()
        server.wait()
        os.close(fake_fuse_r)


def test_several_threads_acknowledge_every_job() -> None:
    sink = os.open(os.devnull, os.O_WRONLY)
    acks: list[tuple[int, int]] = []
    lock = threading.Lock()

    def ack(kind: int, status: int, n: int) -> None:
        with lock:
            acks.append((status, n))

    proc = StoreProcess.start(sink, 4, ack, lambda: None)
    os.close(sink)
    try:
        for k in range(200):
            assert proc.submit(3, k * MiB, MiB)
        assert proc.close(timeout=60)
        assert acks == [(0, MiB)] * 200
    finally:
        proc.kill()


def test_a_failed_store_is_acknowledged_with_its_errno() -> None:
    fake_fuse_r, fake_fuse_w = os.pipe()
    os.close(fake_fuse_r)  # writes fail with EPIPE, as a store to an ended connection fails
    acks: list[tuple[int, int]] = []
    proc = StoreProcess.start(
        fake_fuse_w, 1, lambda k, s, n: acks.append((s, n)), lambda: None
    )
    os.close(fake_fuse_w)
    try:
        assert proc.submit(5, 0, 4096)
        assert proc.close(timeout=30)
        assert acks == [(32, 4096)]  # EPIPE
    finally:
        proc.kill()


def test_it_dies_with_its_parent() -> None:
    # A parent that starts the process and is then SIGKILLed: the store process must go too
    # (PR_SET_PDEATHSIG), or it would keep the mount's /dev/fuse open.
    script = (
        "import os, sys, time\n"
        "from snapfs.storeproc import StoreProcess\n"
        "r, w = os.pipe()\n"
        "p = StoreProcess.start(w, 1, lambda k, s, n: None, lambda: None)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the store process outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_record_sizes() -> None:
    assert JOB.size == 24 and ACK.size == 6
