"""Every image format, broken repositories and dying servers, through a real mount."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from snapfs.catalog import writer
from snapfs.catalog.repo import load_repository
from tests import imaging
from tests.fusemount import kill_tree_check, mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


def disk_path(mount: Path, vm: str, snap: str, disk: str) -> Path:
    return mount / vm / "snapshots" / snap / "disks" / f"{disk}.img"


@pytest.fixture(scope="module")
def formats_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One VM per format; the qcow2 one has a three-deep incremental chain."""
    tmp = tmp_path_factory.mktemp("formats")
    repo = tmp / "repo"
    writer.init_repository(repo)
    src = imaging.random_raw(
        tmp / "src.raw", 24 * MiB, [(0, MiB), (7 * MiB, 2 * MiB), (20 * MiB, 64 * 1024)]
    )
    for fmt in ("raw", "vmdk", "vpc", "qcow2"):
        writer.add_snapshot(
            repo,
            f"vm-{fmt}",
            [writer.DiskSource("vda", src, "raw")],
            format=fmt,
            name="full",
            created=1_700_000_000,
        )
    step = src
    for i, writes in enumerate(
        [[(3 * MiB, 8192, 0x11)], [(7 * MiB, MiB, 0x22), (23 * MiB, 4096, 0x33)]]
    ):
        step = imaging.convert(step, tmp / f"step{i}.raw", "raw")
        for offset, length, pattern in writes:
            imaging.run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", step)
        writer.add_snapshot(
            repo,
            "vm-qcow2",
            [writer.DiskSource("vda", step, "raw")],
            incremental=True,
            name=f"inc{i}",
            created=1_700_000_100 + i,
        )
    return repo


def test_every_format_reads_like_qemu_img(formats_repo: Path, tmp_path: Path) -> None:
    catalog = load_repository(formats_repo)
    assert not catalog.problems
    seen_formats = set()
    with mounted(formats_repo, tmp_path / "m") as m:
        for vm in catalog.vms:
            for snap in vm.snapshots:
                for disk in snap.disks:
                    seen_formats.add(disk.format)
                    expect = imaging.to_raw(disk.path, tmp_path / "expect.raw")
                    got = disk_path(m.path, vm.name, snap.name, disk.name).read_bytes()
                    assert got == expect, (vm.name, snap.name, disk.format)
        # The incremental snapshots really are overlays (backing chain through the mount).
        inc = next(s for v in catalog.vms for s in v.snapshots if s.name == "inc1")
        assert inc.disks[0].backing is not None
    assert seen_formats == {"raw", "vmdk", "vpc", "qcow2"}


def test_holes_are_reported_and_read_as_zeros(formats_repo: Path, tmp_path: Path) -> None:
    with mounted(formats_repo, tmp_path / "m") as m:
        img = disk_path(m.path, "vm-qcow2", "full", "vda")
        st = img.stat()
        # 3 MiB + 64 KiB of data in a 24 MiB disk.
        assert 3 * MiB <= st.st_blocks * 512 <= 4 * MiB
        out = subprocess.run(["du", "-k", str(img)], capture_output=True, text=True).stdout
        assert int(out.split()[0]) == st.st_blocks // 2
        with open(img, "rb") as f:
            f.seek(12 * MiB)
            assert f.read(MiB) == bytes(MiB)
        # cp --sparse=always keeps the holes.
        copy = tmp_path / "copy.raw"
        subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
        assert copy.stat().st_blocks * 512 < 5 * MiB


@pytest.fixture
def broken_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    writer.init_repository(repo)
    src = imaging.random_raw(tmp_path / "src.raw", 4 * MiB, [(0, MiB)])
    for vm in ("good", "badvm", "badsnap", "baddisk"):
        writer.add_snapshot(
            repo, vm, [writer.DiskSource("vda", src, "raw")], name="s1", created=1_700_000_000
        )
    writer.add_snapshot(
        repo, "badsnap", [writer.DiskSource("vda", src, "raw")], name="s2", created=1_700_000_100
    )
    vms = repo / "vms"
    (vms / "badvm" / "vm.json").write_text("{ not json")
    snaps = sorted((vms / "badsnap" / "snapshots").iterdir())
    (snaps[1] / "snapshot.json").write_text('{"id": 5')
    image = next((vms / "baddisk" / "snapshots").glob("*/disks/*"))
    with open(image, "r+b") as f:
        f.write(b"QFI\xfb" + b"\xff" * 508)  # a qcow2 magic with a garbage header
    return repo


