"""Durability and failure behaviour of files written into a restore disk's ``files/``
(issue 4, "Durability and failure behaviour (tested)"), through real mounts of a real
repository: real FUSE, the restore disk's writable qemu-nbd, real TCG appliances.

One repository and one restore disk for the module; the tests run in file order and each
builds on the previous one (every phase writes its own directory, every later phase
checks the earlier ones are still there):

1. clean ``snapfs umount``; 2. SIGTERM to the daemon; 3. ``kill -9`` of the daemon;
4. the appliance's qemu killed mid-write, then a full guest filesystem (ENOSPC);
5. the snapshot the restore disk was made from is unchanged.

After every phase the restore qcow2 is checked without snapfs: ``qemu-img check``, then
``qemu-img convert`` to raw and e2fsprogs on the ext4 partition (no appliance).
Appliance launches: 5 (one per mount, one relaunch after the kill), ~30 s each under TCG.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapfs.catalog.writer import DiskSource, add_snapshot, init_repository
from snapfs.mountpoint import fstype_at
from snapfs.sample import PARTITION_OFFSET, make_ext4_disk
from tests.fusemount import Mounted, kill_tree_check, needs_fuse, start_mount, stop_mount

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.guestfs, pytest.mark.slow]

MiB = 1 << 20
VM = "app-01"
NAME = f"{VM}@latest@vda"
DISK_SIZE = 128 * MiB
BIG = 20 * MiB
META_MTIME_NS = 1_500_000_000_123_456_700  # ext4 keeps nanoseconds (256-byte inodes)
UID, GID = 1234, 4321


def _run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Expected:
    """What one phase wrote: must be in the image (fsynced), or only after a clean stop."""

    tag: str
    big_sha: str
    renamed: bytes
    meta: bytes
    closed: bytes


@dataclass
class State:
    repo: Path
    work: Path
    mnt: Path
    config: Path
    image: Path
    vms_digest: dict[str, str]
    snapshot_disk_sha: str = ""
    phases: list[Expected] = field(default_factory=list)
    # phases whose un-fsynced (closed) files must be there too: clean unmount, SIGTERM
    synced_on_stop: set[str] = field(default_factory=set)
    failed: bool = False


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[State]:
    for tool in ("mkfs.ext4", "sfdisk", "qemu-img", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    work = tmp_path_factory.mktemp("durability")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_bytes(b"app-01\n")
    raw = work / "vda.raw"
    make_ext4_disk(tree, raw, DISK_SIZE)
    repo = work / "repo"
    init_repository(repo)
    add_snapshot(repo, VM, [DiskSource("vda", raw, "raw")])
    raw.unlink()
    config = work / "config.toml"
    # TCG (KVM guests hang here); no idle shutdown in the middle of a phase.
    config.write_text('[guestfs]\nbackend = "tcg"\nidle_timeout_s = 3600\n')
    st = State(
        repo=repo,
        work=work,
        mnt=work / "mnt",
        config=config,
        image=repo / "restore" / NAME / "disk.qcow2",
        vms_digest=_digest_tree(repo / "vms"),
    )
    yield st
    # Nothing of ours may be left: no mount, no qemu of the daemon.
    if fstype_at(st.mnt) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(st.mnt)], capture_output=True)


@pytest.fixture(autouse=True)
def _in_order(state: State) -> Iterator[None]:
    """Each phase needs the previous ones: after a failure the rest are skipped."""
    if state.failed:
        pytest.skip("an earlier phase failed")
    ok = False
    try:
        yield
        ok = True
    finally:
        if not ok:
            state.failed = True


# -- mounts and processes ------------------------------------------------------------------


def _mount(state: State) -> Mounted:
    return start_mount(state.repo, state.mnt, "--config", str(state.config),
                       log=state.work / "mount.log")


def _umount(state: State, m: Mounted) -> None:
    """``snapfs umount``: unmounts, then waits until the daemon has synced and stopped;
    its qemu-nbd and appliance are gone with it."""
    children = m.server_pids() + _appliance_pids(m)
    res = _run(sys.executable, "-m", "snapfs", "umount", state.mnt, check=False)
    assert res.returncode == 0, res.stderr + m.log_text()[-3000:]
    assert m.proc.wait(30) == 0
    _wait_gone(children, 5)


def _appliance_pids(m: Mounted) -> list[int]:
    """The appliance qemu(s) the daemon started (libguestfs forks them from the daemon)."""
    out = _run("pgrep", "-P", str(m.proc.pid), "-f", "qemu-system", check=False).stdout
    return [int(p) for p in out.split()]


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while kill_tree_check(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not kill_tree_check(pids), f"still running: {kill_tree_check(pids)}"


# -- writing and checking one phase ----------------------------------------------------------


def _write_phase(files: Path, tag: str) -> Expected:
    """mkdir, rename, chmod, chown, utimens and a 20 MiB file, all fsynced; then one file
    written and closed without fsync."""
    top = files / tag
    top.mkdir()
    os.chmod(top, 0o750)
    (top / "sub").mkdir(mode=0o700)
    renamed = f"renamed in {tag}\n".encode() * 100
    with open(top / "draft.txt", "wb") as f:
        f.write(renamed)
        os.fsync(f.fileno())
    os.rename(top / "draft.txt", top / "sub" / "renamed.txt")
    meta = f"metadata of {tag}\n".encode()
    with open(top / "meta.txt", "wb") as f:
        f.write(meta)
    os.chmod(top / "meta.txt", 0o604)
    os.chown(top / "meta.txt", UID, GID)
    os.utime(top / "meta.txt", ns=(META_MTIME_NS, META_MTIME_NS))
    big = os.urandom(BIG)
    fd = os.open(top / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for off in range(0, BIG, MiB):
            assert os.pwrite(fd, big[off : off + MiB], off) == MiB
        # The last fsync of the phase: every change above is before it (fsync of a
        # directory is not forwarded by the FUSE layer, so a file's fsync carries them).
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(top / "meta.txt", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    closed = f"closed, never fsynced, in {tag}\n".encode() * 50
    (top / "closed.txt").write_bytes(closed)
    return Expected(tag, _sha(big), renamed, meta, closed)


def _check_mounted(files: Path, exp: Expected, *, closed: bool) -> None:
    """The phase's files, read back through a (new) mount and appliance."""
    top = files / exp.tag
    assert os.listdir(top) and not (top / "draft.txt").exists()
    assert stat_mode(top) == 0o750 and stat_mode(top / "sub") == 0o700
    assert (top / "sub" / "renamed.txt").read_bytes() == exp.renamed
    st = os.lstat(top / "meta.txt")
    assert (stat_mode(top / "meta.txt"), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o604, UID, GID, META_MTIME_NS)
    assert (top / "meta.txt").read_bytes() == exp.meta
    assert os.path.getsize(top / "big.bin") == BIG
    assert _sha((top / "big.bin").read_bytes()) == exp.big_sha
    if closed:
        assert (top / "closed.txt").read_bytes() == exp.closed


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


