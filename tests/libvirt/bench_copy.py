"""Benchmark of the backup copy loop (docs/benchmarks.md, "backup copy").

Starts a private libvirtd (tests/libvirt/daemon.py), one TCG domain whose disk holds
``--data`` MiB of written data, and times ``DomainBackup.copy`` of full backups into fresh
repositories: the synchronous loop snapfs had before (one 4 MiB ``pread`` then ``pwrite``
at a time, kept here as the reference) against the pipelined ``copy_ranges`` at several
depths (and with the writing qemu-nbd at ``--cache=unsafe``, the commit's fsync making the
data durable), over the local unix socket and over TCP (``qemu+tcp://127.0.0.1``, no TLS).
Configurations run interleaved, ``--rounds`` times each; the median is printed.

    .venv/bin/python -m tests.libvirt.bench_copy --data 512 --rounds 3

Needs root (a private system libvirtd), like the tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from snapfs.catalog import writer
from snapfs.config import LibvirtSettings
from snapfs.libvirt import backup, jobs
from tests.libvirt.daemon import LibvirtDaemon, domain_xml, free_port

MiB = 1 << 20


def sync_copy(src: Any, dst: Any, ranges: Any, report: Callable[[int], None]) -> None:
    """The copy loop before pipelining: one request at a time, read then write."""
    done = 0
    for start, length, data in ranges:
        end = start + length
        pos = start
        while pos < end:
            n = min(backup.COPY_CHUNK, end - pos)
            if data:
                dst.pwrite(src.pread(n, pos), pos)
                done += n
                report(done)
            else:
                dst.zero(n, pos)
            pos += n


def run_once(dom: Any, work: Path, endpoint: jobs.TcpEndpoint | None) -> tuple[float, int]:
    root = work / f"repo-{time.monotonic_ns()}"
    writer.init_repository(root)
    try:
        with backup.DomainBackup(dom, root, mode="full", endpoint=endpoint) as b:
            b.begin()
            started = time.perf_counter()
            b.copy()
            elapsed = time.perf_counter() - started
            copied = sum(d.to_copy for d in b.disks)
            b.commit()
        return elapsed, copied
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for cp in dom.listAllCheckpoints():
            cp.delete(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=int, default=512, help="MiB of data in the disk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depths", default="1,2,4,8,16")
    parser.add_argument("--unsafe-depths", default="8", help="with qemu-nbd --cache=unsafe")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)

    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-copy-", dir=args.dir))
    daemon = LibvirtDaemon()
    try:
        daemon.start()
        image = work / "disk.qcow2"
        size = args.data * MiB + 64 * MiB
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {args.data}M", str(image)],
            check=True,
            capture_output=True,
        )
        conn = libvirt.open(daemon.uri)
        conn.createXML(domain_xml("bench", [("vda", image)]), 0)
        tcp = libvirt.open(daemon.tcp_uri)
        endpoints = {
            "unix": (conn.lookupByName("bench"), None),
            "tcp": (
                tcp.lookupByName("bench"),
                jobs.remote_endpoint(
                    daemon.tcp_uri, LibvirtSettings(nbd_port=free_port(), nbd_ports=1, tls=False)
                ),
            ),
        }
        loops: dict[str, tuple[Callable[..., None], int, str]] = {
            "sync (before)": (sync_copy, 1, "writeback")
        }
        for depth in (int(x) for x in args.depths.split(",")):
            loops[f"pipelined, depth {depth}"] = (backup.copy_ranges, depth, "writeback")
        for depth in (int(x) for x in args.unsafe_depths.split(",") if x):
            loops[f"pipelined, depth {depth}, cache=unsafe"] = (backup.copy_ranges, depth, "unsafe")
        results: dict[tuple[str, str], list[float]] = {}
        original = backup.copy_ranges, backup.COPY_DEPTH, backup.DEST_CACHE
        for _round in range(args.rounds):
            for transport, (dom, endpoint) in endpoints.items():
                for name, (loop, depth, cache) in loops.items():
                    backup.copy_ranges = loop  # type: ignore[assignment]
                    backup.COPY_DEPTH, backup.DEST_CACHE = depth, cache
                    try:
                        elapsed, copied = run_once(dom, work, endpoint)
                    finally:
                        backup.copy_ranges, backup.COPY_DEPTH, backup.DEST_CACHE = original
                    results.setdefault((transport, name), []).append(copied / MiB / elapsed)
        print(f"full backup copy of {args.data} MiB of data, {args.rounds} rounds, median MiB/s")
        print("| transport | copy loop | MiB/s (median) | all runs |")
        print("|---|---|---|---|")
        for (transport, name), speeds in results.items():
            runs = ", ".join(f"{s:.0f}" for s in speeds)
            print(f"| {transport} | {name} | {statistics.median(speeds):.0f} | {runs} |")
        tcp.close()
        conn.close()
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