def test_broken_entries_fail_visibly_and_the_rest_works(broken_repo: Path, tmp_path: Path):
    with mounted(broken_repo, tmp_path / "m") as m:
        root = m.path
        assert sorted(os.listdir(root)) == ["baddisk", "badsnap", "badvm", "good", "restore"]
        assert disk_path(root, "good", "s1", "vda").read_bytes()[:MiB] != bytes(MiB)
        # A VM whose metadata is malformed: listing it fails, it is never empty.
        with pytest.raises(OSError) as info:
            os.listdir(root / "badvm")
        assert info.value.errno == errno.EIO
        # One bad snapshot does not hide the good one next to it.
        snaps = sorted(os.listdir(root / "badsnap" / "snapshots"))
        assert len(snaps) == 2
        good_snap = root / "badsnap" / "snapshots" / "s1"
        assert disk_path(root, "badsnap", "s1", "vda").stat().st_size == 4 * MiB
        bad_snap = next(p for p in (root / "badsnap" / "snapshots").iterdir() if p != good_snap)
        with pytest.raises(OSError) as info:
            os.listdir(bad_snap)
        assert info.value.errno == errno.EIO
        # A corrupt image is listed, and reading it is EIO.
        bad_img = disk_path(root, "baddisk", "s1", "vda")
        with pytest.raises(OSError) as info:
            bad_img.read_bytes()
        assert info.value.errno == errno.EIO
        log = m.log_text()
        assert "vm.json" in log and "snapshot.json" in log


def test_killed_server_gives_eio_then_recovers(formats_repo: Path, tmp_path: Path) -> None:
    with mounted(formats_repo, tmp_path / "m") as m:
        img = disk_path(m.path, "vm-qcow2", "inc1", "vda")
        other = disk_path(m.path, "vm-raw", "full", "vda")
        expect = imaging.to_raw(
            next(
                d.path
                for v in load_repository(formats_repo).vms
                for s in v.snapshots
                for d in s.disks
                if s.name == "inc1"
            ),
            tmp_path / "e.raw",
        )
        fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
        other_fd = -1
        try:
            # O_DIRECT bypasses the page cache (so each read reaches the server) and needs an
            # aligned buffer: an anonymous mmap is page-aligned.
            aligned = mmap.mmap(-1, MiB)
            assert os.preadv(fd, [aligned], 0) == MiB
            servers = m.server_pids()
            assert len(servers) == 1
            other_fd = os.open(other, os.O_RDONLY)
            other_head = os.pread(other_fd, 4096, 0)
            # Freeze the server so a read is in flight, then kill it under the read.
            os.kill(servers[0], signal.SIGSTOP)
            result: dict[str, object] = {}

            def doomed() -> None:
                try:
                    result["n"] = os.preadv(fd, [aligned], 7 * MiB)
                except OSError as exc:
                    result["err"] = exc.errno

            t = threading.Thread(target=doomed)
            t.start()
            time.sleep(0.5)
            os.kill(servers[0], signal.SIGKILL)
            t.join(30)
            assert result.get("err") == errno.EIO
            assert "failed" in m.log_text()
            # The next read reconnects to a new server.
            assert os.preadv(fd, [aligned], 7 * MiB) == MiB
            assert bytes(aligned) == expect[7 * MiB : 8 * MiB]
            # Other disks were never affected.
            assert os.pread(other_fd, 4096, 0) == other_head != bytes(4096)
        finally:
            os.close(fd)
            if other_fd >= 0:
                os.close(other_fd)


def _start_daemon(source: Path, mnt: Path) -> subprocess.Popen[bytes]:
    import sys

    from tests.fusemount import Mounted, wait_for_mount

    mnt.mkdir(exist_ok=True)
    log = open(mnt.parent / "daemon.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "mount", "-f", str(source), str(mnt)],
        stdout=log,
        stderr=log,
    )
    wait_for_mount(Mounted(mnt, proc, mnt.parent / "daemon.log"))
    return proc


