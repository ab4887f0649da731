"""Read-around through a real mount: a random read of a snapshot disk stores its window in
the kernel's page cache (FUSE notify_store), so nearby reads never reach the daemon.

Checked against ``qemu-img convert -O raw`` of the image, with page-cache residency from
``fincore`` and the daemon's own count of read requests (logged at unmount).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from snapfs.catalog import writer
from tests import imaging
from tests.fusemount import Mounted, kill_tree_check, mounted, needs_fuse, start_mount

pytestmark = [needs_fuse, pytest.mark.fuse]

KiB = 1024
MiB = 1 << 20
WINDOW = 256 * KiB  # the default [nbd] read_around_kb
SIZE = 16 * MiB + 12 * KiB  # not a multiple of the window: the last one is short


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A repository with one qcow2 disk (data, holes, a short last window) and its bytes."""
    data = [(0, 8 * MiB), (10 * MiB + 100 * KiB, 40 * KiB), (SIZE - 8 * KiB, 8 * KiB)]
    return repo_with_disk(tmp_path_factory.mktemp("readaround"), SIZE, data)


def repo_with_disk(tmp: Path, size: int, data: list[tuple[int, int]]) -> tuple[Path, bytes]:
    """A repository in ``tmp`` with snapshot s1 of VM vm: one qcow2 disk of ``size`` bytes,
    random ``data`` (offset, length) and holes elsewhere; and the disk's bytes."""
    repo = tmp / "repo"
    writer.init_repository(repo)
    src = imaging.random_raw(tmp / "src.raw", size, data)
    writer.add_snapshot(
        repo, "vm", [writer.DiskSource("vda", src, "raw")], format="qcow2", name="s1",
        created=1_700_000_000,
    )  # fmt: skip
    image = next((repo / "vms").rglob("vda.qcow2"))
    return repo, imaging.to_raw(image, tmp / "ref.raw")


def image_of(m: Mounted) -> Path:
    return m.path / "vm" / "snapshots" / "s1" / "disks" / "vda.img"


def resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def wait_resident(path: Path, expected: int, timeout: float = 10.0) -> int:
    """Resident bytes of ``path`` once they reach ``expected`` (stores run after the reply)."""
    deadline = time.monotonic() + timeout
    while (got := resident_bytes(path)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def reads_served(m: Mounted) -> int:
    """The daemon's read requests, from its unmount summary (call after unmounting)."""
    found = re.search(r"FUSE requests served: .*\bread (\d+)", m.log_text())
    assert found, m.log_text()
    return int(found.group(1))


# Who reads and stores a widened window: the store process over its own NBD connection (the
# default), or the loop, whose daemon thread stores it (no store process, or no data reads).
AROUND_MODES = {
    "process": "",
    "loop, no store process": "[nbd]\nstore_process = false\n",
    "loop, no data reads": "[nbd]\nstore_data = false\n",
}


def around_config(tmp_path: Path, mode: str) -> tuple[str, ...]:
    config = tmp_path / "config.toml"
    config.write_text(AROUND_MODES[mode])
    return ("--config", str(config))


def windows_by_process(m: Mounted) -> int:
    found = re.search(r"\((\d+) windows read by the store process\)", m.log_text())
    assert found, m.log_text()
    return int(found.group(1))


@pytest.mark.parametrize("mode", AROUND_MODES)
def test_random_read_stores_its_window(
    disk: tuple[Path, bytes], tmp_path: Path, mode: str
) -> None:
    repo, ref = disk
    offset = 3 * MiB + 40 * KiB
    start = offset - offset % WINDOW
    with mounted(repo, tmp_path / "m", *around_config(tmp_path, mode)) as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            assert resident_bytes(img) == 0
            assert os.pread(fd, 4096, offset) == ref[offset : offset + 4096]
            # The window is in the page cache: exactly it, nothing more.
            assert wait_resident(img, WINDOW) == WINDOW
            # Every page of it reads right, from the page cache (in random order).
            pages = list(range(start, start + WINDOW, 4096))
            random.Random(7).shuffle(pages)
            for page in pages:
                assert os.pread(fd, 4096, page) == ref[page : page + 4096], page
        finally:
            os.close(fd)
    # The 64 page reads above reached the daemon once: the first one.
    assert reads_served(m) == 1
    assert "read-around: 1 random reads widened, 0.2 MiB stored" in m.log_text()
    assert windows_by_process(m) == (1 if mode == "process" else 0)


def test_a_large_window_is_stored_whole_by_the_store_process(
    disk: tuple[Path, bytes], tmp_path: Path
) -> None:
    """A window larger than one store job (``read_around_kb`` up to 16 MiB; a job stores at
    most 1 MiB) is stored whole, in several jobs, none of them failing."""
    repo, ref = disk
    config = tmp_path / "config.toml"
    config.write_text("[nbd]\nread_around_kb = 4096\n")
    offset = 5 * MiB + 12 * KiB  # in the window 4-8 MiB, all data
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            assert os.pread(fd, 4096, offset) == ref[offset : offset + 4096]
            assert wait_resident(img, 4 * MiB) == 4 * MiB
            assert os.pread(fd, 8192, 4 * MiB) == ref[4 * MiB : 4 * MiB + 8192]
        finally:
            os.close(fd)
    assert reads_served(m) == 1
    assert windows_by_process(m) == 1
    assert "reads failed" not in m.log_text(), m.log_text()


@pytest.mark.parametrize("mode", AROUND_MODES)
def test_reads_of_holes_are_not_widened(
    disk: tuple[Path, bytes], tmp_path: Path, mode: str
) -> None:
    """A hole costs no server read: widening it would only fill the page cache with zeros.
    A window with data is stored whole, its holes too."""
    repo, ref = disk
    with mounted(repo, tmp_path / "m", *around_config(tmp_path, mode)) as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            assert os.pread(fd, 4096, 12 * MiB) == bytes(4096)
            # The same window holds data further on: a read touching it is widened.
            assert os.pread(fd, 4096, 10 * MiB + 96 * KiB) == ref[10 * MiB + 96 * KiB :][:4096]
            assert wait_resident(img, 4096 + WINDOW) == 4096 + WINDOW
        finally:
            os.close(fd)
    assert "read-around: 1 random reads widened" in m.log_text()
    assert windows_by_process(m) == (1 if mode == "process" else 0)


def test_read_around_off_reads_as_asked(disk: tuple[Path, bytes], tmp_path: Path) -> None:
    repo, ref = disk
    config = tmp_path / "config.toml"
    config.write_text("[nbd]\nread_around_kb = 0\n")
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            for page in (3 * MiB + 40 * KiB, 3 * MiB, 3 * MiB + 200 * KiB, 3 * MiB + 100 * KiB):
                assert os.pread(fd, 4096, page) == ref[page : page + 4096]
            time.sleep(0.5)
            assert resident_bytes(img) == 4 * 4096
        finally:
            os.close(fd)
    assert reads_served(m) == 4


@pytest.mark.parametrize("mode", AROUND_MODES)
def test_windows_over_holes_and_the_disk_end_read_right(
    disk: tuple[Path, bytes], tmp_path: Path, mode: str
) -> None:
    """Random reads everywhere (data, holes, the data/hole edges, the short last window), then
    the whole file through the page cache they filled: equal to qemu-img's bytes. No store
    fails (the last window stops at the disk's end)."""
    repo, ref = disk
    rng = random.Random(3)
    offsets = [SIZE - 4096, SIZE - 100, 8 * MiB - 2048, 10 * MiB + 100 * KiB - 10, 12 * MiB]
    offsets += [rng.randrange(0, SIZE) for _ in range(200)]
    with mounted(repo, tmp_path / "m", *around_config(tmp_path, mode)) as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            for offset in offsets:
                size = rng.choice((1, 512, 4096, 5000))
                assert os.pread(fd, size, offset) == ref[offset : offset + size], offset
            wait_resident(img, WINDOW)
            assert img.read_bytes() == ref
        finally:
            os.close(fd)
        assert "read-around: cannot store" not in m.log_text()
    assert "reads failed" not in m.log_text() and "stores failed" not in m.log_text()
    assert "cannot read data ahead" not in m.log_text()
    assert (windows_by_process(m) > 0) == (mode == "process"), m.log_text()


def test_unmount_by_signal_during_random_reads(disk: tuple[Path, bytes], tmp_path: Path) -> None:
    """SIGTERM while random readers keep stores in flight: the daemon drains them and exits
    cleanly, its server goes, nothing stays mounted."""
    repo, ref = disk
    m = start_mount(repo, tmp_path / "m")
    img = image_of(m)
    stop = threading.Event()
    stop_sent = threading.Event()  # SIGTERM sent: reads may now end early
    errors: list[BaseException] = []
    reads = [0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            fd = os.open(img, os.O_RDONLY)
        except OSError as exc:
            errors.append(exc)
            return
        try:
            while not stop.is_set():
                evict(fd)
                for _ in range(50):
                    offset = rng.randrange(0, SIZE - 4096)
                    data = os.pread(fd, 4096, offset)
                    # While the mount goes away a read may end early: the pages it had in
                    # the page cache, then the error (a short count). Its bytes must still
                    # be the disk's.
                    if data != ref[offset : offset + len(data)] or (
                        len(data) < 4096 and not stop_sent.is_set()
                    ):
                        errors.append(AssertionError(f"{len(data)} wrong bytes at {offset}"))
                    reads[0] += 1
        except OSError:
            pass  # the mount went away under the reader: expected
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while reads[0] < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        servers = m.server_pids()
        assert servers
        stop_sent.set()
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(30) == 0, m.log_text()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        if m.proc.poll() is None:
            m.proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    assert errors == []
    assert kill_tree_check(servers) == []
    log = m.log_text()
    assert "stores did not end" not in log
    assert re.search(r"read-around: [1-9]\d* random reads widened", log), log


def test_random_and_sequential_readers_together(disk: tuple[Path, bytes], tmp_path: Path) -> None:
    """Stores racing the kernel's own read-ahead of the same pages (a store waits for pages
    locked by a read the daemon is answering): every reader gets the right bytes, none hangs."""
    repo, ref = disk
    with mounted(repo, tmp_path / "m") as m:
        img = image_of(m)
        errors: list[str] = []

        def sequential() -> None:
            with open(img, "rb", buffering=0) as f:
                for _ in range(3):
                    evict(f.fileno())
                    data = bytearray()
                    while chunk := f.read(MiB):
                        data += chunk
                    f.seek(0)
                    if bytes(data) != ref:
                        errors.append("sequential reader got wrong bytes")

        def random_reader(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(img, os.O_RDONLY)
            try:
                for i in range(1500):
                    if i % 300 == 0:
                        evict(fd)
                    offset = rng.randrange(0, SIZE)
                    if os.pread(fd, 4096, offset) != ref[offset : offset + 4096]:
                        errors.append(f"random reader {seed}: wrong bytes at {offset}")
            finally:
                os.close(fd)

        threads = [threading.Thread(target=sequential)]
        threads += [threading.Thread(target=random_reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a reader hung"
        assert errors == []
    assert re.search(r"read-around: [1-9]\d* random reads widened", m.log_text())


# -- store-ahead: the holes ahead of a sequential reader go into the page cache ---------------
SPARSE_SIZE = 48 * MiB + 8 * KiB
# Data in the first MiB, part of one stripe, 12 MiB in one piece, two pages, and the disk's
# last 8 KiB; holes elsewhere (~34 MiB).
SPARSE_DATA = [(0, MiB), (20 * MiB + 300 * KiB, 724 * KiB), (24 * MiB, 12 * MiB),
               (37 * MiB, 8 * KiB), (SPARSE_SIZE - 8 * KiB, 8 * KiB)]  # fmt: skip


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    return repo_with_disk(tmp_path_factory.mktemp("storeahead"), SPARSE_SIZE, SPARSE_DATA)


def read_in_order(fd: int, size: int, block: int = MiB) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, block, len(out))
        assert chunk, f"early end at {len(out)}"
        out += chunk
    return bytes(out)


def ahead_stored_mib(m: Mounted) -> float:
    """MiB of holes stored ahead of sequential reads (from the unmount log)."""
    found = re.search(r"([\d.]+) MiB of holes stored ahead", m.log_text())
    assert found, m.log_text()
    return float(found.group(1))


def store_process_pids(m: Mounted) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(m.proc.pid), "-f", "snapfs.storeproc"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def data_stored_mib(m: Mounted) -> float:
    """MiB of data stored ahead of sequential reads by the store process (unmount log)."""
    found = re.search(r"([\d.]+) MiB of data stored ahead", m.log_text())
    assert found, m.log_text()
    return float(found.group(1))


@pytest.mark.parametrize("mode", ["process", "process, no data", "threads"])
@pytest.mark.parametrize("block", [MiB, 128 * KiB])
def test_store_ahead_fills_holes_for_a_sequential_reader(
    sparse: tuple[Path, bytes], tmp_path: Path, block: int, mode: str
) -> None:
    """A whole-file read in order: the holes ahead of it are stored as zeros by the store
    process (or the daemon's store threads), and the data by the store process, which reads
    it from the disk's qemu-nbd itself (unless ``store_data = false``). The file reads
    right, twice: the second time from the page cache as filled. The process ends with the
    mount."""
    repo, ref = sparse
    config = tmp_path / "config.toml"
    process = mode.startswith("process")
    config.write_text(
        f"[nbd]\nstore_process = {str(process).lower()}\n"
        f"store_data = {str(mode == 'process').lower()}\n"
    )
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        helpers = store_process_pids(m)
        assert len(helpers) == (1 if process else 0), m.log_text()
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            assert read_in_order(fd, SPARSE_SIZE, block) == ref
            # Resident as read, but for what this VM's DAMON pageout scheme may take at once
            # (it pages out fresh pages of physical regions it has seen idle: 40-256 KiB of
            # the 48 MiB gone in 3 of ~20 runs of this module, never with DAMON off; as in
            # the bench's case 4, docs/benchmarks.md session 10).
            assert wait_resident(img, SPARSE_SIZE, timeout=2.0) >= SPARSE_SIZE * 99 // 100
            # The page cache as filled: read again (no eviction) through another handle.
            assert img.read_bytes() == ref
        finally:
            os.close(fd)
    # Holes: ~34 MiB; stored ahead is most of it (a store the reader caught up with is
    # skipped, and each stripe's first page is the kernel's to read).
    assert ahead_stored_mib(m) > 8, m.log_text()
    assert "cannot store" not in m.log_text()
    assert "store process ended" not in m.log_text()
    by_process = re.search(r"([\d.]+) MiB of it by the store process", m.log_text())
    assert by_process, m.log_text()
    if process:
        assert float(by_process.group(1)) > 8, m.log_text()
    else:
        assert float(by_process.group(1)) == 0
    # Data: ~14 MiB, most of it past the first 16 MiB ahead of the stream's start.
    if mode == "process":
        assert data_stored_mib(m) > 4, m.log_text()
    else:
        assert data_stored_mib(m) == 0, m.log_text()
    assert "cannot read data ahead" not in m.log_text()
    assert kill_tree_check(helpers) == [], "the store process outlived its mount"


def test_store_ahead_off(sparse: tuple[Path, bytes], tmp_path: Path) -> None:
    repo, ref = sparse
    config = tmp_path / "config.toml"
    config.write_text("[nbd]\nstore_ahead_kb = 0\n")
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        fd = os.open(image_of(m), os.O_RDONLY)
        try:
            evict(fd)
            assert read_in_order(fd, SPARSE_SIZE) == ref
        finally:
            os.close(fd)
    assert ahead_stored_mib(m) == 0


def read_direct(fd: int, offset: int, size: int) -> bytes:
    """One pread into a page-aligned buffer (what O_DIRECT readers use)."""
    with mmap.mmap(-1, max(size, mmap.PAGESIZE)) as buf:
        n = os.preadv(fd, [memoryview(buf)[:size]], offset)
        return bytes(buf[:n])


def direct_reads_right(fd: int, ref: bytes, read: Callable[[int, int, int], bytes]) -> None:
    """The whole disk in order, then random reads of data, holes and their edges."""
    whole = bytearray()
    while len(whole) < SPARSE_SIZE:
        chunk = read(fd, len(whole), MiB)
        assert chunk, f"early end at {len(whole)}"
        whole += chunk
    assert whole == ref
    rng = random.Random(5)
    offsets = [24 * MiB + 40 * KiB, 24 * MiB - 100, 37 * MiB, SPARSE_SIZE - 4096, 5 * MiB]
    for offset in offsets + [rng.randrange(0, SPARSE_SIZE) for _ in range(100)]:
        size = rng.choice((512, 4096, 5000, 200 * KiB))
        assert read(fd, offset, size) == ref[offset : offset + size], offset


@pytest.mark.parametrize("how", ["config", "flag"])
def test_page_cache_off_reads_disks_uncached(
    sparse: tuple[Path, bytes], tmp_path: Path, how: str
) -> None:
    """``[nbd] page_cache = false`` (or ``mount --no-page-cache``): snapshot disks are opened
    with FOPEN_DIRECT_IO. Every read equals qemu-img's bytes and reaches the daemon (a second
    read too); nothing goes into the page cache (no read-around, no store-ahead, no store
    process)."""
    repo, ref = sparse
    config = tmp_path / "config.toml"
    config.write_text("[nbd]\npage_cache = false\n")
    options = ("--config", str(config)) if how == "config" else ("--no-page-cache",)
    with mounted(repo, tmp_path / "m", *options) as m:
        assert store_process_pids(m) == [], m.log_text()
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY)
        try:
            evict(fd)
            direct_reads_right(fd, ref, lambda fd, offset, size: os.pread(fd, size, offset))
            assert img.read_bytes() == ref  # another open: uncached as well
            time.sleep(0.3)  # a store, had one been queued, would have landed by now
            assert resident_bytes(img) == 0
        finally:
            os.close(fd)
    # Two whole reads in 1 MiB requests (at most) and 105 random ones, all answered.
    assert reads_served(m) >= 2 * (SPARSE_SIZE // MiB) + 105
    assert "read-around: 0 random reads widened, 0.0 MiB stored" in m.log_text()
    assert ahead_stored_mib(m) == 0


def test_o_direct_readers_bypass_the_page_cache(sparse: tuple[Path, bytes], tmp_path: Path) -> None:
    """A reader that opens a snapshot disk with O_DIRECT (``dd iflag=direct``, ``qemu-img
    convert -T none``) is served uncached on a mount that keeps the page cache: no windows or
    holes stored for it. A plain open of the same file still gets read-around."""
    repo, ref = sparse
    with mounted(repo, tmp_path / "m") as m:
        img = image_of(m)
        fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
        try:
            evict(fd)
            direct_reads_right(fd, ref, read_direct)
            time.sleep(0.3)
            assert resident_bytes(img) == 0
        finally:
            os.close(fd)
        fd = os.open(img, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 24 * MiB + 40 * KiB) == ref[24 * MiB + 40 * KiB :][:4096]
            assert wait_resident(img, WINDOW) == WINDOW
        finally:
            os.close(fd)
    assert "read-around: 1 random reads widened" in m.log_text()
    assert ahead_stored_mib(m) == 0
