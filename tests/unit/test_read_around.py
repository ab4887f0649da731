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
from snapfs.readaround import ReadAround

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