class Offline:
    """The restore image read without snapfs: converted to raw, e2fsprogs on the partition."""

    def __init__(self, state: State, *, shared: bool = False, replay: bool = False) -> None:
        disk = state.work / "offline-disk.raw"
        self.raw = state.work / "offline-part.raw"
        self.raw.unlink(missing_ok=True)
        # -U: the image may still be open in the mount's qemu-nbd (read what is on disk).
        _run("qemu-img", "convert", *(["-U"] if shared else []), "-O", "raw", state.image,
             disk)
        # The ext4 partition on its own (e2fsck loses an ?offset= when it reopens).
        _run("dd", f"if={disk}", f"of={self.raw}", "bs=64K", "conv=sparse",
             f"skip={PARTITION_OFFSET // (64 << 10)}")
        disk.unlink()
        self.target = str(self.raw)
        if replay:
            # Not unmounted cleanly (killed): replay the journal into the copy, as a
            # guest's mount would; anything beyond a replay is a failure.
            res = _run("e2fsck", "-fy", self.target, check=False)
            assert res.returncode in (0, 1), res.stdout + res.stderr
        # Then the filesystem must be clean.
        res = _run("e2fsck", "-fn", self.target, check=False)
        assert res.returncode == 0, res.stdout + res.stderr

    def cat(self, path: str) -> bytes:
        res = subprocess.run(["debugfs", "-R", f"cat {path}", self.target],
                             capture_output=True, check=True)
        return res.stdout

    def stat(self, path: str) -> dict[str, int]:
        out = _run("debugfs", "-R", f"stat {path}", self.target).stdout
        found = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
        ids = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size:\s+(\d+)", out)
        mtime = re.search(r"mtime: 0x([0-9a-f]+):([0-9a-f]+)", out)
        assert found and ids and mtime, f"{path}: {out}"
        return {
            "mode": int(found.group(2), 8),
            "uid": int(ids.group(1)),
            "gid": int(ids.group(2)),
            "size": int(ids.group(3)),
            # extra field: nanoseconds << 2 | epoch bits
            "mtime_ns": int(mtime.group(1), 16) * 1_000_000_000 + (int(mtime.group(2), 16) >> 2),
        }

    def exists(self, path: str) -> bool:
        res = _run("debugfs", "-R", f"stat {path}", self.target, check=False)
        return "File not found" not in res.stderr + res.stdout

    def check(self, exp: Expected, *, closed: bool) -> None:
        top = f"/{exp.tag}"
        assert self.stat(top)["mode"] == 0o750
        assert self.stat(f"{top}/sub")["mode"] == 0o700
        assert not self.exists(f"{top}/draft.txt")
        assert self.cat(f"{top}/sub/renamed.txt") == exp.renamed
        meta = self.stat(f"{top}/meta.txt")
        assert (meta["mode"], meta["uid"], meta["gid"], meta["mtime_ns"]) == (
            0o604, UID, GID, META_MTIME_NS)
        assert self.cat(f"{top}/meta.txt") == exp.meta
        assert _sha(self.cat(f"{top}/big.bin")) == exp.big_sha
        if closed:
            assert self.cat(f"{top}/closed.txt") == exp.closed

    def close(self) -> None:
        self.raw.unlink(missing_ok=True)


