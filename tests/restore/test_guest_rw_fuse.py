"""The single-file restore flow through a real FUSE mount (in-process pyfuse3): ``cp -a`` and
``rsync -a`` of a tree into ``restore/<name>/files/``, the disk.img guard, then unmount and
the image checked by debugfs. Until the lead wires ``add_guest_dirs`` into mount.py, the
tree here is assembled by hand (a RestoreDir under a static directory).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from snapfs.fuse_ops import Operations
from snapfs.guestfs import GuestfsSettings
from snapfs.mount import fuse_options
from snapfs.nbd.export import ExportManager
from snapfs.restore.model import RestoreDisk
from snapfs.restore_guest_vfs import GUEST_TTL_S, RestoreGuests
from snapfs.restore_tree import RestoreDir
from snapfs.vfs import ROOT_INODE, Dir, Tree
from tests.fusemount import needs_fuse

pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.fuse, needs_fuse]

MiB = 1 << 20


def _run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True)


def _source_tree(root: Path) -> None:
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "app" / "app.conf").write_text("key = value\n")
    (root / "data.bin").write_bytes(os.urandom(5 * MiB + 17))
    (root / "empty").write_bytes(b"")
    os.symlink("etc/app/app.conf", root / "conf-link")
    os.link(root / "empty", root / "empty-hard")
    os.chown(root / "etc" / "app" / "app.conf", 1234, 4321)
    os.chmod(root / "etc" / "app" / "app.conf", 0o640)
    os.setxattr(root / "data.bin", "user.origin", b"backup")
    os.utime(root / "data.bin", ns=(1_600_000_000_111_111_111, 1_500_000_000_222_222_222))


def _setattr_then_stat(files: Path) -> os.stat_result:
    """chmod, utime and rename make no lstat in the appliance (the tree derives the result,
    and the changes ride on later calls); stat right after shows the derived mode and times
    (the kernel caches them for GUEST_TTL_S), and once that has passed, the guest's own,
    ctime included (pauses make each change's ctime differ), checked against debugfs after
    the unmount."""
    path = files / ".st.XXXX"
    path.write_bytes(b"x")
    time.sleep(0.05)
    os.chmod(path, 0o600)
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    time.sleep(0.05)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    time.sleep(0.05)
    os.chmod(path, 0o640)
    after_chmod = os.lstat(path)
    assert after_chmod.st_ctime_ns > st.st_ctime_ns
    os.rename(path, files / "st")
    derived = os.lstat(files / "st")
    assert stat.S_IMODE(derived.st_mode) == 0o640
    assert derived.st_mtime_ns == 1_500_000_000_000_000_000
    time.sleep(GUEST_TTL_S + 0.2)
    return os.lstat(files / "st")


def _scenario(src: Path, mnt: Path) -> os.stat_result:
    files = mnt / "r1" / "files"
    # listing the restore disk launches nothing; files/ does
    assert sorted(os.listdir(mnt / "r1")) == ["disk.img", "files", "restore.json",
                                               "volumes"]
    _run("cp", "-a", src, files / "cp")
    _run("rsync", "-aHX", f"{src}/", files / "rs")
    for copy in ("cp", "rs"):
        out = _run("diff", "-r", "--no-dereference", src, files / copy, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        for rel in ("etc/app/app.conf", "data.bin", "conf-link", "etc"):
            a, b = os.lstat(src / rel), os.lstat(files / copy / rel)
            assert (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid), rel
            if not stat.S_ISDIR(a.st_mode):
                assert a.st_mtime_ns == b.st_mtime_ns, (copy, rel)
        assert os.getxattr(files / copy / "data.bin", "user.origin") == b"backup"
    st = os.stat(files / "rs" / "empty")
    assert st.st_nlink == 2 and st.st_ino == os.stat(files / "rs" / "empty-hard").st_ino
    # the guard: disk.img is read-only while the appliance has the disk mounted
    with pytest.raises(OSError) as exc:
        open(mnt / "r1" / "disk.img", "r+b")
    assert exc.value.errno == errno.EBUSY
    # editing in place, truncation, removal, rename
    target = files / "cp" / "etc" / "app" / "app.conf"
    target.write_text("key = restored\n")
    assert target.read_text() == "key = restored\n"
    _run("mv", files / "cp" / "empty", files / "cp" / "etc" / "moved")
    _run("rm", "-r", files / "rs" / "etc")
    assert sorted(os.listdir(files / "rs")) == [
        "conf-link", "data.bin", "empty", "empty-hard"]
    return _setattr_then_stat(files)


async def test_cp_and_rsync_into_files(tmp_path: Path) -> None:
    for tool in ("mkfs.ext4", "qemu-img", "debugfs", "rsync"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    src = tmp_path / "src"
    _source_tree(src)
    raw = tmp_path / "fs.raw"
    raw.touch()
    os.truncate(raw, 64 * MiB)
    _run("mkfs.ext4", "-q", "-F", raw)
    image = tmp_path / "disk.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    raw.unlink()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir()
    restore = RestoreDisk("r1", image, 64 * MiB, time.time())

    async with trio.open_nursery() as nursery:
        exports = ExportManager(runtime, nursery)
        tree = Tree(exports, uid=0, gid=0)
        root = Dir(tree, ROOT_INODE, b"", None, static=True)
        restore_dir = RestoreDir(tree, root, b"r1", restore)  # type: ignore[arg-type]
        root.add(restore_dir)
        guests = RestoreGuests(None, GuestfsSettings(backend="tcg"))
        guests.add(tree, restore_dir)
        pyfuse3.init(Operations(tree), str(mnt), fuse_options("test", allow_other=False,
                                                              debug=False))
        main_done = trio.Event()

        async def serve() -> None:
            try:
                await pyfuse3.main()
            finally:
                main_done.set()

        try:
            nursery.start_soon(serve)
            # Everything touching the mount runs in a worker thread: the loop serves FUSE.
            seen = await trio.to_thread.run_sync(_scenario, src, mnt)
        finally:
            with trio.CancelScope(shield=True):
                pyfuse3.terminate()
                await main_done.wait()
                pyfuse3.close(unmount=True)
                await guests.aclose()
                await exports.stop_all()
            nursery.cancel_scope.cancel()  # the exports' connection drivers

    _run("qemu-img", "check", image)
    check = tmp_path / "check.raw"
    _run("qemu-img", "convert", "-O", "raw", image, check)
    _run("e2fsck", "-fn", check)
    cat = subprocess.run(["debugfs", "-R", "cat /cp/data.bin", str(check)], check=True,
                         capture_output=True).stdout
    assert cat == (src / "data.bin").read_bytes()
    assert _run("debugfs", "-R", "cat /cp/etc/app/app.conf", check).stdout == "key = restored\n"
    assert "Type: regular" in _run("debugfs", "-R", "stat /cp/etc/moved", check).stdout
    guest = _run("debugfs", "-R", "stat /st", check).stdout
    assert "Mode:  0640" in guest and "mtime: 0x59682f00" in guest, guest
    ctime = re.search(r"ctime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", guest)
    assert ctime is not None, guest
    extra_ns = int(ctime[2], 16) >> 2 if ctime[2] else 0  # nsec << 2 (256-byte inodes)
    assert seen.st_ctime_ns == int(ctime[1], 16) * 1_000_000_000 + extra_ns
    assert stat.S_IMODE(seen.st_mode) == 0o640 and seen.st_mtime_ns == 1_500_000_000 * 10**9
