"""RwGuestTree against a real TCG appliance writing a real writable qemu-nbd: every change,
the cache staying exact, errnos, then close() and an independent check of the image.

One appliance for the whole module (a launch takes 20-40 s here). Disks: vda (64 MiB ext4
made with mkfs.ext4 -d, behind a qcow2 overlay, like a restore disk) and vdb (a tiny ext4
for ENOSPC). The last test closes the tree; tests run in file order.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from snapfs.errors import NotFound, SnapfsError
from snapfs.guestfs import AppliancePool, GuestfsSettings, GuestSession, View
from snapfs.guestfs.pool import DRAIN_TICK_S
from snapfs.guestfs.rwtree import STALE_GRACE_S, WRITE_BEHIND, RwGuestSession, RwGuestTree
from snapfs.guestfs.session import find_qemu_pids

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

TCG = GuestfsSettings(backend="tcg")
MiB = 1 << 20
NON_UTF8 = b"caf\xe9"


def _run(*argv: str | Path) -> str:
    return subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True
    ).stdout


@dataclass
class Disks:
    work: Path
    overlays: dict[str, Path]
    socks: dict[str, str]
    procs: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # qemu-nbd flushes the image on SIGTERM
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disks]:
    for tool in ("mkfs.ext4", "qemu-nbd", "qemu-img", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    work = tmp_path_factory.mktemp("guestrw")
    tree = work / "tree"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "hello.txt").write_bytes(b"hello\n")
    (tree / "dir" / "sub" / "deep").write_bytes(b"deep\n")
    (tree / "full").mkdir()
    (tree / "full" / "x").write_bytes(b"x")
    with open(bytes(tree) + b"/" + NON_UTF8, "wb") as f:
        f.write(b"latin-1 name\n")
    overlays: dict[str, Path] = {}
    for name, size, extra in (("vda", 64 * MiB, ["-d", str(tree)]), ("vdb", 4 * MiB, [])):
        raw = work / f"{name}.raw"
        raw.touch()
        os.truncate(raw, size)
        _run("mkfs.ext4", "-q", "-F", "-b", "4096" if name == "vda" else "1024", *extra, raw)
        base = work / f"{name}-base.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
        raw.unlink()
        overlay = work / f"{name}.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay)
        overlays[name] = overlay
    result = Disks(work, overlays, {}, [])
    for name, overlay in overlays.items():
        sock = str(work / f"{name}.sock")
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--",  # gone with a crashed test process
             "qemu-nbd", "-t", "--shared=4", "-f", "qcow2", "--cache=writeback", "-k", sock,
             str(overlay)],
            stderr=subprocess.DEVNULL,
        )
        result.procs.append(proc)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        result.socks[name] = sock
    try:
        yield result
    finally:
        result.stop()


@pytest.fixture(scope="module")
def session(disks: Disks) -> Iterator[GuestSession]:
    s = RwGuestSession("restore-test", [(n, disks.socks[n]) for n in ("vda", "vdb")], TCG)
    yield s
    trio.run(s.aclose)
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == [], "qemu left after close"


@pytest.fixture(scope="module")
def rw(session: GuestSession) -> RwGuestTree:
    return RwGuestTree(session, ino_salt=b"restore")


async def _views(rw: RwGuestTree) -> tuple[View, View]:
    return await rw.volume_view("vda"), await rw.volume_view("vdb")


async def test_readonly_session_refused(disks: Disks) -> None:
    with pytest.raises(ValueError):
        RwGuestTree(GuestSession("ro", [("vda", disks.socks["vda"])], TCG))


async def test_volumes_and_reads(rw: RwGuestTree) -> None:
    vols = {v.name: v.fstype for v in await rw.volumes()}
    assert vols == {"vda": "ext4", "vdb": "ext4"}
    vda, _ = await _views(rw)
    assert await rw.read(vda, b"/hello.txt", 0, 100) == b"hello\n"
    names = {e.name for e in await rw.listdir(vda, b"/")}
    assert {b"hello.txt", b"dir", NON_UTF8} <= names
    # a non-UTF-8 name reads (through an alias) ...
    assert await rw.read(vda, b"/" + NON_UTF8, 0, 100) == b"latin-1 name\n"


async def test_create_write_read(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    st = await rw.create(vda, b"/new.bin", 0o640, 1000, 1001)
    assert stat.S_ISREG(st.mode) and stat.S_IMODE(st.mode) == 0o640
    assert (st.uid, st.gid, st.size) == (1000, 1001, 0)
    assert (await rw.lookup(vda, b"/", b"new.bin")).guest_ino == st.guest_ino
    data = os.urandom(3 * MiB + 12345)
    for off in range(0, len(data), 128 << 10):
        piece = data[off : off + (128 << 10)]
        assert await rw.write(vda, b"/new.bin", off, piece) == len(piece)
        # buffered or sent: the size seen is the end written so far
        assert (await rw.getattr(vda, b"/new.bin")).size == off + len(piece)
    assert await rw.read(vda, b"/new.bin", 0, len(data)) == data  # read sends the buffer
    await rw.fsync(vda, b"/new.bin")
    assert (await rw.getattr(vda, b"/new.bin")).size == len(data)
    # overwrite in the middle (not contiguous with the earlier writes)
    await rw.write(vda, b"/new.bin", 100, b"MIDDLE")
    await rw.flush(vda, b"/new.bin")
    assert await rw.read(vda, b"/new.bin", 96, 12) == data[96:100] + b"MIDDLE" + data[106:108]


async def test_big_sequential_write(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    await rw.create(vda, b"/big", 0o644)
    data = os.urandom(2 * WRITE_BEHIND + 5 * MiB)
    start = time.monotonic()
    for off in range(0, len(data), 128 << 10):
        await rw.write(vda, b"/big", off, data[off : off + (128 << 10)])
    await rw.fsync(vda, b"/big")
    elapsed = time.monotonic() - start
    print(f"wrote {len(data) / MiB:.0f} MiB in {elapsed:.1f} s")  # informative, not asserted
    assert (await rw.getattr(vda, b"/big")).size == len(data)
    assert await rw.read(vda, b"/big", 7 * MiB, MiB) == data[7 * MiB : 8 * MiB]


async def test_create_existing_is_eexist(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    with pytest.raises(SnapfsError) as exc:
        await rw.create(vda, b"/hello.txt", 0o644)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(SnapfsError) as exc:
        await rw.mkdir(vda, b"/dir", 0o755)
    assert exc.value.errno == errno.EEXIST


async def test_truncate(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    await rw.create(vda, b"/t", 0o600)
    await rw.write(vda, b"/t", 0, b"A" * 10000)
    st = await rw.truncate(vda, b"/t", 1000)  # sends the buffer first
    assert st.size == 1000
    assert await rw.read(vda, b"/t", 0, 20000) == b"A" * 1000
    assert (await rw.truncate(vda, b"/t", 3000)).size == 3000
    assert await rw.read(vda, b"/t", 0, 20000) == b"A" * 1000 + bytes(2000)


async def test_mkdir_rmdir(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    before = (await rw.getattr(vda, b"/")).nlink
    st = await rw.mkdir(vda, b"/d1", 0o750, 1000, 1000)
    assert st.is_dir and stat.S_IMODE(st.mode) == 0o750 and st.uid == 1000
    assert (await rw.getattr(vda, b"/")).nlink == before + 1  # parent refreshed
    assert await rw.listdir(vda, b"/d1") == []
    await rw.create(vda, b"/d1/f", 0o644)
    assert [e.name for e in await rw.listdir(vda, b"/d1")] == [b"f"]
    with pytest.raises(SnapfsError) as exc:
        await rw.rmdir(vda, b"/d1")
    assert exc.value.errno == errno.ENOTEMPTY
    await rw.unlink(vda, b"/d1/f")
    with pytest.raises(NotFound):
        await rw.getattr(vda, b"/d1/f")
    await rw.rmdir(vda, b"/d1")
    with pytest.raises(NotFound):
        await rw.getattr(vda, b"/d1")
    assert (await rw.getattr(vda, b"/")).nlink == before
    with pytest.raises(SnapfsError) as exc:
        await rw.unlink(vda, b"/nothing")
    assert exc.value.errno == errno.ENOENT


async def test_rename(rw: RwGuestTree) -> None:
    vda, vdb = await _views(rw)
    await rw.mkdir(vda, b"/r1", 0o755)
    await rw.mkdir(vda, b"/r2", 0o755)
    await rw.create(vda, b"/r1/a", 0o644)
    await rw.write(vda, b"/r1/a", 0, b"payload")  # buffered: sent before the rename
    await rw.rename(vda, b"/r1/a", b"/r2/b")
    assert [e.name for e in await rw.listdir(vda, b"/r1")] == []
    assert await rw.read(vda, b"/r2/b", 0, 100) == b"payload"
    # over an existing file
    await rw.create(vda, b"/r2/c", 0o644)
    await rw.rename(vda, b"/r2/b", b"/r2/c")
    assert [e.name for e in await rw.listdir(vda, b"/r2")] == [b"c"]
    assert await rw.read(vda, b"/r2/c", 0, 100) == b"payload"
    # noreplace
    await rw.create(vda, b"/r2/d", 0o644)
    with pytest.raises(SnapfsError) as exc:
        await rw.rename(vda, b"/r2/d", b"/r2/c", noreplace=True)
    assert exc.value.errno == errno.EEXIST
    # a directory with a cached subtree
    await rw.listdir(vda, b"/dir/sub")
    await rw.rename(vda, b"/dir", b"/r1/moved")
    assert await rw.read(vda, b"/r1/moved/sub/deep", 0, 100) == b"deep\n"
    with pytest.raises(NotFound):
        await rw.listdir(vda, b"/dir/sub")
    await rw.rename(vda, b"/r1/moved", b"/dir")
    # across filesystems (a files/ view with vdb mounted at /small)
    vols = {v.name: v for v in await rw.volumes()}
    composed = View("files", ((b"/small", vols["vdb"]), (b"/", vols["vda"])))
    with pytest.raises(SnapfsError) as exc:
        await rw.rename(composed, b"/r2/d", b"/small/d")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(SnapfsError) as exc:
        await rw.unlink(composed, b"/small")
    assert exc.value.errno == errno.EBUSY
    assert vdb.name == "vdb"


async def test_symlink_and_hardlink(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    st = await rw.symlink(vda, b"/sl", b"hello.txt", 1000, 1000)
    assert st.is_link and st.uid == 1000
    assert await rw.readlink(vda, b"/sl") == b"hello.txt"
    await rw.mkdir(vda, b"/h", 0o755)
    await rw.create(vda, b"/h/one", 0o644)
    await rw.write(vda, b"/h/one", 0, b"linked")
    st = await rw.link(vda, b"/h/one", b"/two")
    assert st.nlink == 2
    assert (await rw.getattr(vda, b"/h/one")).nlink == 2
    one = await rw.getattr(vda, b"/h/one")
    assert (await rw.getattr(vda, b"/two")).guest_ino == one.guest_ino
    assert await rw.read(vda, b"/two", 0, 100) == b"linked"
    await rw.unlink(vda, b"/h/one")
    assert (await rw.getattr(vda, b"/two")).nlink == 1


async def test_chmod_chown_utimens(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    await rw.create(vda, b"/m", 0o644)
    assert stat.S_IMODE((await rw.chmod(vda, b"/m", 0o4751)).mode) == 0o4751
    st = await rw.chown(vda, b"/m", 1234, 5678)
    assert (st.uid, st.gid) == (1234, 5678)
    st = await rw.chown(vda, b"/m", -1, 42)
    assert (st.uid, st.gid) == (1234, 42)
    st = await rw.utimens(vda, b"/m", 1_600_000_000_123_456_789, 1_500_000_000_987_654_321)
    assert (st.atime_ns, st.mtime_ns) == (1_600_000_000_123_456_789, 1_500_000_000_987_654_321)
    st = await rw.utimens(vda, b"/m", None, 1_400_000_000_000_000_001)
    assert (st.atime_ns, st.mtime_ns) == (1_600_000_000_123_456_789, 1_400_000_000_000_000_001)
    # a symlink's own times (not its target's)
    st = await rw.utimens(vda, b"/sl", None, 1_300_000_000_000_000_002)
    assert st.mtime_ns == 1_300_000_000_000_000_002
    assert (await rw.getattr(vda, b"/hello.txt")).mtime_ns != 1_300_000_000_000_000_002


async def test_xattrs(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    await rw.setxattr(vda, b"/m", b"user.color", b"blue\0\xff")
    assert await rw.getxattr(vda, b"/m", b"user.color") == b"blue\0\xff"
    assert b"user.color" in await rw.listxattr(vda, b"/m")
    await rw.setxattr(vda, b"/", b"user.root", b"r")
    assert await rw.getxattr(vda, b"/", b"user.root") == b"r"
    await rw.removexattr(vda, b"/m", b"user.color")
    assert b"user.color" not in await rw.listxattr(vda, b"/m")
    with pytest.raises(SnapfsError) as exc:
        await rw.removexattr(vda, b"/m", b"user.color")
    assert exc.value.errno == errno.ENODATA


async def test_mknod(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    st = await rw.mknod(vda, b"/fifo", stat.S_IFIFO | 0o600, 0)
    assert stat.S_ISFIFO(st.mode)
    st = await rw.mknod(vda, b"/null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    assert stat.S_ISCHR(st.mode) and st.rdev == os.makedev(1, 3)


async def test_non_utf8_names_refused_for_changes(rw: RwGuestTree) -> None:
    vda, _ = await _views(rw)
    with pytest.raises(SnapfsError) as exc:
        await rw.create(vda, b"/bad\xff", 0o644)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(SnapfsError) as exc:
        await rw.unlink(vda, b"/" + NON_UTF8)
    assert exc.value.errno == errno.EINVAL
    assert await rw.read(vda, b"/" + NON_UTF8, 0, 100) == b"latin-1 name\n"
    # the read alias does not pin anything a later change needs
    await rw.rename(vda, b"/hello.txt", b"/hello2.txt")
    await rw.rename(vda, b"/hello2.txt", b"/hello.txt")


async def test_enospc(rw: RwGuestTree) -> None:
    _, vdb = await _views(rw)
    await rw.create(vdb, b"/fill", 0o644)
    with pytest.raises(SnapfsError) as exc:
        for off in range(0, 16 * MiB, 128 << 10):
            await rw.write(vdb, b"/fill", off, b"\x55" * (128 << 10))
        await rw.fsync(vdb, b"/fill")
    assert exc.value.errno == errno.ENOSPC
    # reported once more to the closer, then cleared; the tree keeps working
    with pytest.raises(SnapfsError) as exc:
        await rw.flush(vdb, b"/fill")
    assert exc.value.errno == errno.ENOSPC
    await rw.flush(vdb, b"/fill")
    await rw.unlink(vdb, b"/fill")
    await rw.create(vdb, b"/after", 0o644)
    await rw.write(vdb, b"/after", 0, b"room again")
    await rw.fsync(vdb, b"/after")


async def test_derived_metadata_equals_the_guests(
    rw: RwGuestTree, session: GuestSession
) -> None:
    """rsync's sequence (create, write, close, chmod, chown, utimens, rename): chmod, chown
    and utimens make no lstat of their own, yet every stat afterwards equals a fresh one
    from the guest, ctime included (pauses make each change's ctime differ; vdb's 128-byte
    inodes keep whole seconds, so derived nanoseconds would differ too)."""
    calls = jobs = 0
    names: list[str] = []
    real_call = GuestSession.call

    class Counted:
        """The real handle; counts the appliance calls made through it."""

        def __init__(self, g: Any) -> None:
            self._g = g

        def __getattr__(self, name: str) -> Any:
            method = getattr(self._g, name)

            def call(*args: Any) -> Any:
                nonlocal calls
                calls += 1
                names.append(name)
                return method(*args)

            return call

    async def counting(self: GuestSession, fn: Any, **kwargs: Any) -> Any:
        # Below RwGuestSession.call: the deferred changes it applies are counted too.
        nonlocal jobs
        jobs += 1
        return await real_call(self, lambda g, state: fn(Counted(g), state), **kwargs)

    rw.stale_grace_s = 0.0  # every stat re-reads what was derived
    for vname in ("vda", "vdb"):
        view = await rw.volume_view(vname)
        await rw.mkdir(view, b"/rs", 0o755)
        await rw.listdir(view, b"/rs")
        GuestSession.call = counting  # type: ignore[method-assign]
        try:
            calls = jobs = 0
            names.clear()
            await rw.create(view, b"/rs/.f.XXXX", 0o600, 0, 0)
            await rw.write(view, b"/rs/.f.XXXX", 0, b"data")
            await rw.flush(view, b"/rs/.f.XXXX")
            await trio.sleep(0.05)
            derived = rw.stats["derived"]
            st = await rw.chmod(view, b"/rs/.f.XXXX", 0o640)
            assert stat.S_IMODE(st.mode) == 0o640
            assert await rw.stale(view, b"/rs/.f.XXXX")
            await trio.sleep(0.05)
            st = await rw.chown(view, b"/rs/.f.XXXX", 1234, 4321)
            assert (st.uid, st.gid) == (1234, 4321)
            await trio.sleep(0.05)
            await rw.utimens(view, b"/rs/.f.XXXX", 1_600_000_000_123_456_789,
                             1_500_000_000_987_654_321)
            assert rw.stats["derived"] == derived + 3
            await trio.sleep(0.05)
            await rw.rename(view, b"/rs/.f.XXXX", b"/rs/f")
            assert not await rw.stale(view, b"/rs/f")  # the rename re-read it
            # mknod + lstatnslist, pwrite, chmod, lchown, utimens, rename + lstatnslist: no
            # lchown at create (already root's), no lstat after a pwrite or a setattr
            assert calls == 8, " ".join(names)  # was 16
            # ... in 3 appliance round trips (was 6): chmod, lchown and utimens were
            # deferred and went in front of the rename, in their order
            assert jobs == 3, " ".join(names)
            assert names[3:7] == ["chmod", "lchown", "utimens", "rename"], names
            await rw.create(view, b"/rs/g", 0o644)
            await trio.sleep(0.05)
            await rw.chmod(view, b"/rs/g", 0o600)
            await rw.utimens(view, b"/rs/g", None, 1_400_000_000_555_555_555)
            await rw.chmod(view, b"/rs", 0o700)  # a directory, through its parent
            calls = jobs = 0
            mine = await rw.getattr(view, b"/rs/g")
            # one round trip: the three deferred changes, then one lstatnslist
            assert (jobs, calls) == (1, 4) and not await rw.stale(view, b"/rs/g")
        finally:
            GuestSession.call = real_call  # type: ignore[method-assign]
        fresh = RwGuestTree(session, ino_salt=b"restore")
        fview = await fresh.volume_view(vname)
        for path in (b"/rs", b"/rs/f", b"/rs/g"):
            mine = await rw.getattr(view, path)
            theirs = await fresh.getattr(fview, path)
            assert mine == dataclasses.replace(theirs, atime_ns=mine.atime_ns), path
        theirs = await fresh.getattr(fview, b"/rs/f")
        assert (theirs.uid, theirs.gid, stat.S_IMODE(theirs.mode)) == (1234, 4321, 0o640)
        assert theirs.mtime_ns // 1_000_000_000 == 1_500_000_000
        g = await fresh.getattr(fview, b"/rs/g")
        assert g.mtime_ns // 1_000_000_000 == 1_400_000_000 and stat.S_IMODE(g.mode) == 0o600
        # what a listing shows is re-read as well
        await trio.sleep(0.05)
        await rw.chmod(view, b"/rs/g", 0o604)
        assert await rw.stale(view, b"/rs/g")
        listed = {e.name: e.stat for e in await rw.listdir(view, b"/rs")}
        fresh = RwGuestTree(session, ino_salt=b"restore")
        theirs = await fresh.getattr(await fresh.volume_view(vname), b"/rs/g")
        assert stat.S_IMODE(theirs.mode) == 0o604
        assert listed[b"g"] == dataclasses.replace(theirs, atime_ns=listed[b"g"].atime_ns)
    rw.stale_grace_s = STALE_GRACE_S


async def test_changed_entries_shown_derived_within_the_grace(
    rw: RwGuestTree, session: RwGuestSession
) -> None:
    """Right after a write (or chmod, utimens) a getattr answers from what the daemon
    derived, without a round trip; once the grace is over it re-reads the guest's values."""
    view = await rw.volume_view("vda")
    await rw.create(view, b"/grace", 0o644)
    await rw.write(view, b"/grace", 0, b"g" * 10000)
    await rw.flush(view, b"/grace")
    before = session.calls
    st = await rw.getattr(view, b"/grace")
    assert session.calls == before and await rw.stale(view, b"/grace")
    assert st.size == 10000 and st.blocks >= 20
    rw.stale_grace_s = 0.2
    try:
        await trio.sleep(0.25)
        again = await rw.getattr(view, b"/grace")
        assert session.calls == before + 1 and not await rw.stale(view, b"/grace")
    finally:
        rw.stale_grace_s = STALE_GRACE_S
    fresh = RwGuestTree(session, ino_salt=b"restore")
    theirs = await fresh.getattr(await fresh.volume_view("vda"), b"/grace")
    assert again == dataclasses.replace(theirs, atime_ns=again.atime_ns)
    assert (st.size, st.blocks, st.mode) == (theirs.size, theirs.blocks, theirs.mode)
    await rw.unlink(view, b"/grace")