def _offline_check(state: State, *, replay: bool = False, shared: bool = False) -> None:
    off = Offline(state, shared=shared, replay=replay)
    try:
        for exp in state.phases:
            off.check(exp, closed=exp.tag in state.synced_on_stop)
    finally:
        off.close()


def _qemu_img_check(state: State, *, shared: bool = False) -> None:
    res = _run("qemu-img", "check", *(["-U"] if shared else []), state.image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout, res.stdout


def _check_all_mounted(state: State, files: Path) -> None:
    for exp in state.phases:
        _check_mounted(files, exp, closed=exp.tag in state.synced_on_stop)


# -- the phases ------------------------------------------------------------------------------


def test_clean_umount_keeps_everything(state: State) -> None:
    m = _mount(state)
    try:
        snap_disk = state.mnt / VM / "latest" / "disks" / "vda.img"
        state.snapshot_disk_sha = _sha(snap_disk.read_bytes())
        (state.mnt / "restore" / NAME).mkdir()
        files = state.mnt / "restore" / NAME / "files"
        exp = _write_phase(files, "clean")
        state.phases.append(exp)
        # fsync reached the image itself (guest sync + NBD flush of qemu-nbd's qcow2
        # caches), not only the appliance or qemu-nbd's memory: read it while mounted.
        off = Offline(state, shared=True, replay=True)
        try:
            off.check(exp, closed=False)
        finally:
            off.close()
        _umount(state, m)
    finally:
        stop_mount(m)
    state.synced_on_stop.add("clean")
    _qemu_img_check(state)
    _offline_check(state)


def test_sigterm_keeps_everything(state: State) -> None:
    m = _mount(state)
    try:
        files = state.mnt / "restore" / NAME / "files"
        _check_all_mounted(state, files)
        state.phases.append(_write_phase(files, "sigterm"))
        children = m.server_pids() + _appliance_pids(m)
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(60) == 0
        _wait_gone(children, 5)
        assert "Traceback" not in m.log_text()
    finally:
        stop_mount(m)
    state.synced_on_stop.add("sigterm")
    _qemu_img_check(state)
    _offline_check(state)


def test_kill9_keeps_what_was_fsynced(state: State) -> None:
    m = _mount(state)
    try:
        files = state.mnt / "restore" / NAME / "files"
        _check_all_mounted(state, files)
        state.phases.append(_write_phase(files, "kill9"))
        # A directory's own fsync (fsyncdir) makes its entries durable: no file fsync after.
        (files / "kill9" / "dirsync").mkdir()
        os.rename(files / "kill9" / "closed.txt", files / "kill9" / "closed-renamed.txt")
        dfd = os.open(files / "kill9", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        children = m.server_pids() + _appliance_pids(m)
        assert _appliance_pids(m) and m.server_pids()
        m.proc.kill()
        m.proc.wait(30)
        # qemu-nbd gets SIGTERM (pdeathsig) and closes the image cleanly; libguestfs'
        # recovery process kills the appliance.
        _wait_gone(children)
    finally:
        stop_mount(m)
    _qemu_img_check(state)
    # The guest filesystem was not unmounted: its journal is replayed (on a copy).
    _offline_check(state, replay=True)
    off = Offline(state, replay=True)
    try:
        assert off.exists("/kill9/dirsync"), "fsyncdir did not make a mkdir durable"
        assert off.exists("/kill9/closed-renamed.txt")
        assert not off.exists("/kill9/closed.txt")
    finally:
        off.close()


def test_appliance_killed_then_full_disk(state: State) -> None:
    m = _mount(state)
    try:
        files = state.mnt / "restore" / NAME / "files"
        # What was fsynced before kill -9 is there (through a new appliance: the journal
        # replayed by the guest kernel).
        _check_all_mounted(state, files)
        (files / "fail").mkdir()
        before_kill = os.urandom(4 * MiB)
        fd = os.open(files / "fail" / "victim.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, before_kill)
            os.fsync(fd)
            pids = _appliance_pids(m)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            _wait_gone(pids)
            # Writes go on (buffered) until one sends data: that one fails with EIO,
            # quickly, instead of hanging or succeeding into nothing.
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                for _ in range(32):
                    os.write(fd, os.urandom(MiB))
                os.fsync(fd)
            assert info.value.errno == errno.EIO
            assert time.monotonic() - started < 60
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        log = m.log_text()
        assert re.search(r"appliance .*died", log), log[-3000:]
        # The mount is up; the restore image is consistent and holds what was fsynced.
        assert fstype_at(state.mnt) == "fuse.snapfs"
        assert NAME in os.listdir(state.mnt / "restore")
        _qemu_img_check(state, shared=True)
        # files/ starts a new appliance and works: earlier data, fsynced data, new writes.
        assert (files / "fail" / "victim.bin").read_bytes()[: len(before_kill)] == before_kill
        _check_all_mounted(state, files)
        (files / "fail" / "after.txt").write_bytes(b"written after the relaunch\n")
        assert (files / "fail" / "after.txt").read_bytes() == b"written after the relaunch\n"
        assert len(_appliance_pids(m)) == 1

        # A full guest filesystem: ENOSPC (not EIO), on a write or at the latest at close.
        fd = os.open(files / "fill.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        chunk = b"\xa5" * MiB
        written, error = 0, None
        try:
            while written < 2 * DISK_SIZE:
                written += os.write(fd, chunk)
            os.fsync(fd)
        except OSError as exc:
            error = exc
        try:
            os.close(fd)
        except OSError as exc:
            error = error or exc
        assert error is not None, f"wrote {written} bytes into a {DISK_SIZE}-byte disk"
        assert error.errno == errno.ENOSPC, error
        assert written > 20 * MiB
        # Still working: what fitted is there, and removing it frees the space again.
        assert os.path.getsize(files / "fill.bin") > 0
        os.unlink(files / "fill.bin")
        (files / "fail" / "after-full.txt").write_bytes(b"room again\n")
        _umount(state, m)
    finally:
        stop_mount(m)
    _qemu_img_check(state)
    _offline_check(state)
    off = Offline(state)
    try:
        assert off.cat("/fail/victim.bin")[: len(before_kill)] == before_kill
        assert off.cat("/fail/after-full.txt") == b"room again\n"
        assert not off.exists("/fill.bin")
    finally:
        off.close()


def test_snapshot_never_modified(state: State) -> None:
    """After all the guest-file writes above, the source snapshot reads the same through
    a mount, and its image files' checksums are unchanged."""
    assert _digest_tree(state.repo / "vms") == state.vms_digest
    m = _mount(state)
    try:
        snap_disk = state.mnt / VM / "latest" / "disks" / "vda.img"
        assert _sha(snap_disk.read_bytes()) == state.snapshot_disk_sha
        restore_disk = state.mnt / "restore" / NAME / "disk.img"
        assert _sha(restore_disk.read_bytes()) != state.snapshot_disk_sha
    finally:
        stop_mount(m)
    assert _digest_tree(state.repo / "vms") == state.vms_digest
