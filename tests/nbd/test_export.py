"""DiskExport against a real qemu-nbd: byte-exact reads, holes, restart after a kill."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from snapfs.config import NbdSettings
from snapfs.errors import BackendUnavailable
from snapfs.nbd.client import ConnectionLost
from snapfs.nbd.export import DiskExport, ExportManager
from tests import imaging

MiB = 1 << 20


@pytest.fixture
def runtime_dir():
    with tempfile.TemporaryDirectory(prefix="snapfs-t-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, bytes]:
    base = imaging.random_raw(tmp_path / "base.raw", 16 * MiB, [(0, MiB), (5 * MiB, 3 * MiB)])
    qbase = imaging.convert(base, tmp_path / "base.qcow2", "qcow2")
    top = imaging.overlay(
        qbase, tmp_path / "top.qcow2", [(512 * 1024, 4096, 0x55), (12 * MiB, MiB, 0xAA)]
    )
    return top, imaging.to_raw(top, tmp_path / "expect.raw")


async def read_all(export, size: int, step: int) -> bytes:
    out = bytearray()
    off = 0
    while off < size:
        chunk = await export.read(off, step)
        assert chunk, off
        out += chunk
        off += len(chunk)
    return bytes(out)


@contextlib.asynccontextmanager
async def served(
    image: Path, runtime_dir: Path, *, connections: int = 4, readonly: bool = True
) -> AsyncIterator[DiskExport]:
    """``image``'s export, acquired (its server running), for the body; then released and
    every server stopped."""
    async with trio.open_nursery() as nursery:
        mgr = ExportManager(runtime_dir, nursery, NbdSettings(connections=connections))
        export = mgr.export_for(image, "qcow2", readonly=readonly)
        await export.acquire()
        try:
            yield export
        finally:
            export.release()
            await mgr.stop_all()
            nursery.cancel_scope.cancel()


async def test_reads_equal_qemu_img_convert(chain, runtime_dir):
    image, expect = chain
    async with served(image, runtime_dir, connections=3) as export:
        assert export.size == len(expect)
        for step in (4096, 128 * 1024, 1000 * 1000, 32 * MiB):
            assert await read_all(export, len(expect), step) == expect
        # Holes and data are both known: 4 MiB of random data + two overlay writes.
        assert export.extents is not None
        assert 4 * MiB <= export.extents.data_bytes <= 6 * MiB
        # Reads past the end are empty; reads across the end are short.
        assert await export.read(len(expect), 10) == b""
        assert await export.read(len(expect) - 10, 100) == expect[-10:]
        # Many concurrent readers on few connections.
        results: dict[int, bytes] = {}

        async def reader(i: int) -> None:
            off = (i * 777_777) % (len(expect) - 65536)
            results[i] = bytes(await export.read(off, 65536))

        async with trio.open_nursery() as inner:
            for i in range(40):
                inner.start_soon(reader, i)
        for i, data in results.items():
            off = (i * 777_777) % (len(expect) - 65536)
            assert data == expect[off : off + 65536]
    assert not any(runtime_dir.iterdir())


async def test_killed_server_gives_eio_then_restarts(chain, runtime_dir):
    image, expect = chain
    async with served(image, runtime_dir) as export:
        assert await export.read(0, 4096) == expect[:4096]
        pid = export._server.pid
        # Freeze the server so a read is surely in flight, then kill it mid-read.
        os.kill(pid, signal.SIGSTOP)
        failures: list[BaseException] = []

        async def doomed_read() -> None:
            try:
                await export.read(5 * MiB, 4096)
            except ConnectionLost as exc:
                failures.append(exc)

        async with trio.open_nursery() as inner:
            inner.start_soon(doomed_read)
            await trio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
        assert len(failures) == 1 and failures[0].errno == errno.EIO
        # The next read reconnects (a new server) and succeeds.
        assert await export.read(5 * MiB, 4096) == expect[5 * MiB : 5 * MiB + 4096]
        second = export._server.pid
        assert second != pid
        # A server that died while idle is restarted transparently on the next read.
        os.kill(second, signal.SIGKILL)
        await trio.sleep(1.2)  # liveness is checked at most once a second
        assert await export.read(0, 4096) == expect[:4096]
        assert export._server.pid not in (pid, second)


async def test_corrupt_image_fails_with_reason(tmp_path, runtime_dir, caplog):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 4096)
    async with trio.open_nursery() as nursery:
        mgr = ExportManager(runtime_dir, nursery)
        export = mgr.export_for(bad, "qcow2")
        with pytest.raises(BackendUnavailable) as info:
            await export.acquire()
        assert "qemu-nbd" in str(info.value)
        # Fails fast afterwards, without spawning a server per read.
        with pytest.raises(BackendUnavailable):
            await export.read(0, 10)
        await mgr.stop_all()
        nursery.cancel_scope.cancel()


async def test_connection_fast_path_pieces_and_cancellation(chain, runtime_dir):
    """One connection: idle-path reads, pipelined pieces, overlapping readers, and a reader
    cancelled mid-command (the command completes behind it; the connection stays usable)."""
    image, expect = chain
    async with served(image, runtime_dir, connections=1) as export:
        conn = export._pick()  # the one connection under test
        buf = bytearray(3 * MiB + 4096)
        view = memoryview(buf)
        # Pipelined pieces of uneven sizes, in one call.
        pieces = [(view[:MiB], 0), (view[MiB : 3 * MiB], 4 * MiB), (view[3 * MiB :], 12 * MiB)]
        await conn.pread_pieces(pieces)
        assert buf[:MiB] == expect[:MiB]
        assert buf[MiB : 3 * MiB] == expect[4 * MiB : 6 * MiB]
        assert buf[3 * MiB :] == expect[12 * MiB : 12 * MiB + 4096]
        # A reader cancelled while its command is in flight, others overlapping it.
        for _ in range(20):
            cancelled_buf = bytearray(MiB)
            with trio.move_on_after(0) as scope:
                await conn.pread_into(memoryview(cancelled_buf), 5 * MiB)
            if not scope.cancelled_caught:
                # It went the busy path (an earlier cancelled command was still in flight),
                # which waits shielded: it must then have completed, with the right bytes.
                # (Not `in_flight == 0`: that earlier command may still be pending, as
                # qemu-nbd replies out of order.)
                assert cancelled_buf == expect[5 * MiB : 6 * MiB]
            got: dict[int, bytes] = {}

            async def reader(off: int, got: dict[int, bytes] = got) -> None:
                b = bytearray(65536)
                await conn.pread_into(memoryview(b), off)
                got[off] = bytes(b)

            async with trio.open_nursery() as inner:
                for off in (0, 5 * MiB, 12 * MiB, 8 * MiB):
                    inner.start_soon(reader, off)
            for off, data in got.items():
                assert data == expect[off : off + 65536]
        assert conn.dead is None
        with trio.fail_after(10):
            while conn.in_flight:
                await trio.sleep(0.01)


async def test_write_behind_keeps_order_and_reports_errors(tmp_path: Path, runtime_dir) -> None:
    """Writes return before the server answers; overlapping writes and reads still behave as
    if each write had completed (the final image equals a model of them), and a refused write
    is reported by the next write or flush, once."""
    import random

    image = tmp_path / "rw.qcow2"
    imaging.run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(16 * MiB))
    model = bytearray(16 * MiB)
    rng = random.Random(7)
    async with served(image, runtime_dir, connections=2, readonly=False) as export:
        for i in range(300):
            off = rng.randrange(0, 16 * MiB - 300_000)
            data = rng.randbytes(rng.randrange(1, 300_000))
            assert await export.write(off, data) == len(data)
            model[off : off + len(data)] = data
            if i % 25 == 0:  # read your writes, with writes still in flight
                roff = rng.randrange(0, 16 * MiB - MiB)
                assert await export.read(roff, MiB) == model[roff : roff + MiB]
        await export.flush()
        assert await export.read(0, 16 * MiB) == model
        # Past the end: the server refuses it; reported by the next flush, then not again.
        await export.write(16 * MiB - 10, b"x" * 100)
        with pytest.raises(Exception) as info:
            await export.flush()
        assert "failed" in str(info.value)
        await export.flush()
    assert imaging.to_raw(image, tmp_path / "rw.raw") == model


def record_fills(export: DiskExport, fail_at: list[int] | None = None) -> list[int]:
    """The offsets the export fills from its server from now on, in order; a fill at an
    offset in ``fail_at`` fails once (``ConnectionLost``) instead."""
    fills: list[int] = []
    original_fill = export._fill

    async def fill(view, offset, segments):
        fills.append(offset)
        if fail_at is not None and offset in fail_at:
            fail_at.remove(offset)
            raise ConnectionLost("injected")
        await original_fill(view, offset, segments)

    export._fill = fill  # type: ignore[method-assign]
    return fills


async def test_sequential_reads_are_fetched_ahead(chain, runtime_dir):
    image, expect = chain
    async with served(image, runtime_dir, connections=2) as export:
        fail_next_at: list[int] = []
        fills = record_fills(export, fail_next_at)
        # The first read of a stream fetches only itself.
        assert bytes(await export.read_transient(5 * MiB, MiB)) == expect[5 * MiB : 6 * MiB]
        assert fills == [5 * MiB]
        # The second continues it: the range after it is fetched at once.
        assert bytes(await export.read_transient(6 * MiB, MiB)) == expect[6 * MiB : 7 * MiB]
        assert (7 * MiB, MiB) in export._prefetched
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(fills) == [5 * MiB, 6 * MiB, 7 * MiB]
        # Its request is answered from that fetch (no new server read); 8-9 MiB is a hole:
        # nothing is fetched ahead.
        assert bytes(await export.read_transient(7 * MiB, MiB)) == expect[7 * MiB : 8 * MiB]
        assert sorted(fills) == [5 * MiB, 6 * MiB, 7 * MiB]
        assert export._prefetched == {}
        # A jump elsewhere is not sequential: nothing fetched ahead.
        assert bytes(await export.read_transient(MiB // 2, MiB // 2)) == expect[MiB // 2 : MiB]
        assert export._prefetched == {}
        # A fetch ahead that fails is read again by its request, which gets the right bytes.
        fills.clear()
        fail_next_at.append(6 * MiB)
        await export.read_transient(4 * MiB, MiB)
        await export.read_transient(5 * MiB, MiB)  # starts the (failing) fetch of 6 MiB
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(await export.read_transient(6 * MiB, MiB)) == expect[6 * MiB : 7 * MiB]
        assert fills.count(6 * MiB) == 2


async def test_streams_are_fetched_two_ranges_ahead(chain, runtime_dir):
    """A sequential reader of data keeps two ranges fetched ahead of its latest request
    (PREFETCH_DEPTH), each fetched once."""
    image, expect = chain
    async with served(image, runtime_dir, connections=2) as export:
        fills = record_fills(export)
        # 4-5 MiB is a hole (answered from the map); the read of 5 MiB continues it.
        assert bytes(await export.read_transient(4 * MiB, MiB)) == expect[4 * MiB : 5 * MiB]
        assert bytes(await export.read_transient(5 * MiB, MiB)) == expect[5 * MiB : 6 * MiB]
        assert list(export._prefetched) == [(6 * MiB, MiB), (7 * MiB, MiB)]
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(fills) == [5 * MiB, 6 * MiB, 7 * MiB]
        for block in (6, 7):
            got = bytes(await export.read_transient(block * MiB, MiB))
            assert got == expect[block * MiB : (block + 1) * MiB]
        assert sorted(fills) == [5 * MiB, 6 * MiB, 7 * MiB]  # no range read twice
        assert export._prefetched == {}


async def test_fetch_ahead_serves_requests_split_off_a_page(chain, runtime_dir):
    """An uncached reader whose 1 MiB buffer does not start on a page boundary reaches the
    daemon as a request of 1 MiB - 16 bytes, then one of 16 bytes (the kernel pins at most
    256 pages per request): the fetches ahead serve both."""
    image, expect = chain
    async with served(image, runtime_dir, connections=2) as export:
        fills = record_fills(export)
        requests = []
        for block in range(5, 8):  # the data at 5-8 MiB
            requests += [(block * MiB, MiB - 16), ((block + 1) * MiB - 16, 16)]
        for offset, size in requests:
            got = bytes(await export.read_transient(offset, size))
            assert got == expect[offset : offset + size], (offset, size)
            await trio.testing.wait_all_tasks_blocked()
        # Read by their requests: the first three (the stream's first big request is not
        # yet sequential); every later one came from the fetch of 7 MiB - 16 to 8 MiB, which
        # the third started (the ranges after it, 8-10 MiB, are holes: not fetched). Each
        # byte is read from the server once.
        assert fills == [5 * MiB, 6 * MiB - 16, 6 * MiB, 7 * MiB - 16]
        # That fetch was read to its end and forgotten.
        assert export._prefetched == {}
