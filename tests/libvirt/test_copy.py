"""The pipelined copy loop of ``snapfs.libvirt.backup`` between two real qemu-nbd servers:
byte-exact (random data, holes, zeroed ranges over old data, odd sizes), several requests
really in flight, progress reported in order, and a server dying mid-copy is an error."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import nbd
import pytest

from snapfs.libvirt import backup
from snapfs.nbd.extents import query_extents
from tests import imaging

MiB = 1 << 20
KiB = 1 << 10


def serve(image: Path, fmt: str, *, readonly: bool) -> Any:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    args = ["qemu-nbd", "-f", fmt, "--cache=writeback", "--aio=threads"]
    h.connect_systemd_socket_activation([*args, *(["-r"] if readonly else []), str(image)])
    return h


def test_copy_ranges_is_byte_exact_and_pipelined(tmp_path: Path) -> None:
    size = 40 * MiB + 12345
    data = [(0, 9 * MiB + 7), (12 * MiB, 64 * KiB), (20 * MiB, 17 * MiB + 3), (40 * MiB, 12345)]
    src_img = imaging.random_raw(tmp_path / "src.raw", size, data)
    # The destination holds old data where the copy must write zeroes.
    dst_img = imaging.random_raw(tmp_path / "dst.raw", size, [(10 * MiB, 2 * MiB)])
    src = serve(src_img, "raw", readonly=True)
    dst = serve(dst_img, "raw", readonly=False)
    try:
        allocation = query_extents(src, size)
        ranges = [(s, e - s, True) for s, e in allocation.ranges()]
        ranges.append((10 * MiB, 2 * MiB, False))  # a dirty range that reads as zeroes now
        in_flight: list[int] = []
        reports: list[int] = []

        def report(done: int) -> None:
            reports.append(done)
            in_flight.append(src.aio_in_flight() + dst.aio_in_flight())

        backup.copy_ranges(src, dst, ranges, report)
        dst.flush()
    finally:
        backup._close(src)
        backup._close(dst)
    total = sum(n for _, n, d in ranges if d)
    assert reports == sorted(reports) and reports[-1] == total
    assert max(in_flight) > 1, "the copy never had two requests in flight"
    assert dst_img.read_bytes() == src_img.read_bytes()


def test_copy_ranges_fails_when_the_writer_dies(tmp_path: Path) -> None:
    size = 32 * MiB
    src_img = imaging.random_raw(tmp_path / "src.raw", size, [(0, size)])
    dst_img = tmp_path / "dst.qcow2"
    imaging.run("qemu-img", "create", "-q", "-f", "qcow2", dst_img, str(size))
    src = serve(src_img, "raw", readonly=True)
    dst = serve(dst_img, "qcow2", readonly=False)

    def kill_writer(done: int) -> None:
        pids = subprocess.run(
            ["pgrep", "-f", f"qemu-nbd.*{dst_img}"], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)

    try:
        with pytest.raises(nbd.Error):
            backup.copy_ranges(src, dst, [(0, size, True)], kill_writer)
    finally:
        backup._close(src)
        backup._close(dst)