async def test_deferred_changes_drain_and_survive_a_shutdown(
    rw: RwGuestTree, session: RwGuestSession
) -> None:
    """A chmod no later call carries is applied by ``drain`` (the pool's tick) or, at the
    latest, before the appliance shuts down (idle, LRU)."""
    view = await rw.volume_view("vda")
    await rw.create(view, b"/deferred-a", 0o644)
    await rw.create(view, b"/deferred-b", 0o644)
    await rw.chmod(view, b"/deferred-a", 0o600)
    assert session.deferred == 1
    await session.drain(older_than=60.0)  # too young: stays queued
    assert session.deferred == 1
    await session.drain()
    assert session.deferred == 0
    # The pool's tick (the mount runs AppliancePool.run) applies it within DRAIN_TICK_S.
    await rw.chmod(view, b"/deferred-a", 0o604)
    pool = AppliancePool(TCG)
    pool.register(session)
    try:
        with trio.move_on_after(3 * DRAIN_TICK_S + 0.2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run)
                while session.deferred:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert session.deferred == 0 and session.deferred_stats["drains"] >= 2
    finally:
        pool.unregister(session)
    await rw.chmod(view, b"/deferred-b", 0o640)
    assert session.deferred == 1
    await session.shutdown_appliance()
    assert session.deferred == 0 and not session.launched
    rw.forget()  # as the restore disk's after_shutdown does: the next launch is a new one
    fresh = RwGuestTree(session, ino_salt=b"restore")
    fview = await fresh.volume_view("vda")
    assert stat.S_IMODE((await fresh.getattr(fview, b"/deferred-a")).mode) == 0o604
    assert stat.S_IMODE((await fresh.getattr(fview, b"/deferred-b")).mode) == 0o640