@pytest.mark.parametrize("how", ["snapfs-umount", "fusermount", "SIGINT", "SIGTERM"])
def test_unmount_stops_everything(formats_repo: Path, tmp_path: Path, how: str) -> None:
    from snapfs.mountpoint import fstype_at, runtime_dir_for

    mnt = tmp_path / "m"
    proc = _start_daemon(formats_repo, mnt)
    try:
        for vm in ("vm-raw", "vm-vmdk", "vm-qcow2"):
            with open(disk_path(mnt, vm, "full", "vda"), "rb") as f:
                f.read(4096)
        servers = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "qemu-nbd"], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(servers) == 3
        assert runtime_dir_for(mnt).exists()
        if how == "snapfs-umount":
            import sys

            subprocess.run([sys.executable, "-m", "snapfs", "umount", str(mnt)], check=True)
            assert proc.poll() is not None  # umount waits for the daemon
        elif how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        else:
            proc.send_signal(getattr(signal, how))
        assert proc.wait(30) == 0
        assert fstype_at(mnt) is None
        assert kill_tree_check(servers) == []
        assert not runtime_dir_for(mnt).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_kill_9_takes_servers_along_and_stale_mount_is_handled(formats_repo: Path, tmp_path: Path):
    import sys

    from snapfs.mountpoint import fstype_at

    mnt = tmp_path / "m"
    proc = _start_daemon(formats_repo, mnt)
    try:
        with open(disk_path(mnt, "vm-raw", "full", "vda"), "rb") as f:
            f.read(4096)
        servers = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "qemu-nbd"], capture_output=True, text=True
            ).stdout.split()
        ]
        assert servers
        # The store process (snapfs.storeproc) holds the mount's /dev/fuse too: if it
        # outlived the daemon the connection would stay up and the mount would hang.
        helpers = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "snapfs.storeproc"],
                capture_output=True, text=True,
            ).stdout.split()
        ]  # fmt: skip
        assert helpers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while kill_tree_check(servers + helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kill_tree_check(servers) == [], "qemu-nbd outlived its daemon"
        assert kill_tree_check(helpers) == [], "the store process outlived its daemon"
        # The mountpoint is now dead: a new mount says so, and --force clears it.
        snapfs = [sys.executable, "-m", "snapfs"]
        res = subprocess.run(
            [*snapfs, "mount", str(formats_repo), str(mnt)], capture_output=True, text=True
        )
        assert res.returncode != 0 and "Transport endpoint is not connected" in res.stderr
        res = subprocess.run(
            [*snapfs, "mount", "--force", str(formats_repo), str(mnt)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert fstype_at(mnt) == "fuse.snapfs"
        # Mounting again on a live mount is refused.
        res = subprocess.run(
            [*snapfs, "mount", str(formats_repo), str(mnt)], capture_output=True, text=True
        )
        assert res.returncode != 0 and "already mounted" in res.stderr
        assert disk_path(mnt, "vm-raw", "full", "vda").stat().st_size == 24 * MiB
        subprocess.run([*snapfs, "umount", str(mnt)], check=True)
        assert fstype_at(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_bad_source_and_mountpoint_messages(tmp_path: Path) -> None:
    import sys

    snapfs = [sys.executable, "-m", "snapfs"]
    (tmp_path / "m").mkdir()
    res = subprocess.run(
        [*snapfs, "mount", str(tmp_path / "nope"), str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "no such file" in res.stderr
    res = subprocess.run(
        [*snapfs, "mount", str(tmp_path), str(tmp_path / "m")], capture_output=True, text=True
    )
    assert res.returncode != 0 and "not a snapfs repository" in res.stderr
    res = subprocess.run(
        [*snapfs, "mount", str(tmp_path), str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert res.returncode != 0 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_extent_maps_show_allocated_and_changed(formats_repo: Path, tmp_path: Path) -> None:
    with mounted(formats_repo, tmp_path / "m") as m:
        disks = m.path / "vm-qcow2" / "snapshots"
        full = json.loads((disks / "full" / "disks" / "vda.extents.json").read_text())
        inc0 = json.loads((disks / "inc0" / "disks" / "vda.extents.json").read_text())
        inc1 = json.loads((disks / "inc1" / "disks" / "vda.extents.json").read_text())
        assert full["parent"] is None and inc1["parent"] == inc0["snapshot"]
        # The full snapshot: its data is what it changed; 3 MiB + 64 KiB in three regions.
        assert full["allocated"] == full["changed"]
        assert full["allocated"] == [
            {"start": 0, "length": MiB},
            {"start": 7 * MiB, "length": 2 * MiB},
            {"start": 20 * MiB, "length": 64 * 1024},
        ]
        # inc0 wrote 8 KiB at 3 MiB: one 64 KiB cluster changed.
        assert inc0["changed"] == [{"start": 3 * MiB, "length": 64 * 1024}]
        # inc1 wrote 1 MiB at 7 MiB and 4 KiB at 23 MiB (a cluster), nothing else.
        assert inc1["changed"] == [
            {"start": 7 * MiB, "length": MiB},
            {"start": 23 * MiB, "length": 64 * 1024},
        ]
        assert inc1["changed_bytes"] == MiB + 64 * 1024
        img = disks / "inc1" / "disks" / "vda.img"
        assert inc1["allocated_bytes"] == img.stat().st_blocks * 512
        # Reading the changed extents of inc1 from the mount gives the new bytes.
        with open(img, "rb") as f:
            f.seek(7 * MiB)
            assert f.read(MiB) == bytes([0x22]) * MiB


def test_umount_of_a_busy_mount_says_why_and_lazy_detaches(
    formats_repo: Path, tmp_path: Path
) -> None:
    """A file open under the mount: `snapfs umount` refuses with what to do, the mount stays
    up and readable; `--lazy` detaches it, and the daemon ends when the file is closed."""
    import sys

    from snapfs.mountpoint import fstype_at, runtime_dir_for

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _start_daemon(formats_repo, mnt)
    snapfs = [sys.executable, "-m", "snapfs"]
    try:
        f = open(disk_path(mnt, "vm-raw", "full", "vda"), "rb")
        res = subprocess.run([*snapfs, "umount", str(mnt)], capture_output=True, text=True)
        assert res.returncode != 0
        assert "busy" in res.stderr and f"fuser -vm {mnt}" in res.stderr, res.stderr
        assert "--lazy" in res.stderr
        assert fstype_at(mnt) == "fuse.snapfs" and len(f.read(4096)) == 4096
        res = subprocess.run(
            [*snapfs, "umount", "--lazy", str(mnt)], capture_output=True, text=True
        )
        assert fstype_at(mnt) is None  # detached at once
        assert len(f.read(4096)) == 4096  # the open file still reads
        f.close()
        assert proc.wait(30) == 0
        assert not runtime_dir_for(mnt).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
