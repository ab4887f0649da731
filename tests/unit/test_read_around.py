"""ReadAround's policy and store bookkeeping, with a recording store function.

The real page-cache stores (pyfuse3.notify_store into a mounted file) are tested through a
FUSE mount in tests/integration/test_read_around.py; here the store function is replaced
so that the splitting, the limits and the shutdown path can be checked exactly, including a
store that blocks (what a page lock held by an unanswered read does), which a real mount
cannot produce on demand.
"""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from snapfs import readaround
from snapfs.readaround import HolesFn, ReadAround
from snapfs.storeproc import DATA, ZEROS

KiB = 1024
W = 256 * KiB


def test_window_for_random_and_sequential_reads() -> None:
    async def main() -> None:
        ra = ReadAround(W, store=lambda ino, off, data: None)
        # A first read of a handle is random: its aligned window.
        assert ra.window_for(1, 3 * W + 40 * KiB, 4 * KiB) == (3 * W, W)
        # Continuing where the last read ended: sequential, read as asked.
        assert ra.window_for(1, 3 * W + 44 * KiB, 4 * KiB) is None
        # Elsewhere again: random.
        assert ra.window_for(1, 10 * KiB, 4 * KiB) == (0, W)
        # Another handle has its own history.
        assert ra.window_for(2, 3 * W + 48 * KiB, 4 * KiB) == (3 * W, W)
        # A read crossing a window boundary gets both windows.
        assert ra.window_for(3, W - 2 * KiB, 4 * KiB) == (0, 2 * W)
        # Reads as big as the window are left to the kernel's read-ahead.
        assert ra.window_for(4, 7 * W, W) is None
        ra.forget(1)
        assert ra.window_for(1, 3 * W + 48 * KiB, 4 * KiB) == (3 * W, W)

    trio.run(main)


def test_window_zero_is_off() -> None:
    async def main() -> None:
        ra = ReadAround(0, store=lambda ino, off, data: None)
        assert ra.window_for(1, 12345 * 4096, 4096) is None

    trio.run(main)


