"""Guest files through a real mount: rsync -aHAX of files/ reproduces the source tree.

One TCG appliance per mount (about 20-40 s here); the images are built without one.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from snapfs.catalog import writer
from tests.fusemount import kill_tree_check, mounted, needs_fuse
from tests.guestfs.conftest import MiB, _gpt, _make_tree, _run

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.guestfs, pytest.mark.slow]

BIG = 100 * MiB


def _whole_second_times(root: Path) -> None:
    """mkfs.ext4 -d keeps whole seconds only: make the source compare equal at that grain."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            os.utime(
                p,
                ns=(st.st_atime_ns // 10**9 * 10**9, st.st_mtime_ns // 10**9 * 10**9),
                follow_symlinks=False,
            )
    st = os.lstat(root)
    os.utime(root, ns=(st.st_atime_ns // 10**9 * 10**9, st.st_mtime_ns // 10**9 * 10**9))


@pytest.fixture(scope="module")
def guest_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build_repo(tmp_path_factory.mktemp("guestrepo"))


@pytest.fixture(scope="module")
def inline_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Like guest_repo, on ext4 with inline_data: files of up to 60 bytes live in their inode
    (FIEMAP: not mappable), so only the appliance can read them. (mkfs.ext4 -d with
    inline_data drops a sparse file's trailing hole, so that file is left out here.)"""
    return _build_repo(tmp_path_factory.mktemp("inlinerepo"), ("-O", "inline_data"), ("sparse",))


def _build_repo(
    work: Path, mkfs_options: tuple[str, ...] = (), leave_out: tuple[str, ...] = ()
) -> tuple[Path, Path, Path]:
    tree = work / "tree"
    _make_tree(tree)
    for name in leave_out:
        (tree / name).unlink()
    with open(tree / "big100", "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    (tree / "dir" / "deep" / "deeper").mkdir(parents=True)
    for i in range(200):
        (tree / "dir" / "deep" / f"f{i:03}").write_bytes(os.urandom(i * 37))
    _whole_second_times(tree)
    part = work / "p1.ext4"
    part.touch()
    os.truncate(part, 256 * MiB)
    _run("mkfs.ext4", "-q", "-F", "-b", "4096", *mkfs_options, "-d", tree, part)
    disk = work / "vda.raw"
    _gpt(disk, 300 * MiB, [(part, 1)])
    repo = work / "repo"
    writer.init_repository(repo)
    writer.add_snapshot(repo, "guest", [writer.DiskSource("vda", disk, "raw")], name="s1")
    config = work / "tcg.toml"
    config.write_text('[guestfs]\nbackend = "tcg"\n')
    return repo, tree, config


def orphan_appliances() -> list[str]:
    """Appliance qemus of snapfs whose daemon is gone (re-parented to init)."""
    out = subprocess.run(["ps", "-eo", "ppid,args"], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if "qemu-system" in line and "snapfs-gfs-" in line and line.split()[0] == "1"
    ]


def test_rsync_of_files_reproduces_the_source(guest_repo, tmp_path: Path) -> None:
    repo, tree, config = guest_repo
    out = tmp_path / "out"
    with mounted(repo, tmp_path / "m", "--config", str(config)) as m:
        files = m.path / "guest" / "latest" / "files"
        # Listing the snapshot launches nothing; files/ launches the appliance.
        assert sorted(os.listdir(m.path / "guest" / "latest")) == [
            "disks",
            "files",
            "snapshot.json",
            "volumes",
        ]
        assert "launching appliance" not in m.log_text()
        res = subprocess.run(
            ["rsync", "-aHAX", "--numeric-ids", "--exclude=/lost+found", f"{files}/", f"{out}/"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        # cp of one file equals the original (the big one goes the extent-mapped NBD way).
        started = time.monotonic()
        subprocess.run(["cp", str(files / "big100"), str(tmp_path / "big")], check=True)
        elapsed = time.monotonic() - started
        assert (tmp_path / "big").read_bytes() == (tree / "big100").read_bytes()
        print(f"cp of 100 MiB from files/: {elapsed:.2f} s")
        assert sorted(os.listdir(m.path / "guest" / "latest" / "volumes")) == ["vda1"]
        assert (m.path / "guest" / "latest" / "volumes" / "vda1" / "a.txt").read_bytes() == (
            b"hello\n"
        )
        st_files = os.lstat(files / "hard")
        assert st_files.st_ino == os.lstat(files / "a.txt").st_ino  # hard links share
        assert st_files.st_nlink == 3
        # Read-only.
        with pytest.raises(OSError):
            (files / "new").write_text("x")
    diff = subprocess.run(
        [
            "rsync",
            "-aHAXn",
            "--numeric-ids",
            "--checksum",
            "-i",
            "--exclude=/lost+found",
            f"{tree}/",
            f"{out}/",
        ],
        capture_output=True,
        text=True,
    )
    assert diff.returncode == 0, diff.stderr
    changes = [line for line in diff.stdout.splitlines() if line.strip()]
    # The top directory's own times differ (mkfs created lost+found in it); nothing else.
    assert [c for c in changes if not c.endswith(" ./")] == [], changes
    assert orphan_appliances() == []


def _appliances_of(pid: int) -> list[int]:
    """Appliance qemu processes that are children of ``pid``."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "qemu-system"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def test_idle_appliance_stops_and_kill_9_takes_it_along(inline_repo, tmp_path: Path) -> None:
    from tests.fusemount import start_mount, stop_mount

    repo, _tree, _config = inline_repo
    config = tmp_path / "idle.toml"
    config.write_text('[guestfs]\nbackend = "tcg"\nidle_timeout_s = 2\n[nbd]\nidle_timeout = 1\n')
    m = start_mount(repo, tmp_path / "m", "--config", str(config))
    try:
        files = m.path / "guest" / "latest" / "files"
        assert (files / "a.txt").read_bytes() == b"hello\n"
        appliances = _appliances_of(m.proc.pid)
        assert len(appliances) == 1
        # Idle: the appliance stops, then the NBD servers it held.
        deadline = time.monotonic() + 60
        while kill_tree_check(appliances) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kill_tree_check(appliances) == [], "idle appliance was not shut down"
        deadline = time.monotonic() + 30
        while m.server_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert m.server_pids() == []
        # Cached listings need no appliance, nor does data mapped straight to NBD; a file
        # only the appliance can read (13 bytes: inline data, no extents) relaunches it.
        assert "a.txt" in os.listdir(files)
        assert len(os.listdir(files / "dir" / "deep")) == 201
        assert (files / "small").read_bytes() == (_tree / "small").read_bytes()
        assert kill_tree_check(_appliances_of(m.proc.pid)) == []
        assert (files / "new\nline").read_bytes() == b"newline name\n"
        appliances = _appliances_of(m.proc.pid)
        assert len(appliances) == 1
        servers = m.server_pids()
        m.proc.kill()
        m.proc.wait()
        deadline = time.monotonic() + 30
        while (
            kill_tree_check(appliances) or kill_tree_check(servers)
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kill_tree_check(appliances) == [], "appliance outlived its killed daemon"
        assert kill_tree_check(servers) == [], "qemu-nbd outlived its killed daemon"
    finally:
        stop_mount(m)
