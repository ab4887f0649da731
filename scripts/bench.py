"""snapfs benchmarks against the plain tools on the same image (run through ``scripts/bench``).

Groups of cases; ``--only GROUP`` picks some. Implemented: ``disk`` (a disk image read as a
file: snapfs vs nbdfuse vs nbdcopy on one qemu-nbd) and ``guest`` (a guest ext4 tree through
snapfs's ``files/`` vs ``guestmount --ro``: first ls, find, rsync -a, cat; cold host caches,
fresh mounts) and ``write`` (restore disks: ``dd`` into ``restore/<name>/disk.img`` vs nbdfuse
on a writable qemu-nbd, ``rsync -a`` of the guest tree into ``restore/<name>/files/`` vs
``guestmount --rw``; every written image is checked against its source afterwards).

Method of the disk group (docs/benchmarks.md): every timed case is the median of ``--runs``
runs; the image file is kept in the host page cache ("warm") and the FUSE file's pages are
evicted before each run (``posix_fadvise(DONTNEED)`` on the FUSE file, checked with
``fincore``; falls back to ``drop_caches`` and re-warming the image). MB/s are 10^6 bytes
per second of the bytes the case reads (holes included). Ratios are speed ratios, snapfs ÷
the other tool: > 1 means snapfs is faster.

Needs root: it evicts caches, writes a bdi's ``read_ahead_kb`` and mounts FUSE filesystems.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from snapfs.mountpoint import daemon_pid

ROOT = Path(__file__).resolve().parent.parent
SNAPFS = [str(ROOT / ".venv" / "bin" / "snapfs")]
MiB = 1 << 20
GiB = 1 << 30
KiB4 = 4096
SEQ_BLOCK = MiB  # dd-like sequential reads: 1 MiB per read call
FORMAT_VERSION = 1  # bump when the image layout changes (forces a rebuild of the cache)

console = Console(stderr=True)


# -- results -------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured (or checked) line of the results table."""

    group: str
    case: str
    tool: str
    nbytes: int
    times: list[float]
    # Speed of snapfs ÷ speed of this tool (set on the other tools' rows of a case).
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mbps(self) -> float:
        return self.nbytes / self.median / 1e6 if self.median > 0 else float("inf")


@dataclass
class Options:
    workdir: Path
    runs: int
    quick: bool
    only: list[str]
    json_path: Path | None
    seed: int
    random_reads: int
    tuned_nbdfuse: bool
    guest_runs: int = 1
    guest_backend: str = "tcg"
    guest_debug: bool = False
    cases: tuple[str, ...] = ()  # --case: only cases whose function name contains one


class Bench:
    """Shared state of one run: options, fixtures (lazily set up) and the rows measured."""

    def __init__(self, opts: Options, stack: contextlib.ExitStack) -> None:
        self.opts = opts
        self.stack = stack
        self.rows: list[Row] = []
        self.info: dict[str, Any] = {}
        self._disk: DiskFixture | None = None
        self._write: WriteFixture | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        ratio = f"  snapfs ÷ this {row.ratio:.2f}x" if row.ratio is not None else ""
        console.log(
            f"[bold]{row.case}[/] {row.tool}: median {row.median:.3f} s "
            f"({', '.join(f'{t:.3f}' for t in row.times)}), {row.mbps:,.0f} MB/s{ratio}"
        )
        return row

    def disk(self) -> DiskFixture:
        if self._disk is None:
            image = build_disk_image(self.opts)
            self._disk = DiskFixture.start(image, self.opts, self.stack)
            self.info["disk_image"] = asdict(image) | {"qcow2": str(image.qcow2)}
            self.info["read_ahead_kb"] = self._disk.read_ahead
        return self._disk

    def write(self) -> WriteFixture:
        if self._write is None:
            self._write = WriteFixture(self)
            self.info["write_repo"] = asdict(self._write.w)
        return self._write


# -- small helpers -------------------------------------------------------------------------
def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=True, text=True, **kwargs)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``fincore``)."""
    out = run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
    ).stdout
    return int(out.split()[0])


def read_file_fully(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def proc_io(pid: int | None) -> dict[str, int]:
    """``/proc/PID/io`` counters (the FUSE daemon writes each reply to /dev/fuse: ``wchar``)."""
    if pid is None:
        return {}
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("wchar", "syscw", "rchar", "syscr") if k in after}


def mount_device(mountpoint: Path) -> str | None:
    """``major:minor`` of the filesystem mounted at ``mountpoint`` (its bdi name)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4] == str(mountpoint):
                return parts[2]
    return None


def is_mounted(mountpoint: Path) -> bool:
    # /proc/self/mounts also lists dead FUSE mounts that `mountpoint` does not recognise.
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mountpoint) for line in f)


def read_ahead_kb(mountpoint: Path) -> int | None:
    dev = mount_device(mountpoint)
    if dev is None:
        return None
    try:
        return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
    except OSError:
        return None


def set_read_ahead_kb(mountpoint: Path, kb: int) -> None:
    dev = mount_device(mountpoint)
    if dev is None:
        raise RuntimeError(f"{mountpoint} is not mounted")
    Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_qemu_nbd(
    cmd: list[str], sock: Path, log: IO[bytes], scope: contextlib.ExitStack
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (a qemu-nbd on unix socket ``sock``), stopped when ``scope`` closes;
    returns once the socket accepts connections."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True)
    scope.callback(stop_process, proc)

    def connectable() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return True

    wait_for(connectable, "qemu-nbd")
    return proc


def fuse_unmount(mountpoint: Path) -> None:
    if not is_mounted(mountpoint):
        return
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False).returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)


# -- readers (the workloads) ----------------------------------------------------------------
def seq_read(path: Path, ranges: Sequence[tuple[int, int]], block: int = SEQ_BLOCK) -> float:
    """Read ``ranges`` (offset, length) of ``path`` in order with ``block``-sized preads."""
    buf = bytearray(block)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset, length in ranges:
            end = offset + length
            pos = offset
            while pos < end:
                n = os.preadv(fd, [view[: min(block, end - pos)]], pos)
                if n <= 0:
                    raise RuntimeError(f"{path}: short read at {pos}")
                pos += n
        return time.perf_counter() - start
    finally:
        os.close(fd)


def random_read(path: Path, offsets: Sequence[int], size: int = KiB4) -> float:
    """One ``size`` pread at each offset, one at a time (queue depth 1)."""
    buf = bytearray(size)
    view = [memoryview(buf)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset in offsets:
            if os.preadv(fd, view, offset) != size:
                raise RuntimeError(f"{path}: short read at {offset}")
        return time.perf_counter() - start
    finally:
        os.close(fd)


# -- the disk fixture: image, qemu-nbd, nbdfuse, snapfs --------------------------------------
def mount_snapfs(
    repo: Path, tmp: Path, name: str, settings: str, workdir: Path, stack: contextlib.ExitStack
) -> Path:
    """A snapfs mount of ``repo`` at ``tmp/name`` with ``settings`` (TOML), unmounted when
    ``stack`` closes."""
    mnt = tmp / name
    mnt.mkdir()
    config = tmp / f"{name}.toml"
    config.write_text(settings)
    log = workdir / f"{name}-mount.log"
    run([*SNAPFS, "mount", "--config", str(config), "--log", str(log), str(repo), str(mnt)])

    def stop() -> None:
        umount = [*SNAPFS, "umount", str(mnt)]
        if is_mounted(mnt) and subprocess.run(umount, check=False).returncode:
            fuse_unmount(mnt)

    stack.callback(stop)
    return mnt


@dataclass
class DiskImage:
    size: int
    regions: list[tuple[int, int]]  # (offset, length) of the data; holes elsewhere
    repo: Path
    qcow2: Path

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.regions)