def test_reply_is_the_asked_part_and_the_rest_is_stored() -> None:
    stored: list[tuple[int, int, bytes]] = []
    data = bytes(range(256)) * (W // 256)
    start = 5 * W
    offset, size = start + 8 * KiB + 100, 5000

    async def main() -> None:
        ra = ReadAround(W, store=lambda ino, off, d: stored.append((ino, off, d)))
        buf = bytearray(data)
        reply = ra.reply(42, start, buf, offset, size)
        assert bytes(reply) == data[offset - start : offset - start + size]
        # The buffer may be reused as soon as reply returns: the stores hold copies.
        buf[:] = bytes(len(buf))
        await ra.aclose()
        assert ra.reads == 1
        assert ra.stored_bytes == W - size

    trio.run(main)
    assert sorted(stored) == [
        (42, start, data[: offset - start]),
        (42, offset + size, data[offset - start + size :]),
    ]


def test_short_window_at_the_end_of_the_disk() -> None:
    stored: list[tuple[int, bytes]] = []

    async def main() -> None:
        ra = ReadAround(W, store=lambda ino, off, d: stored.append((off, d)))
        # The disk ends 12 KiB into the window: the export returned 12 KiB.
        reply = ra.reply(1, 0, b"a" * 4096 + b"b" * 4096 + b"c" * 4096, 4096, 4096)
        assert bytes(reply) == b"b" * 4096
        # Asked past the end: short reply, nothing beyond what exists.
        reply = ra.reply(1, 0, b"x" * 6000, 4096, 4096)
        assert bytes(reply) == b"x" * (6000 - 4096)
        await ra.aclose()

    trio.run(main)
    assert sorted(stored) == [(0, b"a" * 4096), (0, b"x" * 4096), (8192, b"c" * 4096)]


def test_pending_bytes_limit_the_widening(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow_store(ino: int, offset: int, data: bytes) -> None:
        release.wait(10)

    monkeypatch.setattr(readaround, "MAX_PENDING_BYTES", 2 * W)

    async def main() -> None:
        ra = ReadAround(W, store=slow_store)
        for i in range(3):
            window = ra.window_for(i, i * 8 * W, 4096)
            assert window is not None
            ra.reply(7, window[0], bytes(W), i * 8 * W, 4096)
        # Three windows of ~W wait to be stored: more than the limit, so no widening.
        assert ra.window_for(99, 50 * W, 4096) is None
        release.set()
        await ra.aclose()
        assert ra.stored_bytes == 3 * (W - 4096)

    trio.run(main)


def test_aclose_waits_for_stores_and_stops_widening() -> None:
    calls: list[int] = []

    def store(ino: int, offset: int, data: bytes) -> None:
        calls.append(offset)

    async def main() -> None:
        ra = ReadAround(W, store=store)
        ra.reply(1, 0, bytes(W), 0, 4096)
        await ra.aclose()
        assert calls == [4096]  # done before aclose returned
        assert ra.window_for(5, 9 * W, 4096) is None
        ra.reply(1, 0, bytes(W), 0, 4096)  # after close: the reply only
        await trio.testing.wait_all_tasks_blocked()
        assert calls == [4096]

    trio.run(main)


def test_aclose_aborts_the_connection_when_a_store_hangs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A store waiting for a page lock of a read nobody answers any more: only aborting the
    # FUSE connection (which fails that read) lets it return.
    unblocked = threading.Event()
    aborted: list[bool] = []

    def store(ino: int, offset: int, data: bytes) -> None:
        unblocked.wait(20)
        raise OSError(107, "Transport endpoint is not connected")

    def abort() -> bool:
        aborted.append(True)
        unblocked.set()
        return True

    monkeypatch.setattr(readaround, "DRAIN_TIMEOUT_S", 0.3)

    async def main() -> None:
        ra = ReadAround(W, store=store)
        ra.reply(1, 0, bytes(W), 0, 4096)
        with trio.fail_after(5):
            await ra.aclose(abort)
        assert ra.failed_stores == 1

    trio.run(main)
    assert aborted == [True]
    assert "aborted the FUSE connection" in caplog.text


def test_aclose_gives_up_rather_than_hang(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    monkeypatch.setattr(readaround, "DRAIN_TIMEOUT_S", 0.2)

    async def main() -> None:
        ra = ReadAround(W, store=lambda ino, off, d: release.wait(20))
        ra.reply(1, 0, bytes(W), 0, 4096)
        with trio.fail_after(5):
            await ra.aclose(lambda: False)
        release.set()  # let the worker thread end before the nursery closes

    trio.run(main)
    assert "cannot abort the FUSE connection" in caplog.text
    assert "did not end; going on" in caplog.text


# -- store-ahead: zeros for the holes ahead of a sequential stream ---------------------------
MiB = 1 << 20
S = MiB  # the stripe: the kernel's read-ahead window


def _holes_between(holes: list[tuple[int, int]]) -> HolesFn:
    """A ``holes`` function over fixed hole ranges (as an open disk file gives it)."""

    def holes_fn(start: int, end: int) -> list[tuple[int, int]]:
        return [(max(s, start), min(e, end)) for s, e in holes if s < end and e > start]

    return holes_fn


def _stream(ra: ReadAround, reads: list[tuple[int, int]], holes_fn: HolesFn) -> None:
    """Reads of file handle 1 (inode 9) as the FUSE read handler makes them."""
    for offset, size in reads:
        assert ra.window_for(1, offset, size) is None  # sequential: never widened
        ra.store_ahead(1, 9, offset, size, holes_fn)


def test_store_ahead_of_a_sequential_stream_leaves_each_stripes_first_page() -> None:
    stored: list[tuple[int, int, int, bytes]] = []

    def store(ino: int, offset: int, data: bytes | memoryview) -> None:
        stored.append((ino, offset, len(data), bytes(data[:16])))

    holes_fn = _holes_between([(0, 64 * MiB)])  # all holes

    async def main() -> None:
        ra = ReadAround(W, ahead=4 * MiB, stripe=S, store=store)
        # The kernel's first windows: 1 MiB requests, in order.
        _stream(ra, [(0, S), (S, S)], holes_fn)
        await ra.aclose()
        # After the second read (ends at 2 MiB): stripes from 3 MiB (the kernel's next
        # window at 2 MiB is its own) to 6 MiB, each without its first page.
        assert ra.ahead_bytes == 3 * (S - 4096)

    trio.run(main)
    assert [(ino, off, n) for ino, off, n, _ in stored] == [
        (9, 3 * S + 4096, S - 4096), (9, 4 * S + 4096, S - 4096), (9, 5 * S + 4096, S - 4096),
    ]  # fmt: skip
    assert all(head == bytes(16) for *_, head in stored)


def test_store_ahead_follows_the_kernels_page_requests_and_stores_holes_only() -> None:
    stored: list[tuple[int, int]] = []
    # Data at [5 MiB + 512 KiB, 6 MiB + 8 KiB); holes elsewhere.
    holes_fn = _holes_between([(0, 5 * S + 512 * KiB), (6 * S + 8 * KiB, 64 * MiB)])

    async def main() -> None:
        ra = ReadAround(
            W, ahead=4 * MiB, stripe=S, store=lambda i, o, d: stored.append((o, len(d)))
        )
        _stream(ra, [(0, S), (S, S)], holes_fn)  # queued: stripes 3, 4, 5
        assert await ra.wait_idle()
        # With those pages stored, the kernel asks only for each stripe's first page: a
        # read past the last one's end that still continues the stream.
        _stream(ra, [(2 * S, S), (3 * S, 4096)], holes_fn)  # up to 7 MiB: stripe 6
        await ra.aclose()

    trio.run(main)
    assert stored == [
        (3 * S + 4096, S - 4096), (4 * S + 4096, S - 4096),
        (5 * S + 4096, 512 * KiB - 4096),  # stops where the data starts
        (6 * S + 8 * KiB, S - 8 * KiB),  # the data's end: its first page is data anyway
    ]  # fmt: skip


def test_store_ahead_phase_skips_and_stops() -> None:
    stored: list[tuple[int, int]] = []
    holes_fn = _holes_between([(0, 1 << 40)])
    gate = threading.Event()

    def store(ino: int, offset: int, data: bytes | memoryview) -> None:
        gate.wait(10)
        stored.append((offset, len(data)))

    async def main() -> None:
        ra = ReadAround(W, ahead=4 * MiB, stripe=S, store=store)
        # A stream that started 64 KiB into the file: its stripes are in that phase.
        base = 64 * KiB
        _stream(ra, [(base, S), (base + S, S)], holes_fn)  # stripes at base + 3..5 MiB
        # The reader jumps far ahead (the store thread is held): stores it has passed are
        # skipped, not made (the kernel asks for those pages itself).
        assert ra.window_for(1, base + 2 * S, S) is None
        assert ra.window_for(1, base + 3 * S, S) is None
        gate.set()
        assert await ra.wait_idle()
        assert stored == [(base + 5 * S + 4096, S - 4096)]
        assert ra.stale_bytes == 2 * (S - 4096)
        # A random jump ends the stream: nothing is stored ahead of a random read.
        assert ra.window_for(1, 900 * S, 4096) == (900 * S, W)
        ra.store_ahead(1, 9, 900 * S, 4096, holes_fn)
        await ra.aclose()
        assert len(stored) == 1

    trio.run(main)


def test_store_ahead_needs_large_sequential_reads_and_can_be_off() -> None:
    stored: list[int] = []
    holes_fn = _holes_between([(0, 1 << 40)])

    async def main() -> None:
        # Small sequential reads (not the kernel's read-ahead at full size): no stream.
        ra = ReadAround(W, ahead=4 * MiB, stripe=S, store=lambda i, o, d: stored.append(o))
        ra.window_for(1, 0, 4096)  # a first read: random (widened)
        ra.store_ahead(1, 9, 0, 4096, holes_fn)
        _stream(ra, [(4096, 64 * KiB), (68 * KiB, 64 * KiB), (132 * KiB, 64 * KiB)], holes_fn)
        await ra.aclose()
        # Off.
        off = ReadAround(W, ahead=0, stripe=S, store=lambda i, o, d: stored.append(o))
        _stream(off, [(0, S), (S, S), (2 * S, S)], holes_fn)
        await off.aclose()

    trio.run(main)
    assert stored == []


def test_a_reader_of_mostly_holes_is_not_widened() -> None:
    ra = ReadAround(W, store=lambda ino, off, data: None)
    # Reads of data: widened; of holes: never.
    assert ra.worth_widening(1, True)
    assert not ra.worth_widening(1, False)
    assert ra.worth_widening(1, True)  # 1 of 3 reads on holes
    # A reader spread over a sparse disk: three of four reads are holes. Its data reads are
    # no longer widened once holes are most of what it read.
    pattern = [False, False, False, True] * 40
    widened = [ra.worth_widening(2, data) for data in pattern]
    assert widened[3] is False and not any(widened)
    # It moves into the data (a guest filesystem's files): widened again within a few
    # dozen reads (recent reads weigh most).
    widened = [ra.worth_widening(2, True) for _ in range(60)]
    assert widened[-1] and widened.index(True) < 40
    # Per handle, and forgotten with it.
    assert ra.worth_widening(3, True)
    ra.forget(2)
    assert ra.worth_widening(2, True)


def test_several_store_threads_share_a_stream_and_all_stop() -> None:
    # Each stripe is its own job, so the threads store a stream's stripes side by side: with
    # two threads, the first two stores are in flight together (each waits for the other).
    in_store = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    stored: list[tuple[int, int, str]] = []
    arrivals = iter(range(1 << 30))  # next() under the GIL: each store gets its own number

    def store(ino: int, offset: int, data: bytes | memoryview) -> None:
        if next(arrivals) < 2:
            in_store.wait()  # raises BrokenBarrierError if the second thread never comes
        with lock:
            stored.append((offset, len(data), threading.current_thread().name))

    holes_fn = _holes_between([(0, 64 * MiB)])

    async def main() -> None:
        ra = ReadAround(W, ahead=6 * MiB, stripe=S, store=store, threads=2)
        _stream(ra, [(0, S), (S, S)], holes_fn)
        await ra.aclose()
        assert ra.failed_stores == 0
        assert ra.ahead_bytes == 5 * (S - 4096)  # stripes 3..7 MiB, counted by both threads
        workers = list(ra._workers)
        assert len(workers) == 2
        for worker in workers:
            worker.join(timeout=5)
            assert not worker.is_alive()  # aclose stopped every thread

    trio.run(main)
    assert sorted(off for off, _, _ in stored) == [k * S + 4096 for k in range(3, 8)]
    assert len({name for *_, name in stored}) == 2


class _RecordingProcess:
    """Stands in for the store process (snapfs.storeproc, tested as a real process in
    tests/unit/test_storeproc.py): records the jobs and acknowledges each at once."""

    def __init__(self, ra: ReadAround, refuse_data: bool = False) -> None:
        self.ra = ra
        self.zeros: list[tuple[int, int]] = []
        self.data: list[tuple[str, int, int]] = []
        self.refuse_data = refuse_data

    def submit(self, ino: int, offset: int, length: int) -> bool:
        self.zeros.append((offset, length))
        self.ra._acked(ZEROS, 0, length)
        return True

    def submit_data(self, socket_path: str, ino: int, offset: int, length: int) -> bool:
        if self.refuse_data:
            return False
        self.data.append((socket_path, offset, length))
        self.ra._acked(DATA, 0, length)
        return True

    def close(self, timeout: float) -> bool:
        return True


def test_store_ahead_sends_data_to_the_store_process_and_leaves_a_page_per_gap() -> None:
    # 16 MiB ahead: the kernel keeps one page per 4 MiB (a quarter of the distance), and
    # asks for it: the daemon sees the reader's progress four times per distance ahead.
    holes_fn = _holes_between([(0, 5 * S + 512 * KiB), (40 * S, 64 * S)])

    def data_fn(start: int, end: int) -> tuple[str, list[tuple[int, int]]]:
        return "/run/x.sock", [(max(start, 5 * S + 512 * KiB), min(end, 40 * S))]

    async def main() -> None:
        ra = ReadAround(W, ahead=16 * MiB, stripe=S, data_ahead=True)
        assert ra.gap == 4 * S
        fake = _RecordingProcess(ra)
        ra._process = fake  # type: ignore[assignment]
        for offset, size in [(0, S), (S, S)]:
            assert ra.window_for(1, offset, size) is None
            ra.store_ahead(1, 9, offset, size, holes_fn, data_fn)
        assert await ra.wait_idle()
        # From 3 MiB (the kernel's next window at 2 MiB is its own) to 18 MiB, in stripes;
        # the first page of 4, 8, 12 and 16 MiB left out.
        assert fake.zeros == [(3 * S, S), (4 * S + 4096, S - 4096), (5 * S, 512 * KiB)]
        expected = [(5 * S + 512 * KiB, 512 * KiB)] + [
            (k * S + (4096 if k % 4 == 0 else 0), S - (4096 if k % 4 == 0 else 0))
            for k in range(6, 18)
        ]
        assert [(o, n) for _, o, n in fake.data] == expected
        assert {p for p, _, _ in fake.data} == {"/run/x.sock"}
        assert ra.data_ahead_bytes == sum(n for _, n in expected)
        # The kernel's request for the page left at 4 MiB continues the stream.
        assert ra.window_for(1, 4 * S, 4096) is None
        await ra.aclose()
        assert "MiB of data stored ahead" in ra.summary()

    trio.run(main)


def test_data_is_not_stored_ahead_when_off_or_refused() -> None:
    holes_fn = _holes_between([])

    def data_fn(start: int, end: int) -> tuple[str, list[tuple[int, int]]]:
        return "/run/x.sock", [(start, end)]

    async def main() -> None:
        for data_ahead, refuse in ((False, False), (True, True)):
            ra = ReadAround(W, ahead=16 * MiB, stripe=S, data_ahead=data_ahead)
            fake = _RecordingProcess(ra, refuse_data=refuse)
            ra._process = fake  # type: ignore[assignment]
            for offset, size in [(0, S), (S, S)]:
                ra.window_for(1, offset, size)
                ra.store_ahead(1, 9, offset, size, holes_fn, data_fn)
            # Refused jobs are not pending: nothing to wait for, nothing counted.
            assert ra._pending == 0 and ra.data_ahead_bytes == 0 and fake.data == []
            await ra.aclose()

    trio.run(main)
