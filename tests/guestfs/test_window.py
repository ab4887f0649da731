"""The window cache of mapped reads (extents.WindowCache): bytes equal to the disk's, and
one NBD read per window for a reader of many small neighbouring files. No appliance."""

from __future__ import annotations

import os
import random

import trio

from snapfs.guestfs.extents import WindowCache

W = 64 << 10
DISK = os.urandom(10 * W + 1000)  # the last window is short: past the end of the disk


class _Disk:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, disk: str, offset: int, length: int) -> bytes:
        assert disk == "vda"
        if offset + length > len(DISK):
            raise OSError("read beyond the end of the export")
        self.calls.append((offset, length))
        return DISK[offset : offset + length]


def test_random_reads_equal_the_disk() -> None:
    disk = _Disk()
    cache = WindowCache(disk, window=W, max_windows=3, small=8192)
    rng = random.Random(7)

    async def main() -> None:
        for _ in range(3000):
            offset = rng.randrange(len(DISK) - 1)
            length = rng.choice([1, 512, 4096, 8192, 20000])
            length = min(length, len(DISK) - offset)
            assert await cache("vda", offset, length) == DISK[offset : offset + length]

    trio.run(main)
    assert cache.hits > 0 and cache.fills > 0


def test_neighbouring_small_files_cost_one_window_read() -> None:
    disk = _Disk()
    cache = WindowCache(disk, window=W, small=8192)
    files = [(W + i * 5000, 3000) for i in range(12)]  # twelve small files in one window

    async def main() -> None:
        for offset, length in files:
            assert await cache("vda", offset, length) == DISK[offset : offset + length]

    trio.run(main)
    # the first file alone, then the window; the other ten from memory
    assert disk.calls == [files[0], (W, W)]
    assert cache.hits == 10


def test_big_reads_and_the_short_last_window_go_straight_through() -> None:
    disk = _Disk()
    cache = WindowCache(disk, window=W, small=8192)
    tail = 10 * W + 100

    async def main() -> None:
        assert await cache("vda", 0, 20000) == DISK[:20000]  # bigger than small
        assert await cache("vda", W - 10, 100) == DISK[W - 10 : W + 90]  # spans two windows
        for _ in range(3):  # the last window cannot be read whole: the pieces are read
            assert await cache("vda", tail, 500) == DISK[tail : tail + 500]

    trio.run(main)
    assert cache.fills == 0
    assert disk.calls == [(0, 20000), (W - 10, 100), (tail, 500), (tail, 500), (tail, 500)]