def disk_layout(quick: bool) -> tuple[int, list[tuple[int, int]]]:
    """A disk of ``size`` bytes with 4 data regions, one in the middle of each quarter."""
    size, region = (512 * MiB, 32 * MiB) if quick else (4 * GiB, 256 * MiB)
    quarter = size // 4
    return size, [(i * quarter + (quarter - region) // 2, region) for i in range(4)]


def build_disk_image(opts: Options) -> DiskImage:
    """The bench repository (cached in the workdir; rebuilt when missing or different)."""
    size, regions = disk_layout(opts.quick)
    params = {"version": FORMAT_VERSION, "size": size, "regions": regions}
    base = opts.workdir / f"disk-{size // MiB}M"
    marker = base / "image.json"
    repo = base / "repo"
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(marker.read_text())
        qcow2 = Path(saved["qcow2"])
        if saved["params"] == json.loads(json.dumps(params)) and qcow2.is_file():
            console.log(f"using the cached image {qcow2}")
            return DiskImage(size, regions, repo, qcow2)
    console.log(f"building a {size // MiB} MiB image with {len(regions)} data regions in {base}")
    started = time.monotonic()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    raw = base / "source.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, length in regions:
            f.seek(offset)
            for _ in range(0, length, 16 * MiB):
                f.write(os.urandom(16 * MiB))
    run([*SNAPFS, "repo", "init", str(repo)], capture_output=True)
    run(
        [*SNAPFS, "repo", "add-snapshot", str(repo), "--vm", "bench", "--name", "base",
         "--disk", f"vda={raw}", "--source-format", "raw", "--format", "qcow2"],
        capture_output=True,
    )  # fmt: skip
    raw.unlink()
    found = sorted(repo.glob("vms/*/snapshots/*/disks/vda.qcow2"))
    if len(found) != 1:
        raise RuntimeError(f"expected one vda.qcow2 in {repo}, found {found}")
    marker.write_text(json.dumps({"params": params, "qcow2": str(found[0])}, indent=1))
    console.log(f"built {found[0]} in {time.monotonic() - started:.1f} s")
    return DiskImage(size, regions, repo, found[0])


@dataclass
class DiskFixture:
    """One qemu-nbd on the image (for nbdfuse and nbdcopy) and a snapfs mount of the repo."""

    image: DiskImage
    tmp: Path
    socket: Path
    qemu_nbd: subprocess.Popen[bytes]
    nbdfuse: subprocess.Popen[bytes]
    nbdfuse_mnt: Path
    snapfs_mnt: Path
    # A second snapfs mount of the same repository with ``[nbd] page_cache = false``: its
    # disk files are read without the page cache (a configuration row, not the default).
    uncached_mnt: Path
    read_ahead: dict[str, int | None] = field(default_factory=dict)

    @property
    def nbdfuse_file(self) -> Path:
        return self.nbdfuse_mnt / "nbd"

    @property
    def snapfs_file(self) -> Path:
        return self.snapfs_mnt / "bench" / "latest" / "disks" / "vda.img"

    @property
    def uncached_file(self) -> Path:
        return self.uncached_mnt / "bench" / "latest" / "disks" / "vda.img"

    @property
    def nbd_uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def snapfs_pid(self) -> int | None:
        return daemon_pid(self.snapfs_mnt)

    @classmethod
    def start(cls, image: DiskImage, opts: Options, stack: contextlib.ExitStack) -> DiskFixture:
        tmp = Path(tempfile.mkdtemp(prefix="snapfs-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        sock = tmp / "nbd.sock"
        qemu_log = stack.enter_context((opts.workdir / "qemu-nbd.log").open("wb"))
        # The options snapfs gives its own qemu-nbd (snapfs/nbd/server.py), on a unix socket.
        qemu_nbd = start_qemu_nbd(
            ["qemu-nbd", "--persistent", "--shared=16", "--format=qcow2", "--cache=writeback",
             "--aio=threads", "--read-only", "--allocation-depth", f"--socket={sock}",
             str(image.qcow2)],
            sock, qemu_log, stack,
        )  # fmt: skip

        nbdfuse_mnt = tmp / "nbdfuse"
        nbdfuse_mnt.mkdir()
        pidfile = tmp / "nbdfuse.pid"
        # nbdfuse stays in the foreground; the pid file appears once it serves.
        nbdfuse = subprocess.Popen(
            ["nbdfuse", "-r", "-P", str(pidfile), str(nbdfuse_mnt), "--unix", str(sock)],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

        def stop_nbdfuse() -> None:
            fuse_unmount(nbdfuse_mnt)
            stop_process(nbdfuse)

        stack.callback(stop_nbdfuse)

        def nbdfuse_ready() -> bool:
            if nbdfuse.poll() is not None:
                raise RuntimeError(f"nbdfuse exited with {nbdfuse.returncode}")
            return pidfile.exists() and is_mounted(nbdfuse_mnt)

        wait_for(nbdfuse_ready, "nbdfuse")

        # The default read-ahead, written out; servers stay up for the whole run.
        settings = "[nbd]\nread_ahead_kb = 1024\nidle_timeout = 86400\n"
        snapfs_mnt = mount_snapfs(image.repo, tmp, "snapfs", settings, opts.workdir, stack)
        uncached_mnt = mount_snapfs(
            image.repo, tmp, "snapfs-uncached", settings + "page_cache = false\n", opts.workdir,
            stack,
        )  # fmt: skip
        fixture = cls(image, tmp, sock, qemu_nbd, nbdfuse, nbdfuse_mnt, snapfs_mnt, uncached_mnt)
        for path in (fixture.snapfs_file, fixture.uncached_file, fixture.nbdfuse_file):
            if path.stat().st_size != image.size:
                raise RuntimeError(f"{path}: size {path.stat().st_size}, expected {image.size}")
            if path != fixture.nbdfuse_file:
                # Start snapfs's server now (socket-activated on the first open), so that
                # no timed run pays for it.
                with open(path, "rb") as f:
                    f.read(KiB4)
        fixture.read_ahead = {
            "snapfs": read_ahead_kb(snapfs_mnt),
            "nbdfuse": read_ahead_kb(nbdfuse_mnt),
        }
        console.log(f"bdi read_ahead_kb of the mounts: {fixture.read_ahead}")
        return fixture

    # -- cache control --------------------------------------------------------------------
    def warm_host(self) -> None:
        """Keep the image file in the host page cache (the "warm" condition)."""
        if resident_bytes(self.image.qcow2) < self.image.qcow2.stat().st_size:
            read_file_fully(self.image.qcow2)

    def evict(self, path: Path) -> None:
        """Drop ``path``'s (a FUSE file's) pages; keep the image warm."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_bytes(path) > 0:
            drop_caches()
            if resident_bytes(path) > 0:
                raise RuntimeError(f"cannot evict {path} from the page cache")
        self.warm_host()

    def daemon_pid(self, tool: str) -> int | None:
        """The FUSE daemon of ``tool`` (its /proc/PID/io shows the replies it wrote)."""
        if tool == "snapfs":
            return self.snapfs_pid()
        if tool == UNCACHED.split()[0]:
            return daemon_pid(self.uncached_mnt)
        return self.nbdfuse.pid if tool == "nbdfuse" else None


# -- cases -----------------------------------------------------------------------------------
CaseFn = Callable[[Bench], None]
Tool = tuple[Path, Callable[[Path], float]]  # the file it reads (evicted first) and the work
GROUPS: dict[str, list[CaseFn]] = {"disk": []}
PLANNED: dict[str, str] = {}  # group name -> what it will measure (none at the moment)


def case(group: str) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        GROUPS.setdefault(group, []).append(fn)
        return fn

    return register


def timed_run(
    fx: DiskFixture, tool: str, path: Path, work: Callable[[], float]
) -> tuple[float, dict[str, int]]:
    """One run of ``work`` on an evicted ``path`` with a warm image."""
    pid = fx.daemon_pid(tool)
    fx.evict(path)
    before = proc_io(pid)
    elapsed = work()
    return elapsed, io_delta(before, proc_io(pid))


def fuse_request_stats(ios: list[dict[str, int]]) -> dict[str, float]:
    """Replies the FUSE daemon wrote (≈ read requests) and their mean size, per run."""
    if not ios or "syscw" not in ios[0]:
        return {}
    syscw = statistics.median(d["syscw"] for d in ios)
    wchar = statistics.median(d["wchar"] for d in ios)
    return {"daemon_write_calls": syscw, "daemon_bytes_written": wchar}


def compare(
    bench: Bench,
    case_name: str,
    nbytes: int,
    tools: dict[str, Tool],
    targets: dict[str, float],
    setup: dict[str, Callable[[], Any]] | None = None,
) -> None:
    """Measure each tool on the same work; set ratios (snapfs ÷ tool) and targets met."""
    fx = bench.disk()
    rows: dict[str, Row] = {}
    times: dict[str, list[float]] = {tool: [] for tool in tools}
    ios: dict[str, list[dict[str, int]]] = {tool: [] for tool in tools}
    # Runs interleaved (snapfs, nbdfuse, …, snapfs, nbdfuse, …): on a shared machine the
    # load drifts, and back-to-back runs of one tool would each see a different machine.
    for _ in range(bench.opts.runs):
        for tool, (path, fn) in tools.items():
            with contextlib.ExitStack() as scope:
                if setup and tool in setup:
                    scope.callback(setup[tool]())
                elapsed, io = timed_run(fx, tool.split()[0], path, functools.partial(fn, path))
            times[tool].append(elapsed)
            ios[tool].append(io)
    for tool in tools:
        rows[tool] = Row(
            "disk", case_name, tool, nbytes, times[tool], extra=fuse_request_stats(ios[tool])
        )
    snap = rows["snapfs"]
    for tool, row in rows.items():
        if tool == "snapfs":
            continue
        row.ratio = ratio = row.median / snap.median
        if tool in targets:
            row.target = f"≥ {targets[tool]:g}x"
            row.met = ratio >= targets[tool]
        if tool.startswith("snapfs") and "nbdfuse" in rows:
            own = rows["nbdfuse"].median / row.median
            row.extra["vs_nbdfuse"] = own
            row.note = f"this ÷ nbdfuse: {own:.2f}x"
            if "nbdfuse" in targets:  # the case's target, for this configuration
                verdict = "met" if own >= targets["nbdfuse"] else "not met"
                row.note += f" (target ≥ {targets['nbdfuse']:g}x: {verdict})"
    for row in rows.values():
        bench.add(row)


def with_read_ahead(mountpoint: Path, kb: int) -> Callable[[], Callable[[], None]]:
    """Setup for a context variant: the mount's bdi read_ahead_kb at ``kb`` (then restored)."""

    def setup() -> Callable[[], None]:
        old = read_ahead_kb(mountpoint)
        set_read_ahead_kb(mountpoint, kb)
        return lambda: set_read_ahead_kb(mountpoint, old or 128)

    return setup


SNAPFS_FORCED = "snapfs ra=1024 set by bench (context)"
UNCACHED = "snapfs-uncached (page_cache = false)"
NBDFUSE_TUNED = "nbdfuse ra=1024 (context)"


def snapfs_and_nbdfuse(fx: DiskFixture, read: Callable[[Path], float]) -> dict[str, Tool]:
    """snapfs as shipped, snapfs without the page cache, nbdfuse: the same ``read`` on each."""
    return {
        "snapfs": (fx.snapfs_file, read),
        "nbdfuse": (fx.nbdfuse_file, read),
        UNCACHED: (fx.uncached_file, read),
    }


def _seq_tools(
    bench: Bench, ranges: list[tuple[int, int]]
) -> tuple[dict[str, Tool], dict[str, Callable[[], Any]]]:
    fx = bench.disk()

    def read(p: Path) -> float:
        return seq_read(p, ranges)

    tools = snapfs_and_nbdfuse(fx, read)
    setup: dict[str, Callable[[], Any]] = {}
    if bench.opts.tuned_nbdfuse:
        tools[NBDFUSE_TUNED] = (fx.nbdfuse_file, read)
        setup[NBDFUSE_TUNED] = with_read_ahead(fx.nbdfuse_mnt, 1024)
    if fx.read_ahead.get("snapfs") != 1024:
        # snapfs asks for 1024 KiB ([nbd] read_ahead_kb) but its mount did not keep it: show
        # what it would give (docs/benchmarks.md, "findings").
        tools[SNAPFS_FORCED] = (fx.snapfs_file, read)
        setup[SNAPFS_FORCED] = with_read_ahead(fx.snapfs_mnt, 1024)
    return tools, setup


@case("disk")
def disk_seq_data(bench: Bench) -> None:
    """1. Sequential 1 MiB reads of the data regions only."""
    img = bench.disk().image
    tools, setup = _seq_tools(bench, img.regions)
    compare(bench, "1 seq read, data regions", img.data_bytes, tools, {"nbdfuse": 1.0}, setup)


@case("disk")
def disk_seq_whole(bench: Bench) -> None:
    """2. Sequential 1 MiB reads of the whole sparse image; nbdcopy to null: for context."""
    fx = bench.disk()
    img = fx.image
    tools, setup = _seq_tools(bench, [(0, img.size)])

    def nbdcopy(_: Path) -> float:
        start = time.perf_counter()
        run(["nbdcopy", fx.nbd_uri, "null:"])
        return time.perf_counter() - start

    tools["nbdcopy → null: (context)"] = (fx.snapfs_file, nbdcopy)  # path: only evicted
    floor = kernel_floor_file(bench.opts.workdir, img.size)
    if floor is not None:
        tools[KERNEL_FLOOR] = (floor, functools.partial(read_and_drop, size=img.size))
    compare(bench, WHOLE_IMAGE, img.size, tools, {"nbdfuse": 3.0}, setup)
    note_kernel_floor(bench, 3.0)


WHOLE_IMAGE = "2 seq read, whole sparse image"
KERNEL_FLOOR = "kernel floor: local sparse file (context)"


def kernel_floor_file(workdir: Path, size: int) -> Path | None:
    """A file of holes as big as the image, on a local disk filesystem: reading it after
    eviction is the kernel filling the page cache with zeros by itself (no FUSE, no copy
    from a daemon): what fresh page-cache pages cost at that moment. None on tmpfs, whose
    holes are read from the shared zero page (no page-cache fill)."""
    path = workdir / f"floor-{size >> 20}M.sparse"
    fs = run(["stat", "-f", "-c", "%T", str(workdir)], capture_output=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        console.log(f"{workdir} is {fs}: no kernel-floor row (its holes fill no page cache)")
        return None
    with path.open("wb") as f:
        f.truncate(size)
    return path


def read_and_drop(path: Path, size: int) -> float:
    """The kernel-floor read, its pages dropped after it: the rounds' other reads should see
    the page cache as they did before this row existed (nbdcopy, the round's last tool before
    it, keeps no pages)."""
    elapsed = seq_read(path, [(0, size)])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return elapsed


def note_kernel_floor(bench: Bench, target: float) -> None:
    """On the whole-image nbdfuse row: in how many runs ``target`` times nbdfuse was below
    the kernel-floor read of the same round. Context, not a verdict: the floor file's pages
    are as fresh to the host as that moment makes them, and a FUSE read right after its own
    eviction can get warmer pages (snapfs has beaten the row's time)."""
    rows = {r.tool: r for r in bench.rows if r.case == WHOLE_IMAGE}
    nbdfuse, floor = rows.get("nbdfuse"), rows.get(KERNEL_FLOOR)
    if nbdfuse is None or floor is None:
        return
    beyond = sum(n / target < k for n, k in zip(nbdfuse.times, floor.times, strict=True))
    nbdfuse.extra["runs_beyond_kernel_floor"] = beyond
    nbdfuse.note = (
        f"in {beyond} of {len(nbdfuse.times)} runs nbdfuse's time ÷ {target:g} was below the "
        "kernel's own read of a local sparse file in the same round (context: how costly "
        "fresh page-cache pages were then)"
    )


def _random_offsets(bench: Bench, ranges: list[tuple[int, int]]) -> list[int]:
    rng = random.Random(bench.opts.seed)
    blocks = [(off // KiB4, length // KiB4) for off, length in ranges]
    total = sum(n for _, n in blocks)
    offsets = []
    for _ in range(bench.opts.random_reads):
        i = rng.randrange(total)
        for first, n in blocks:
            if i < n:
                offsets.append((first + i) * KiB4)
                break
            i -= n
    return offsets


@case("disk")
def disk_random_data(bench: Bench) -> None:
    """3a. Random 4 KiB preads (QD1) inside the data regions."""
    fx = bench.disk()
    offsets = _random_offsets(bench, fx.image.regions)

    def read(p: Path) -> float:
        return random_read(p, offsets)

    tools = snapfs_and_nbdfuse(fx, read)
    name = f"3 random 4 KiB x{len(offsets)}, data regions"
    compare(bench, name, len(offsets) * KiB4, tools, {"nbdfuse": 1.0})


@case("disk")
def disk_random_whole(bench: Bench) -> None:
    """3b. Random 4 KiB preads (QD1) over the whole image (mostly holes)."""
    fx = bench.disk()
    offsets = _random_offsets(bench, [(0, fx.image.size)])

    def read(p: Path) -> float:
        return random_read(p, offsets)

    tools = snapfs_and_nbdfuse(fx, read)
    name = f"3 random 4 KiB x{len(offsets)}, whole image"
    compare(bench, name, len(offsets) * KiB4, tools, {"nbdfuse": 1.0})


def budgeted_read(
    fx: DiskFixture, ranges: list[tuple[int, int]], pids: dict[str, int]
) -> dict[str, float]:
    """Read ``ranges`` of the evicted snapfs file; CPU seconds per MiB of each process."""
    fx.evict(fx.snapfs_file)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    thread_before = resource.getrusage(resource.RUSAGE_THREAD)
    elapsed = seq_read(fx.snapfs_file, ranges)
    thread_after = resource.getrusage(resource.RUSAGE_THREAD)
    mib = sum(length for _, length in ranges) / MiB
    cost = {name: (cpu_seconds(pid) - before[name]) / mib for name, pid in pids.items()}
    reader = (thread_after.ru_utime - thread_before.ru_utime) + (
        thread_after.ru_stime - thread_before.ru_stime
    )
    cost["reader"] = reader / mib
    cost["wall"] = elapsed / mib
    return cost


def holes_of(img: DiskImage) -> list[tuple[int, int]]:
    holes, pos = [], 0
    for offset, length in sorted(img.regions):
        if offset > pos:
            holes.append((pos, offset - pos))
        pos = offset + length
    if pos < img.size:
        holes.append((pos, img.size - pos))
    return holes


@case("disk")
def disk_cpu_budget(bench: Bench) -> None:
    """5. Where the whole-image read's time goes: CPU per MiB of the reader, the snapfs daemon,
    its store process and its qemu-nbd, for data and for holes; the fastest whole-image read
    that budget allows on this machine's cores, and the ratio to nbdfuse that would give
    (context for case 2)."""
    fx = bench.disk()
    img = fx.image
    pid = fx.snapfs_pid()
    server = subprocess.run(
        ["pgrep", "-P", str(pid), "qemu-nbd"], capture_output=True, text=True
    ).stdout.split()
    if pid is None or not server:
        console.log("no snapfs daemon or server to measure: case skipped")
        return
    pids = {"daemon": pid, "qemu-nbd": int(server[0])}
    helper = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "snapfs.storeproc"], capture_output=True, text=True
    ).stdout.split()
    if helper:  # the store process ([nbd] store_process): it fills pages ahead of the reader
        pids["store process"] = int(helper[0])
    cores = os.cpu_count() or 1
    parts = {"data": sorted(img.regions), "holes": holes_of(img)}
    costs: dict[str, list[dict[str, float]]] = {part: [] for part in parts}
    for _ in range(bench.opts.runs):
        for part, ranges in parts.items():
            costs[part].append(budgeted_read(fx, ranges, pids))
    bound = 0.0
    notes = []
    for part, ranges in parts.items():
        median = {k: statistics.median(c[k] for c in costs[part]) for k in costs[part][0]}
        cpu = {k: v for k, v in median.items() if k != "wall"}
        # Wall time per MiB is at least the busiest single-threaded process (the reader, the
        # daemon's loop, qemu-nbd's) and at least all CPU spread perfectly over the cores
        # (the store process runs several threads: only the second bound holds for it).
        single = [v for k, v in cpu.items() if k != "store process"]
        floor = max(max(single), sum(cpu.values()) / cores)
        mib = sum(length for _, length in ranges) / MiB
        bound += floor * mib
        notes.append(
            f"{part}: " + ", ".join(f"{k} {v * 1000:.2f}" for k, v in cpu.items())
            + f" ms CPU/MiB; measured {median['wall'] * 1000:.2f}, best possible"
            f" {floor * 1000:.2f} ms/MiB"
        )
    row = Row("disk", "5 CPU budget of the whole-image read", "snapfs, best possible (context)",
              img.size, [bound])  # fmt: skip
    whole = [r for r in bench.rows if r.case == WHOLE_IMAGE and r.tool == "nbdfuse"]
    if whole:
        row.ratio = whole[0].median / bound
    row.note = "; ".join(notes) + (
        f"; {cores} cores. The ratio column is nbdfuse (case 2) ÷ this bound: the most snapfs"
        " could reach with these per-MiB costs at perfect overlap"
    )
    row.extra = {"costs": costs, "cores": cores}
    bench.add(row)


@case("disk")
def disk_page_cache(bench: Bench) -> None:
    """4. A second read of the same snapfs file (new open, no eviction): the page cache."""
    fx = bench.disk()
    path = fx.snapfs_file
    size = fx.image.size
    pid = fx.snapfs_pid()
    first: list[float] = []
    second: list[float] = []
    ios: list[dict[str, int]] = []
    resident: list[int] = []
    for _ in range(bench.opts.runs):
        fx.evict(path)
        first.append(seq_read(path, [(0, size)]))
        before = proc_io(pid)
        second.append(seq_read(path, [(0, size)]))  # seq_read opens the file again
        ios.append(io_delta(before, proc_io(pid)))
        resident.append(resident_bytes(path))
    served = statistics.median(d.get("wchar", 0) for d in ios)
    name = "4 second read of the same file"
    r1 = Row("disk", name, "snapfs, 1st read (evicted)", size, first)
    r2 = Row("disk", name, "snapfs, 2nd read (new open)", size, second)
    r1.ratio = r1.median / r2.median  # here: the 2nd read ÷ the 1st
    r2.target = "from page cache"
    # Served from the page cache: the daemon answered < 1 % of the file during the 2nd read and
    # ≥ 99 % of it stayed resident. Not "every page": this VM's memory balloon reclaims a few
    # MiB of page cache now and then (seen: 1 and 8 MiB of 4 GiB gone, in 2 runs of ~20).
    r2.met = min(resident) >= size * 99 // 100 and served < size // 100
    whole = sum(r == size for r in resident)
    r2.note = (
        f"fincore: {min(resident) / MiB:,.0f} of {size / MiB:,.0f} MiB resident at least "
        f"(every page in {whole} of {len(resident)} runs); "
        f"daemon wrote {served / MiB:,.1f} MiB during the 2nd read"
    )
    r2.extra = {"resident_bytes": resident, "daemon_io_during_2nd": ios}
    bench.add(r1)
    bench.add(r2)


# -- the guest group: guest filesystem trees, snapfs vs guestmount ---------------------------
GUEST_FORMAT_VERSION = 1
GUEST_VM = "bench"


@dataclass
class GuestImage:
    """An ext4 partition holding ``tree/`` (small files) and ``big/FILE``, in a qcow2."""

    disk_size: int
    nfiles: int
    ndirs: int  # directories under (and including) tree/
    tree_bytes: int
    big_size: int
    big_sha256: str
    repo: Path
    qcow2: Path
    src: Path  # the source tree (its big file deleted): what rsync must reproduce

    @property
    def find_entries(self) -> int:
        return self.nfiles + self.ndirs


def guest_layout(quick: bool) -> dict[str, int]:
    """tree/dTT/dSS/fNNNNN: TOP x SUB leaf directories of PER files each."""
    if quick:
        return {"disk": GiB, "top": 5, "sub": 10, "per": 40, "big": 100 * MiB}
    # tree/ + 25 + 25 x 20 = 526 directories, 20,000 files of 1-16 KiB (~166 MiB), a 1 GiB file.
    return {"disk": 4 * GiB, "top": 25, "sub": 20, "per": 40, "big": GiB}


def build_guest_image(opts: Options) -> GuestImage:
    """GPT disk, one ext4 partition (``mkfs.ext4 -d``, no appliance), qcow2, in a repository."""
    lay = guest_layout(opts.quick)
    params = {"version": GUEST_FORMAT_VERSION, "seed": opts.seed, **lay}
    nfiles = lay["top"] * lay["sub"] * lay["per"]
    base = opts.workdir / f"guest-{nfiles}f-{lay['big'] // MiB}M"
    marker = base / "image.json"
    repo = base / "repo"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(marker.read_text())
        fields_: dict[str, Any] = dict(saved["image"])
        for key in ("repo", "qcow2", "src"):
            fields_[key] = Path(fields_[key])
        img = GuestImage(**fields_)
        if saved["params"] == json.loads(json.dumps(params)) and img.qcow2.is_file():
            console.log(f"using the cached guest image {img.qcow2}")
            return img
    console.log(f"building a guest image ({nfiles:,} small files, {lay['big'] // MiB} MiB file) "
                f"in {base}")  # fmt: skip
    started = time.monotonic()
    shutil.rmtree(base, ignore_errors=True)
    src = base / "src"
    tree = src / "tree"
    rng = random.Random(opts.seed)
    tree_bytes = 0
    n = 0
    for t in range(lay["top"]):
        for s in range(lay["sub"]):
            d = tree / f"d{t:02d}" / f"d{s:02d}"
            d.mkdir(parents=True)
            for _ in range(lay["per"]):
                size = rng.randint(1024, 16 * 1024)
                (d / f"f{n:05d}").write_bytes(os.urandom(size))
                tree_bytes += size
                n += 1
    ndirs = 1 + lay["top"] + lay["top"] * lay["sub"]
    (src / "big").mkdir()
    big = src / "big" / "random.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        for _ in range(0, lay["big"], 16 * MiB):
            chunk = os.urandom(16 * MiB)
            digest.update(chunk)
            f.write(chunk)
    # The partition: 1 MiB in, 1 MiB left at the end for the backup GPT.
    part_size = lay["disk"] - 2 * MiB
    part = base / "part.img"
    with open(part, "wb") as f:
        f.truncate(part_size)
    run(["mkfs.ext4", "-q", "-F", "-L", "benchroot", "-d", str(src), str(part)])
    big.unlink()  # only its hash is needed from now on
    raw = base / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(lay["disk"])
    run(["sfdisk", "--quiet", str(raw)],
        input=f"label: gpt\nstart=2048, size={part_size // 512}, type=linux\n")  # fmt: skip
    run(["dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=sparse,notrunc",
         "status=none"])  # fmt: skip
    part.unlink()
    qcow2 = base / "vda.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    raw.unlink()
    run([*SNAPFS, "repo", "init", str(repo)], capture_output=True)
    run([*SNAPFS, "repo", "add-snapshot", str(repo), "--vm", GUEST_VM, "--name", "base",
         "--disk", f"vda={qcow2}"], capture_output=True)  # fmt: skip
    qcow2.unlink()
    found = sorted(repo.glob("vms/*/snapshots/*/disks/vda.qcow2"))
    if len(found) != 1:
        raise RuntimeError(f"expected one vda.qcow2 in {repo}, found {found}")
    img = GuestImage(lay["disk"], nfiles, ndirs, tree_bytes, lay["big"], digest.hexdigest(),
                     repo, found[0], src)  # fmt: skip
    marker.write_text(json.dumps({"params": params, "image": asdict(img)}, indent=1, default=str))
    console.log(f"built {found[0]} in {time.monotonic() - started:.1f} s")
    return img


GuestTool = str  # "snapfs" | "guestmount"


@dataclass
class GuestMount:
    """One fresh mount of the guest filesystem by one tool; ``root`` is the guest's /."""

    tool: GuestTool
    mountpoint: Path
    root: Path
    mount_s: float
    pid: int | None  # the FUSE daemon


class GuestFixture:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.image = build_guest_image(bench.opts)
        self.tmp = Path(tempfile.mkdtemp(prefix="snapfs-bench-guest-"))
        bench.stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.config = self.tmp / "snapfs.toml"
        backend = bench.opts.guest_backend
        self.config.write_text(
            "[nbd]\nidle_timeout = 86400\n"
            f'[guestfs]\nbackend = "{backend}"\nidle_timeout_s = 86400\n'
        )
        self.env = dict(os.environ)
        if backend == "tcg":
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        self.out = bench.opts.workdir / "guest-out"
        self.log = bench.opts.workdir / "snapfs-guest-mount.log"
        self._n = 0

    @contextlib.contextmanager
    def mount(self, tool: GuestTool) -> Any:
        """A fresh mount (its own appliance); unmounted, and the appliance gone, on exit."""
        self._n += 1
        mnt = self.tmp / f"{tool}-{self._n}"
        mnt.mkdir()
        with contextlib.ExitStack() as scope:
            if tool == "snapfs":
                cmd = [*SNAPFS, "mount", "--config", str(self.config), "--log", str(self.log)]
                if self.bench.opts.guest_debug:
                    cmd.append("--debug")
                scope.callback(self._snapfs_umount, mnt)
                start = time.perf_counter()
                run([*cmd, str(self.image.repo), str(mnt)])
                mount_s = time.perf_counter() - start
                yield GuestMount(tool, mnt, mnt / GUEST_VM / "latest" / "files", mount_s,
                                 daemon_pid(mnt))  # fmt: skip
            else:
                pidfile = self.tmp / f"guestmount-{self._n}.pid"
                scope.callback(self._guestunmount, mnt, pidfile)
                start = time.perf_counter()
                run(["guestmount", "--ro", "--format=qcow2", "-a", str(self.image.qcow2),
                     "-m", "/dev/sda1", "--pid-file", str(pidfile), str(mnt)],
                    env=self.env)  # fmt: skip
                mount_s = time.perf_counter() - start
                pid = int(pidfile.read_text()) if pidfile.exists() else None
                yield GuestMount(tool, mnt, mnt, mount_s, pid)

    @staticmethod
    def _snapfs_umount(mnt: Path) -> None:
        if is_mounted(mnt) and subprocess.run([*SNAPFS, "umount", str(mnt)],
                                              check=False).returncode:  # fmt: skip
            fuse_unmount(mnt)

    @staticmethod
    def _guestunmount(mnt: Path, pidfile: Path) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
        if is_mounted(mnt) and subprocess.run(["guestunmount", "--quiet", str(mnt)],
                                              check=False).returncode:  # fmt: skip
            fuse_unmount(mnt)
        if pid is None:
            return
        # guestmount exits once its appliance is shut down: wait, so no qemu outlives a case.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _timed(cmd: Sequence[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = run(cmd, **kwargs)
    return time.perf_counter() - start, proc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


GUEST_TOOLS: tuple[GuestTool, GuestTool] = ("snapfs", "guestmount")


def _guest_run(fx: GuestFixture, tool: GuestTool, res: dict[str, dict[str, list[float]]],
               checks: list[str]) -> None:  # fmt: skip
    """One run of every guest case for ``tool``: two fresh mounts (ls, find, cat | rsync)."""
    img = fx.image
    t = res.setdefault(tool, {})
    # Mount 1: first ls (the appliance launch included), then find over the tree, then cat
    # of the big file (which lives outside tree/: nothing find touched helps it).
    drop_caches()
    start = time.perf_counter()
    with fx.mount(tool) as m:
        ls_s, _ = _timed(["ls", "-la", str(m.root)], capture_output=True)
        t.setdefault("mount", []).append(m.mount_s)
        t.setdefault("ls", []).append(ls_s)
        t.setdefault("mount+ls", []).append(time.perf_counter() - start)
        console.log(f"{tool}: mount {m.mount_s:.2f} s, first ls {ls_s:.2f} s")

        drop_caches()
        find_s, proc = _timed(
            ["bash", "-c", 'set -o pipefail; find "$1" | wc -l', "find", str(m.root / "tree")],
            capture_output=True,
        )
        count = int(proc.stdout.strip())
        t.setdefault("find", []).append(find_s)
        if count != img.find_entries:
            checks.append(f"FAILED {tool} find: {count} entries, expected {img.find_entries}")
        console.log(f"{tool}: find | wc -l {find_s:.2f} s ({count:,} entries)")

        drop_caches()
        shm = Path("/dev/shm") / f"snapfs-bench-cat-{tool}"
        fx.bench.stack.callback(shm.unlink, missing_ok=True)
        try:
            with open(shm, "wb") as out:
                cat_s, _ = _timed(["cat", str(m.root / "big" / "random.bin")], stdout=out)
            sha = _sha256(shm)
        finally:
            shm.unlink(missing_ok=True)
        t.setdefault("cat", []).append(cat_s)
        ok = sha == img.big_sha256
        checks.append(f"{'ok' if ok else 'FAILED'} {tool} cat: sha256 "
                      f"{'equal to' if ok else 'differs from'} the source file")  # fmt: skip
        console.log(f"{tool}: cat {cat_s:.2f} s, sha256 {'ok' if ok else 'WRONG'}")

    # Mount 2: rsync -a of the tree on a fresh appliance (nothing listed or read yet).
    dest = fx.out / tool
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with fx.mount(tool) as m:
        run(["ls", str(m.root)], capture_output=True)  # launch the appliance, untimed
        drop_caches()
        before = proc_io(m.pid)
        rsync_s, _ = _timed(["rsync", "-a", f"{m.root / 'tree'}/", f"{dest}/"])
        t.setdefault("rsync", []).append(rsync_s)
        io = io_delta(before, proc_io(m.pid))
        console.log(f"{tool}: rsync -a {rsync_s:.2f} s (daemon io {io})")
    diff = subprocess.run(["diff", "-rq", str(img.src / "tree"), str(dest)],
                          capture_output=True, text=True)  # fmt: skip
    ok = diff.returncode == 0
    checks.append(f"{'ok' if ok else 'FAILED'} {tool} rsync: diff -r against the source tree "
                  f"{'identical' if ok else diff.stdout[:500]}")  # fmt: skip


@case("guest")
def guest_all(bench: Bench) -> None:
    """snapfs files/ vs guestmount --ro on one ext4 image: first ls, find, rsync -a, cat."""
    fx = GuestFixture(bench)
    img = fx.image
    bench.info["guest_image"] = asdict(img)
    bench.info["guest_backend"] = bench.opts.guest_backend
    res: dict[str, dict[str, list[float]]] = {}
    checks: list[str] = []
    bench.stack.callback(shutil.rmtree, fx.out, ignore_errors=True)
    runs = bench.opts.guest_runs
    for i in range(runs):
        # Alternate which tool goes first (the machine is shared; drift hits both).
        for tool in GUEST_TOOLS if i % 2 == 0 else GUEST_TOOLS[::-1]:
            console.rule(f"guest run {i + 1}/{runs}: {tool}")
            _guest_run(fx, tool, res, checks)
        # Both outputs against each other, metadata included (modes, times, sizes, contents).
        cmp = run(["rsync", "-ain", "--checksum", "--delete", f"{fx.out / 'guestmount'}/",
                   f"{fx.out / 'snapfs'}/"], capture_output=True).stdout.strip()  # fmt: skip
        checks.append(("ok" if not cmp else "FAILED") + " rsync outputs of both tools: "
                      + ("identical (rsync -ain --checksum: no differences)" if not cmp
                         else cmp[:500]))  # fmt: skip
    snap, gm = res["snapfs"], res["guestmount"]
    mib = img.tree_bytes / MiB
    cases = [
        ("1 mount + first ls of the guest root", "mount+ls", 0, 1.0),
        (f"2 find | wc -l ({img.find_entries:,} entries)", "find", 0, None),
        (f"3 rsync -a of tree/ ({img.nfiles:,} files, {mib:,.0f} MiB)", "rsync", img.tree_bytes,
         3.0),
        (f"4 cat of a {img.big_size // MiB:,} MiB file", "cat", img.big_size, 3.0),
    ]  # fmt: skip
    for name, key, nbytes, target in cases:
        s = bench.add(Row("guest", name, "snapfs", nbytes, snap[key]))
        g = Row("guest", name, "guestmount", nbytes, gm[key])
        g.ratio = g.median / s.median
        if target is not None:
            g.target = f"≥ {target:g}x"
            g.met = g.ratio >= target
        bench.add(g)
        if key == "mount+ls":
            for tool, parts in (("snapfs", snap), ("guestmount", gm)):
                what = "(launch on first ls)" if tool == "snapfs" else "(launch in mount)"
                bench.add(Row("guest", name, f"  {tool}: mount command {what}", 0,
                              parts["mount"]))  # fmt: skip
                bench.add(Row("guest", name, f"  {tool}: first ls", 0, parts["ls"]))
    bench.info["guest_checks"] = checks
    for line in checks:
        console.log(line)
    if any(c.startswith("FAILED") for c in checks):
        raise RuntimeError("guest group: a correctness check failed (see above)")


# -- the write group: restore disks written through snapfs vs nbdfuse / guestmount ------------
WRITE_FORMAT_VERSION = 1
WRITE_VM = "benchw"
# The qemu-nbd options snapfs gives a writable restore disk (snapfs/nbd/server.py with
# ServerSpec(readonly=False, discard=True), as snapfs/nbd/export.py makes it for disk.img).
RESTORE_QEMU_NBD = ["qemu-nbd", "--persistent", "--shared=16", "--format=qcow2",
                    "--cache=writeback", "--aio=threads", "--allocation-depth",
                    "--discard=unmap", "--detect-zeroes=unmap"]  # fmt: skip
APPLIANCE_MEMSIZE_MB = 768  # snapfs's [guestfs] memsize_mb default, also given to guestmount


def write_layout(quick: bool) -> dict[str, int]:
    """dd: the bytes written (and the empty restore disk's size); fs: the ext4 disk's size."""
    return {"dd": 256 * MiB if quick else GiB, "fs_disk": GiB}


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` (0 if gone)."""
    if pid is None:
        return 0.0
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int | None) -> list[int]:
    """Every live descendant of ``pid`` (qemu-nbd, the appliance's qemu, ...)."""
    if pid is None:
        return []
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(c) for c in children.read_text().split()]
                found += kids
                todo += kids
    return found


class CpuMeter:
    """CPU seconds a process and its descendants (by command name) spend during a step."""

    def __init__(self, pid: int | None, extra_pids: Sequence[int] = ()) -> None:
        self.pids = [p for p in (pid, *extra_pids, *descendants(pid)) if p is not None]
        self.before = {p: cpu_seconds(p) for p in self.pids}

    def stop(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.pids:
            try:
                name = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                continue  # exited: its time is lost, say nothing rather than something wrong
            out[name] = round(out.get(name, 0.0) + cpu_seconds(p) - self.before[p], 2)
        return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_appliances_of(image: Path) -> None:
    """Stop any qemu still using ``image`` (one of the bench's own restore images): an
    appliance orphaned when guestmount was interrupted during its launch."""
    needle = f"file={image},".encode()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if needle in (proc_dir / "cmdline").read_bytes():
                pid = int(proc_dir.name)
                console.log(f"[yellow]stopping qemu pid {pid}, left running on {image}[/]")
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def snapfs_unmount_wait(mnt: Path, pid: int | None, log_dir: Path,
                        timeout: float = 900.0) -> float:  # fmt: skip
    """``snapfs umount`` (waits up to 60 s for the daemon), then wait on for the daemon and
    its children (qemu-nbd, the appliance) to be gone; seconds taken. A daemon still there
    after 30 s gets one ``py-spy dump`` into ``log_dir`` (where is it stuck?)."""
    children = descendants(pid)
    start = time.perf_counter()
    if is_mounted(mnt):
        umount = subprocess.run([*SNAPFS, "umount", str(mnt)], check=False)
        if umount.returncode and is_mounted(mnt):
            fuse_unmount(mnt)
    dumped = False
    while any(_alive(p) for p in ([pid] if pid else []) + children):
        waited = time.perf_counter() - start
        if not dumped and pid is not None and _alive(pid) and waited > 30:
            dumped = True
            out = log_dir / f"snapfs-write-slow-exit-{pid}.txt"
            with open(out, "w") as f:
                pyspy = str(ROOT / ".venv" / "bin" / "py-spy")
                subprocess.run([pyspy, "dump", "--pid", str(pid)], stdout=f,
                               stderr=subprocess.STDOUT, check=False)  # fmt: skip
            console.log(f"[yellow]snapfs daemon {pid} still running {waited:.0f} s after the "
                        f"unmount; py-spy dump in {out}[/]")  # fmt: skip
        if waited > timeout:
            raise RuntimeError(f"snapfs daemon {pid} did not exit in {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - start


@dataclass
class WriteRepo:
    """A repository with one snapshot: a GPT disk with one empty ext4 partition (the target
    of the file-level restore); plus a random source file for the disk writes."""

    repo: Path
    fs_disk: int
    part_offset: int
    part_size: int
    source: Path  # random bytes, dd's input
    source_size: int


def build_write_repo(opts: Options) -> WriteRepo:
    lay = write_layout(opts.quick)
    base = opts.workdir / "write"
    params = {"version": WRITE_FORMAT_VERSION, "fs_disk": lay["fs_disk"]}
    marker = base / "repo.json"
    repo = base / "repo"
    part_offset, part_size = MiB, lay["fs_disk"] - 2 * MiB
    source = base / f"source-{lay['dd'] // MiB}M.bin"
    cached = False
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(marker.read_text())["params"] == params and repo.is_dir()
    if not cached:
        console.log(f"building the write repository (empty ext4 on a {lay['fs_disk'] // MiB} "
                    f"MiB disk) in {base}")  # fmt: skip
        shutil.rmtree(repo, ignore_errors=True)
        marker.unlink(missing_ok=True)
        base.mkdir(parents=True, exist_ok=True)
        part = base / "part.img"
        with open(part, "wb") as f:
            f.truncate(part_size)
        # Inode tables and journal written now, so no ext4lazyinit runs in either appliance.
        run(["mkfs.ext4", "-q", "-F", "-L", "restore", "-E",
             "lazy_itable_init=0,lazy_journal_init=0", str(part)])  # fmt: skip
        raw = base / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(lay["fs_disk"])
        run(["sfdisk", "--quiet", str(raw)],
            input=f"label: gpt\nstart=2048, size={part_size // 512}, type=linux\n")  # fmt: skip
        run(["dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=sparse,notrunc",
             "status=none"])  # fmt: skip
        part.unlink()
        run([*SNAPFS, "repo", "init", str(repo)], capture_output=True)
        run([*SNAPFS, "repo", "add-snapshot", str(repo), "--vm", WRITE_VM, "--name", "empty-ext4",
             "--disk", f"vda={raw}", "--source-format", "raw", "--format", "qcow2"],
            capture_output=True)  # fmt: skip
        raw.unlink()
        marker.write_text(json.dumps({"params": params}))
    if not source.is_file() or source.stat().st_size != lay["dd"]:
        console.log(f"writing {lay['dd'] // MiB} MiB of random data to {source}")
        with open(source, "wb") as f:
            for _ in range(0, lay["dd"], 16 * MiB):
                f.write(os.urandom(16 * MiB))
    # Restore disks left by an interrupted run (the bench owns this repository).
    restore_dir = repo / "restore"
    if restore_dir.is_dir():
        for child in restore_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
    return WriteRepo(repo, lay["fs_disk"], part_offset, part_size, source, lay["dd"])


class WriteFixture:
    """The write repository, restore disks made per run, and the mounts of each tool."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.w = build_write_repo(bench.opts)
        self.tmp = Path(tempfile.mkdtemp(prefix="snapfs-bench-write-"))
        bench.stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.config = self.tmp / "snapfs.toml"
        backend = bench.opts.guest_backend
        self.config.write_text(
            "[nbd]\nidle_timeout = 86400\n"
            f'[guestfs]\nbackend = "{backend}"\nidle_timeout_s = 86400\n'
            f"memsize_mb = {APPLIANCE_MEMSIZE_MB}\n"
        )
        self.env = dict(os.environ, LIBGUESTFS_MEMSIZE=str(APPLIANCE_MEMSIZE_MB))
        if backend == "tcg":
            self.env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        self.log = bench.opts.workdir / "snapfs-write-mount.log"
        self._n = 0

    def restore_disk(self, scope: contextlib.ExitStack, name: str, *from_snapshot: str) -> Path:
        """A new restore disk (empty of the dd size, or copy-on-write on the ext4 snapshot);
        removed when ``scope`` closes. Returns its qcow2."""
        what = list(from_snapshot) or ["--size", str(self.w.source_size)]
        run([*SNAPFS, "restore", "create", str(self.w.repo), "--name", name, *what],
            capture_output=True)  # fmt: skip
        scope.callback(subprocess.run, [*SNAPFS, "restore", "rm", str(self.w.repo), name,
                                        "--force"], capture_output=True)  # fmt: skip
        return self.w.repo / "restore" / name / "disk.qcow2"

    def mountpoint(self, tool: str) -> Path:
        self._n += 1
        mnt = self.tmp / f"{tool}-{self._n}"
        mnt.mkdir()
        return mnt

    def mount_snapfs(self, scope: contextlib.ExitStack) -> tuple[Path, int | None]:
        mnt = self.mountpoint("snapfs")
        cmd = [*SNAPFS, "mount", "--config", str(self.config), "--log", str(self.log)]
        if self.bench.opts.guest_debug:
            cmd.append("--debug")
        scope.callback(GuestFixture._snapfs_umount, mnt)
        run([*cmd, str(self.w.repo), str(mnt)])
        return mnt, daemon_pid(mnt)

    def qemu_nbd(self, scope: contextlib.ExitStack, qcow2: Path) -> tuple[Path, int]:
        """A writable qemu-nbd on ``qcow2`` with snapfs's restore-disk options; stopped (and
        so flushed) when ``scope`` closes."""
        self._n += 1
        sock = self.tmp / f"nbd-{self._n}.sock"
        log = scope.enter_context((self.tmp / f"qemu-nbd-{self._n}.log").open("wb"))
        proc = start_qemu_nbd([*RESTORE_QEMU_NBD, f"--socket={sock}", str(qcow2)], sock, log, scope)
        return sock, proc.pid

    def warm_source(self) -> None:
        """Right before a timed write: the source in the page cache, and no dirty pages left
        by an earlier write (the previous tool's image) being flushed meanwhile."""
        src = self.w.source
        # Nearly all: this machine's proactive reclaim (kdamond) nibbles at cold pages.
        wanted = src.stat().st_size * 98 // 100
        if resident_bytes(src) < src.stat().st_size:
            read_file_fully(src)
            if resident_bytes(src) < wanted:
                raise RuntimeError(f"cannot keep {src} in the page cache")
        os.sync()

    def compare_with_source(self, qcow2: Path) -> str | None:
        """None when the restore image (servers stopped) reads exactly as the source file,
        else what ``qemu-img compare`` said."""
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(self.w.source), str(qcow2)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return None if cmp.returncode == 0 else (cmp.stdout + cmp.stderr).strip()[:300]


def _dd(src: Path, dest: Path) -> float:
    secs, _ = _timed(["dd", f"if={src}", f"of={dest}", "bs=1M", "conv=fsync,notrunc",
                      "status=none"])  # fmt: skip
    return secs


WRITE_DD_TOOLS = ("snapfs", "nbdfuse", "nbdcopy")


def _write_dd_run(fx: WriteFixture, tool: str, i: int, res: dict[str, list[float]],
                  extra: dict[str, list[Any]], checks: list[str]) -> None:  # fmt: skip
    """One run of ``tool`` writing the source into a fresh, empty restore disk."""
    src = fx.w.source
    with contextlib.ExitStack() as scope:
        qcow2 = fx.restore_disk(scope, f"dd-{tool}-{i}")
        with contextlib.ExitStack() as servers:
            if tool == "snapfs":
                mnt, pid = fx.mount_snapfs(servers)
                dest = mnt / "restore" / f"dd-{tool}-{i}" / "disk.img"
                with open(dest, "rb") as f:  # starts its qemu-nbd (socket activation), untimed
                    f.read(KiB4)
                fx.warm_source()
                meter, before = CpuMeter(pid), proc_io(pid)
                secs = _dd(src, dest)
                io = io_delta(before, proc_io(pid))
                extra.setdefault(f"{tool}_fuse_requests", []).append(io.get("syscr"))
                cpu = meter.stop()
                unmount_s = snapfs_unmount_wait(mnt, pid, fx.bench.opts.workdir)
                extra.setdefault("snapfs_unmount_s", []).append(round(unmount_s, 2))
            elif tool == "nbdfuse":
                sock, nbd_pid = fx.qemu_nbd(servers, qcow2)
                mnt = fx.mountpoint("nbdfuse")
                pidfile = fx.tmp / f"nbdfuse-{i}.pid"
                proc = subprocess.Popen(
                    ["nbdfuse", "-P", str(pidfile), str(mnt), "--unix", str(sock)],
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip

                def stop_nbdfuse(mnt: Path = mnt, proc: subprocess.Popen[bytes] = proc) -> None:
                    fuse_unmount(mnt)
                    stop_process(proc)

                servers.callback(stop_nbdfuse)

                def ready(proc: subprocess.Popen[bytes] = proc, mnt: Path = mnt) -> bool:
                    if proc.poll() is not None:
                        raise RuntimeError(f"nbdfuse exited with {proc.returncode}")
                    return pidfile.exists() and is_mounted(mnt)

                wait_for(ready, "nbdfuse")
                fx.warm_source()
                meter, before = CpuMeter(proc.pid, [nbd_pid]), proc_io(proc.pid)
                secs = _dd(src, mnt / "nbd")
                io = io_delta(before, proc_io(proc.pid))
                extra.setdefault(f"{tool}_fuse_requests", []).append(io.get("syscr"))
            else:
                sock, nbd_pid = fx.qemu_nbd(servers, qcow2)
                fx.warm_source()
                meter = CpuMeter(None, [nbd_pid])
                secs, _ = _timed(["nbdcopy", "--flush", str(src),
                                  f"nbd+unix:///?socket={sock}"])  # fmt: skip
            if tool != "snapfs":
                cpu = meter.stop()
        # Servers stopped (snapfs unmounted: its qemu-nbd flushed and exited).
        problem = fx.compare_with_source(qcow2)
        ok = problem is None
        verdict = "reads as the source" if ok else f"does not read as the source: {problem}"
        checks.append(f"{'ok' if ok else 'FAILED'} {tool} dd run {i + 1}: the restore image "
                      f"{verdict} (qemu-img compare)")  # fmt: skip
        res.setdefault(tool, []).append(secs)
        extra.setdefault(f"{tool}_cpu_s", []).append(cpu)
        console.log(f"{tool}: {fx.w.source_size // MiB} MiB in {secs:.2f} s "
                    f"({fx.w.source_size / secs / 1e6:,.0f} MB/s), cpu {cpu}, "
                    f"{'verified' if ok else 'NOT VERIFIED'}")  # fmt: skip


@case("write")
def write_disk(bench: Bench) -> None:
    """1. dd of random data into an empty restore disk.img: snapfs vs nbdfuse (vs nbdcopy)."""
    fx = bench.write()
    res: dict[str, list[float]] = {}
    extra: dict[str, list[Any]] = {}
    checks: list[str] = []
    for i in range(bench.opts.runs):
        order = WRITE_DD_TOOLS if i % 2 == 0 else WRITE_DD_TOOLS[::-1]
        for tool in order:
            console.rule(f"write dd run {i + 1}/{bench.opts.runs}: {tool}")
            _write_dd_run(fx, tool, i, res, extra, checks)
    bench.info.setdefault("write_checks", []).extend(checks)
    n = fx.w.source_size
    name = f"1 dd {n // MiB:,} MiB into restore disk.img (bs=1M, conv=fsync)"
    s = bench.add(Row("write", name, "snapfs", n, res["snapfs"],
                      extra={"cpu_s": extra["snapfs_cpu_s"],
                             "fuse_requests": extra["snapfs_fuse_requests"]}))  # fmt: skip
    for tool, label, target in (("nbdfuse", "nbdfuse", 0.8),
                                ("nbdcopy", "nbdcopy --flush (context)", None)):  # fmt: skip
        r = Row("write", name, label, n, res[tool], extra={"cpu_s": extra[f"{tool}_cpu_s"]})
        if tool == "nbdfuse":
            r.extra["fuse_requests"] = extra["nbdfuse_fuse_requests"]
        r.ratio = r.median / s.median
        if target is not None:
            r.target = f"≥ {target:g}x"
            r.met = r.ratio >= target
        bench.add(r)
    s.extra["unmount_s"] = extra["snapfs_unmount_s"]
    per_run = "; ".join(
        ", ".join(f"{k} {v:.1f}" for k, v in c.items()) for c in extra["snapfs_cpu_s"]
    )
    unmounts = extra["snapfs_unmount_s"]
    s.note = f"daemon + qemu-nbd CPU s per run: {per_run}; unmount after dd (s): {unmounts}"
    if any(c.startswith("FAILED") for c in checks):
        raise RuntimeError("write group: a written image differs from its source (see above)")


def _warm_tree(tree: Path) -> None:
    """Read the source tree into the host page cache (the source is not what is measured)."""
    run(["bash", "-c", 'find "$1" -type f -exec cat {} + > /dev/null', "warm", str(tree)])


def _check_restored_tree(fx: WriteFixture, qcow2: Path, src: Path, tool: str,
                         checks: list[str]) -> None:  # fmt: skip
    """e2fsck -fn the partition, then mount it read-only on the host (loop) and compare with
    ``rsync -aHn --checksum -i --delete``: must print nothing."""
    with contextlib.ExitStack() as scope:
        raw = fx.tmp / f"check-{tool}.raw"
        scope.callback(raw.unlink, missing_ok=True)
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)])
        loop = run(["losetup", "--read-only", "--find", "--show", "--offset",
                    str(fx.w.part_offset), "--sizelimit", str(fx.w.part_size), str(raw)],
                   capture_output=True).stdout.strip()  # fmt: skip
        scope.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        ok = fsck.returncode == 0
        checks.append(f"{'ok' if ok else 'FAILED'} {tool} rsync: e2fsck -fn of the restored "
                      f"filesystem {'clean' if ok else fsck.stdout[-500:]}")  # fmt: skip
        mnt = fx.mountpoint(f"check-{tool}")
        run(["mount", "-t", "ext4", "-o", "ro,noload", loop, str(mnt)])
        scope.callback(subprocess.run, ["umount", str(mnt)], check=False)
        diff = run(["rsync", "-aHn", "--checksum", "-i", "--delete", f"{src}/",
                    f"{mnt / 'tree'}/"], capture_output=True).stdout.strip()  # fmt: skip
        ok = not diff
        checks.append(f"{'ok' if ok else 'FAILED'} {tool} rsync: the restored tree/ against "
                      "the source (rsync -aHn --checksum -i --delete): "
                      f"{'no differences' if ok else diff[:500]}")  # fmt: skip


WRITE_FS_TOOLS = ("snapfs", "guestmount")


def _write_rsync_run(fx: WriteFixture, img: GuestImage, tool: str, i: int,
                     res: dict[str, dict[str, list[float]]], cpu: list[dict[str, float]],
                     checks: list[str]) -> None:  # fmt: skip
    """rsync -a of the guest group's tree into a fresh copy-on-write restore disk of the empty
    ext4 snapshot, then unmount (the time includes the unmount: sync, umount, flush)."""
    src = img.src / "tree"
    t = res.setdefault(tool, {})
    name = f"fs-{tool}-{i}"
    with contextlib.ExitStack() as scope:
        qcow2 = fx.restore_disk(scope, name, "--vm", WRITE_VM, "--disk", "vda")
        with contextlib.ExitStack() as mount:
            start = time.perf_counter()
            if tool == "snapfs":
                mnt, pid = fx.mount_snapfs(mount)
                root = mnt / "restore" / name / "files"
                unmount: Callable[[], Any] = functools.partial(
                    snapfs_unmount_wait, mnt, pid, fx.bench.opts.workdir
                )
            else:
                mnt = fx.mountpoint("guestmount")
                pidfile = fx.tmp / f"guestmount-{i}.pid"
                mount.callback(kill_appliances_of, qcow2)  # runs after the unmount below
                mount.callback(GuestFixture._guestunmount, mnt, pidfile)
                run(["guestmount", "--rw", "--format=qcow2", "-a", str(qcow2), "-m", "/dev/sda1",
                     "--pid-file", str(pidfile), str(mnt)], env=fx.env)  # fmt: skip
                pid = int(pidfile.read_text()) if pidfile.exists() else None
                root = mnt
                unmount = functools.partial(GuestFixture._guestunmount, mnt, pidfile)
            entries = run(["ls", "-A", str(root)], capture_output=True).stdout.split()
            launch_s = time.perf_counter() - start  # snapfs launches on this first ls
            if entries != ["lost+found"]:
                raise RuntimeError(f"{tool}: the restore filesystem is not empty: {entries}")
            _warm_tree(src)
            os.sync()
            meter = CpuMeter(pid)
            start = time.perf_counter()
            run(["rsync", "-a", f"{src}/", f"{root / 'tree'}/"])
            rsync_s = time.perf_counter() - start
            used = meter.stop()
            # Unmount: snapfs umount returns when the daemon is gone (appliance sync, umount
            # and shutdown, NBD flush, qemu-nbd stopped); guestunmount + guestmount's exit.
            unmount()
            total_s = time.perf_counter() - start
        t.setdefault("launch", []).append(launch_s)
        t.setdefault("rsync", []).append(rsync_s)
        t.setdefault("unmount", []).append(total_s - rsync_s)
        t.setdefault("total", []).append(total_s)
        row: dict[str, Any] = {"tool": tool, **used}
        cpu.append(row)
        console.log(f"{tool}: mount+launch {launch_s:.1f} s, rsync {rsync_s:.2f} s, unmount "
                    f"{total_s - rsync_s:.2f} s, cpu during rsync {used}")  # fmt: skip
        _check_restored_tree(fx, qcow2, src, tool, checks)


@case("write")
def write_files(bench: Bench) -> None:
    """2. rsync -a of the small-file tree into a restore disk's files/ vs guestmount --rw."""
    fx = bench.write()
    img = build_guest_image(bench.opts)  # its source tree (kept on the host) is the input
    res: dict[str, dict[str, list[float]]] = {}
    cpu: list[dict[str, Any]] = []
    checks: list[str] = []
    runs = bench.opts.guest_runs
    for i in range(runs):
        for tool in WRITE_FS_TOOLS if i % 2 == 0 else WRITE_FS_TOOLS[::-1]:
            console.rule(f"write rsync run {i + 1}/{runs}: {tool}")
            _write_rsync_run(fx, img, tool, i, res, cpu, checks)
    bench.info.setdefault("write_checks", []).extend(checks)
    bench.info["write_rsync_cpu_s"] = cpu
    snap, gm = res["snapfs"], res["guestmount"]
    name = (f"2 rsync -a of {img.nfiles:,} files ({img.tree_bytes / MiB:,.0f} MiB) into "
            "files/, + unmount")  # fmt: skip
    s = bench.add(Row("write", name, "snapfs", img.tree_bytes, snap["total"]))
    g = Row("write", name, "guestmount --rw", img.tree_bytes, gm["total"])
    g.ratio = g.median / s.median
    g.target = "≥ 1.5x"
    g.met = g.ratio >= 1.5
    bench.add(g)
    for tool, parts in (("snapfs", snap), ("guestmount", gm)):
        r = bench.add(Row("write", name, f"  {tool}: rsync", img.tree_bytes, parts["rsync"]))
        if tool == "guestmount":
            r.ratio = r.median / statistics.median(snap["rsync"])
        bench.add(Row("write", name, f"  {tool}: unmount (sync, flush)", 0, parts["unmount"]))
        bench.add(Row("write", name, f"  {tool}: mount + launch (untimed)", 0, parts["launch"]))
    if any(c.startswith("FAILED") for c in checks):
        raise RuntimeError("write group: a restored tree is wrong (see above)")


# -- output ----------------------------------------------------------------------------------
def results_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title)
    for name, justify in (("case", "left"), ("tool", "left"), ("median s", "right"),
                          ("MB/s", "right"), ("snapfs ÷ tool", "right"), ("target", "left"),
                          ("met", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    last_case = None
    for row in rows:
        met = "" if row.met is None else ("[green]met[/]" if row.met else "[red]NOT met[/]")
        table.add_row(
            row.case if row.case != last_case else "",
            row.tool,
            f"{row.median:.3f}",
            f"{row.mbps:,.0f}" if row.nbytes else "",
            f"{row.ratio:.2f}x" if row.ratio is not None else "",
            row.target,
            met,
            end_section=False,
        )
        last_case = row.case
    return table


def machine_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            return run(cmd, capture_output=True).stdout.splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "python": platform.python_version(),
        "qemu-nbd": version(["qemu-nbd", "--version"]),
        "nbdfuse": version(["nbdfuse", "--version"]),
        "snapfs_commit": version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/snapfs-bench"),
        help="where the test image is built and cached (default: %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per case (median; default: disk and write dd 3, guest and write rsync 1 "
        "(a guestmount run takes minutes))",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke check, 1 run: disk: 512 MiB image, 2,000 random reads; "
        "guest: 2,000 files and a 100 MiB file; write: 256 MiB dd, 2,000 files",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(GROUPS | PLANNED),
        help="case group(s) to run (default: all implemented)",
    )
    p.add_argument("--json", dest="json_path", type=Path, help="save the raw numbers here")
    p.add_argument(
        "--case",
        action="append",
        default=[],
        help="only the cases whose function name contains this (e.g. write_disk, random)",
    )
    p.add_argument("--seed", type=int, default=1, help="random offsets seed")
    p.add_argument("--random-reads", type=int, default=None, help="default 20,000")
    p.add_argument(
        "--no-tuned-nbdfuse",
        dest="tuned",
        action="store_false",
        help="skip the context rows of nbdfuse with read_ahead_kb=1024",
    )
    p.add_argument(
        "--guest-backend",
        choices=("tcg", "kvm"),
        default="tcg",
        help="accelerator of both appliances in the guest and write groups (default: "
        "%(default)s; "
        "KVM guests hang on our machines)",
    )
    p.add_argument(
        "--guest-debug",
        action="store_true",
        help="mount snapfs with --debug in the guest and write groups",
    )
    a = p.parse_args(argv)  # fmt: skip
    runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    reads = a.random_reads if a.random_reads is not None else (2000 if a.quick else 20000)
    opts = Options(a.workdir, runs, a.quick, a.only or sorted(GROUPS), a.json_path, a.seed,
                   reads, a.tuned, a.runs or 1, a.guest_backend, a.guest_debug)  # fmt: skip
    opts.cases = tuple(a.case)
    return opts


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        console.print("[red]scripts/bench needs root (cache eviction, bdi read-ahead).[/]")
        return 2
    for group in opts.only:
        if group in PLANNED:
            console.print(f"[red]group {group!r} is not implemented yet ({PLANNED[group]})[/]")
            return 2
    # SIGTERM/SIGHUP unwind like Ctrl-C, through every cleanup below.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        bench = Bench(opts, stack)
        bench.info = machine_info() | {
            "runs": opts.runs,
            "guest_runs": opts.guest_runs,
            "quick": opts.quick,
        }
        try:
            for group in opts.only:
                for fn in GROUPS[group]:
                    if opts.cases and not any(c in fn.__name__ for c in opts.cases):
                        continue
                    console.rule(f"{group}: {(fn.__doc__ or fn.__name__).splitlines()[0]}")
                    fn(bench)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: cleaning up[/]")
            return 130
        finally:
            if bench.rows:
                mode = "quick" if opts.quick else "full"
                runs = f"{opts.runs}" if opts.only != ["guest"] else f"{opts.guest_runs}"
                if opts.only != ["guest"] and ("guest" in opts.only or "write" in opts.only):
                    runs = f"{opts.runs} (guest, write rsync: {opts.guest_runs})"
                title = f"snapfs benchmarks ({mode}, median of {runs})"
                out = Console(width=max(150, Console().width))
                out.print(results_table(bench.rows, title))
                if "read_ahead_kb" in bench.info:
                    ra = bench.info["read_ahead_kb"]
                    out.print(f"bdi read_ahead_kb of the mounts: {ra}")
                checks = bench.info.get("guest_checks", []) + bench.info.get("write_checks", [])
                for line in checks:
                    out.print(f"  check: {line}")
                for row in bench.rows:
                    if row.note:
                        out.print(f"  {row.case} / {row.tool}: {row.note}")
            if opts.json_path is not None:
                data = {"info": bench.info, "elapsed_s": time.monotonic() - started,
                        "rows": [asdict(r) | {"median": r.median, "mbps": r.mbps}
                                 for r in bench.rows]}  # fmt: skip
                opts.json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    console.log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