async def test_failed_deferred_change_is_reported(
    rw: RwGuestTree, session: RwGuestSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A deferred change that fails in the appliance is logged, reported by the file's next
    flush, and what the cache derived from it is re-read."""
    # Earlier tests made second trees on this session: the last one made gets the reports.
    session.on_deferred_failed = rw._deferred_failed
    view = await rw.volume_view("vda")
    await rw.create(view, b"/deferred-c", 0o644)
    # Made immutable behind the cache's back: the deferred chmod, answered from the cache,
    # fails (EPERM) when applied.
    apath = f"/v/{view.mounts[0][1].index}/deferred-c"
    await session.call(lambda g, state: g.set_e2attrs(apath, "i"))
    try:
        st = await rw.chmod(view, b"/deferred-c", 0o600)
        assert stat.S_IMODE(st.mode) == 0o600 and session.deferred == 1
        await session.drain()
        assert "chmod 600 of vda:b'/deferred-c'" in caplog.text
        assert "failed in the appliance" in caplog.text
        # The cache was told: the entry is re-read from the guest.
        assert stat.S_IMODE((await rw.getattr(view, b"/deferred-c")).mode) == 0o644
        with pytest.raises(SnapfsError) as exc:
            await rw.flush(view, b"/deferred-c")
        assert exc.value.errno == errno.EPERM
        await rw.flush(view, b"/deferred-c")  # reported once
    finally:
        await session.call(lambda g, state: g.set_e2attrs(apath, "i", clear=True))
    await rw.unlink(view, b"/deferred-c")


async def test_cache_is_exact(rw: RwGuestTree, session: GuestSession) -> None:
    """Every cached listing equals a fresh one (a second tree on the same appliance)."""
    fresh = RwGuestTree(session, ino_salt=b"restore")
    for vname in ("vda", "vdb"):
        view = await rw.volume_view(vname)
        fview = await fresh.volume_view(vname)

        async def walk(path: bytes, view: View = view, fview: View = fview) -> None:
            mine = {e.name: e.stat for e in await rw.listdir(view, path)}
            theirs = {e.name: e.stat for e in await fresh.listdir(fview, path)}
            assert set(mine) == set(theirs), path
            for name, st in mine.items():
                other = theirs[name]
                # atime moves with reads through the appliance (relatime)
                assert st == other.__class__(**{**_fields(other), "atime_ns": st.atime_ns}), (
                    path, name)
                child = path.rstrip(b"/") + b"/" + name
                if st.is_link:
                    assert await rw.readlink(view, child) == await fresh.readlink(fview, child)
                assert await rw.listxattr(view, child) == await fresh.listxattr(fview, child)
                if st.is_dir:
                    await walk(child)

        await walk(b"/")


def _fields(st: object) -> dict[str, object]:
    return {name: getattr(st, name) for name in st.__dataclass_fields__}  # type: ignore[attr-defined]


async def test_close_then_image_holds_everything(
    rw: RwGuestTree, session: GuestSession, disks: Disks
) -> None:
    vda, _ = await _views(rw)
    await rw.create(vda, b"/last", 0o644)
    await rw.write(vda, b"/last", 0, b"written just before close\n")  # only buffered
    big = await rw.read(vda, b"/big", 0, 64)
    await rw.close()
    assert not session.launched
    with pytest.raises(SnapfsError):
        await rw.create(vda, b"/late", 0o644)
    disks.stop()
    overlay = disks.overlays["vda"]
    _run("qemu-img", "check", overlay)
    raw = disks.work / "check.raw"
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, raw)

    def debugfs(cmd: str) -> str:
        return _run("debugfs", "-R", cmd, raw)

    assert debugfs("cat /last") == "written just before close\n"
    assert debugfs("cat /r2/c") == "payload"
    assert debugfs("cat /dir/sub/deep") == "deep\n"
    assert "Type: symlink" in debugfs("stat /sl")
    assert "Links: 1" in debugfs("stat /two")
    m = debugfs("stat /m")
    # chown after chmod drops the setuid bit, as on any Linux filesystem
    assert "User:  1234" in m and "Group:    42" in m and "Mode:  0751" in m
    # nanoseconds: ext4 keeps them as nsec << 2 in the extra field
    assert f"mtime: 0x{1_400_000_000:08x}:{1 << 2:08x}" in m
    # the fs is clean (unmounted by close)
    assert "clean" in _run("dumpe2fs", "-h", raw).lower()
    raw_big = subprocess.run(["debugfs", "-R", "cat /big", str(raw)], check=True,
                             capture_output=True).stdout
    assert raw_big[:64] == big and len(raw_big) == 2 * WRITE_BEHIND + 5 * MiB
    _run("e2fsck", "-fn", raw)

