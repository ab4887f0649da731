"""The read-only backup tree through a real FUSE mount and real qemu-nbd servers."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from snapfs.catalog.repo import load_repository
from snapfs.sample import SampleRepository
from tests import imaging
from tests.fusemount import Mounted, mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.fixture(scope="module")
def sample_mount(
    sample_repo: SampleRepository, tmp_path_factory: pytest.TempPathFactory
) -> Mounted:
    with mounted(sample_repo.path, tmp_path_factory.mktemp("mnt") / "m") as m:
        yield m


def snapshot_dirs(mount: Path, vm: str) -> list[Path]:
    return sorted((mount / vm / "snapshots").iterdir())


def test_tree_layout_and_metadata(sample_repo: SampleRepository, sample_mount: Mounted) -> None:
    root = sample_mount.path
    catalog = load_repository(sample_repo.path)
    assert sorted(os.listdir(root)) == sorted([*(vm.name for vm in catalog.vms), "restore"])
    for vm in catalog.vms:
        vm_dir = root / vm.name
        assert sorted(os.listdir(vm_dir)) == ["latest", "snapshots", "vm.json"]
        snaps = sorted(vm.snapshots, key=lambda s: s.created)
        assert [p.name for p in snapshot_dirs(root, vm.name)] == sorted(s.name for s in snaps)
        newest = snaps[-1]
        assert os.readlink(vm_dir / "latest") == f"snapshots/{newest.name}"
        assert (vm_dir / "latest" / "snapshot.json").exists()
        for snap in snaps:
            sdir = vm_dir / "snapshots" / snap.name
            meta = json.loads((sdir / "snapshot.json").read_text())
            assert meta["id"] == snap.id and meta["parent"] == snap.parent
            assert [d["name"] for d in meta["disks"]] == [d.name for d in snap.disks]
            for cfg in snap.config_files:
                assert (sdir / cfg.name).read_bytes() == cfg.read_bytes()
            st = os.stat(sdir)
            assert st.st_mtime == pytest.approx(snap.created, abs=1)
            for disk in snap.disks:
                img = sdir / "disks" / f"{disk.name}.img"
                st = os.stat(img)
                assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o222 == 0
                assert st.st_size == disk.virtual_size
                # st_blocks tells du and cp --sparse what is allocated through the chain.
                assert st.st_blocks * 512 == pytest.approx(disk.allocated, abs=511)
                assert st.st_blocks * 512 < st.st_size
                assert st.st_mtime == pytest.approx(snap.created, abs=1)


def test_every_disk_reads_like_qemu_img(
    sample_repo: SampleRepository, sample_mount: Mounted, tmp_path: Path
) -> None:
    catalog = load_repository(sample_repo.path)
    checked = 0
    for vm in catalog.vms:
        for snap in vm.snapshots:
            for disk in snap.disks:
                expect = imaging.to_raw(disk.path, tmp_path / "expect.raw")
                got = (
                    sample_mount.path
                    / vm.name
                    / "snapshots"
                    / snap.name
                    / "disks"
                    / f"{disk.name}.img"
                ).read_bytes()
                assert got == expect, (vm.name, snap.name, disk.name)
                checked += 1
    assert checked == 9


def test_guest_files_visible_in_raw_disk(sample_repo: SampleRepository, sample_mount: Mounted):
    """The sample's ext4 partitions, read through the mount, hold the expected files."""
    from snapfs.sample import read_guest_file

    (vm, snap, disk), files = next(iter(sample_repo.expected.items()))
    img = sample_mount.path / vm / "snapshots" / snap / "disks" / f"{disk}.img"
    for path, content in list(files.items())[:3]:
        if content is not None:
            assert read_guest_file(img, path) == content


def test_writes_are_refused_with_erofs(sample_mount: Mounted) -> None:
    root = sample_mount.path
    snap = snapshot_dirs(root, "web-01")[0]
    img = snap / "disks" / "vda.img"
    attempts = [
        lambda: open(img, "r+b"),
        lambda: open(snap / "snapshot.json", "w"),
        lambda: open(snap / "new-file", "w"),
        lambda: os.mkdir(snap / "d"),
        lambda: os.unlink(img),
        lambda: os.rename(img, snap / "x.img"),
        lambda: os.chmod(img, 0o644),
        lambda: os.symlink("x", snap / "l"),
        lambda: os.truncate(img, 0),
        lambda: os.setxattr(img, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert img.stat().st_mode & 0o222 == 0


def test_concurrent_readers(sample_repo: SampleRepository, sample_mount: Mounted, tmp_path: Path):
    catalog = load_repository(sample_repo.path)
    vm = next(v for v in catalog.vms if v.name == "web-01")
    targets = []
    for snap in vm.snapshots:
        for disk in snap.disks:
            raw = imaging.to_raw(disk.path, tmp_path / f"{snap.id}-{disk.name}.raw")
            path = (
                sample_mount.path / vm.name / "snapshots" / snap.name / "disks" / f"{disk.name}.img"
            )
            targets.append((path, raw))
    errors: list[str] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(40):
            path, raw = rnd.choice(targets)
            size = rnd.choice([512, 4096, 65536, 1 << 20])
            off = rnd.randrange(0, len(raw) - size)
            # O_DIRECT-free, but a fresh fd each time; the page cache may answer, that is fine.
            with open(path, "rb") as f:
                f.seek(off)
                if f.read(size) != raw[off : off + size]:
                    errors.append(f"{path} {off} {size}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_page_cache_kept_across_opens(sample_mount: Mounted) -> None:
    img = snapshot_dirs(sample_mount.path, "db-01")[0] / "disks" / "vda.img"
    size = img.stat().st_size
    img.read_bytes()

    def cached_bytes() -> int:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(img)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0])

    # Snapshot data is immutable: a new open must not drop what the last one cached.
    with open(img, "rb") as f:
        f.read(1)
    assert cached_bytes() == size


def test_inodes_stable_across_remount(sample_repo: SampleRepository, tmp_path: Path) -> None:
    def inodes(root: Path) -> dict[str, int]:
        result = {}
        for dirpath, dirnames, filenames in os.walk(root):
            # Guest filesystems have their own test (and would launch an appliance each).
            dirnames[:] = [d for d in dirnames if d not in ("files", "volumes")]
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                result[str(p.relative_to(root))] = os.lstat(p).st_ino
        return result

    with mounted(sample_repo.path, tmp_path / "a") as m:
        first = inodes(m.path)
    with mounted(sample_repo.path, tmp_path / "a") as m:
        second = inodes(m.path)
    assert first == second
    assert len(set(first.values())) == len(first)


def test_idle_server_stops_and_restarts(sample_repo: SampleRepository, tmp_path: Path) -> None:
    import time

    config = tmp_path / "config.toml"
    config.write_text("[nbd]\nidle_timeout = 1\n")
    with mounted(sample_repo.path, tmp_path / "m", "--config", str(config)) as m:
        img = snapshot_dirs(m.path, "db-01")[1] / "disks" / "vda.img"
        with open(img, "rb") as f:
            head = f.read(4096)
            assert len(m.server_pids()) == 1
            time.sleep(2.5)
            assert len(m.server_pids()) == 1, "a server with an open file must stay up"
        deadline = time.monotonic() + 15
        while m.server_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m.server_pids() == []
        assert "stopping idle server" in m.log_text()
        # Reading again (past the page cache) starts it again.
        fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [buf], 0) == 4096
            assert bytes(buf) == head
            assert len(m.server_pids()) == 1
        finally:
            os.close(fd)
