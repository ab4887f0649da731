"""The guest walker (snapfs/guestfs/walk.c) run on a host directory: its records must equal
what the host's own lstat/readlink/getxattr and filefrag say. No appliance (the same binary
runs in the appliance in tests/guestfs/test_tree.py and tests/integration)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from snapfs.guestfs import extents as ext
from snapfs.guestfs import walker

ODD = b"new\nline \xff\xfe 'q\" $x"


@pytest.fixture(scope="module")
def binary() -> Path:
    found = walker.walker_binary()
    if found is None:
        pytest.skip("no C compiler on this machine: the walker cannot be built")
    return found


def _tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"hello\n")
    (root / "big").write_bytes(os.urandom(3 << 20))
    with open(root / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    (root / "empty").touch()
    os.link(root / "d" / "f.txt", root / "hard")
    os.symlink("d/f.txt", root / "link")
    os.symlink(ODD, os.fsencode(root) + b"/" + ODD + b".lnk")
    (Path(os.fsdecode(os.fsencode(root) + b"/" + ODD))).write_bytes(b"odd")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "d" / "f.txt", "user.color", b"blue\x00\xff")
    os.setxattr(root / "d", "user.dir", b"")
    os.utime(root / "empty", ns=(-1_500_000_000, 1_234_567_890_123_456_789))


def test_walk_matches_host(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    # Before the walk: its readlink updates a symlink's atime.
    host = {p: os.lstat(p) for p, _, _ in os.walk(os.fsencode(root))}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            host[path] = os.lstat(path)
    out = subprocess.run(
        [str(binary), str(root), "1000", str(walker.WANT_EXTENTS | walker.WANT_XATTRS)],
        capture_output=True,
        check=True,
    ).stdout
    entries = walker.parse_walk(out)
    assert entries[0].path == b"."
    seen = {e.path: e for e in entries[1:]}
    expected = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            expected.add(b"./" + os.path.relpath(os.path.join(dirpath, name), os.fsencode(root)))
    assert set(seen) == expected
    for rel, e in seen.items():
        path = os.fsencode(root) + rel[1:]
        st = host[path]
        f = e.fields
        assert (f["mode"], f["ino"], f["nlink"], f["size"]) == (
            st.st_mode, st.st_ino, st.st_nlink, st.st_size), rel
        assert (f["uid"], f["gid"], f["blocks"]) == (st.st_uid, st.st_gid, st.st_blocks), rel
        assert (f["atime_ns"], f["mtime_ns"], f["ctime_ns"]) == (
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns), rel
        if stat.S_ISLNK(st.st_mode):
            assert e.link == os.readlink(path), rel
        else:
            assert e.link is None
        host_x = {n.encode(): os.getxattr(path, n, follow_symlinks=False)
                  for n in os.listxattr(path, follow_symlinks=False)}
        assert e.xattrs == host_x, rel
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            assert e.mapped, rel
            # The same extents as filefrag -e -b1 reports (FIEMAP through another tool).
            ff = subprocess.run(["filefrag", "-e", "-b1", path], capture_output=True, check=True)
            lines = ff.stdout.split(b"\n")
            assert e.extents == ext._parse_extent_lines(lines), rel
        else:
            assert not e.mapped, rel
    assert seen[b"./d/f.txt"].xattrs == {b"user.color": b"blue\x00\xff"}
    assert seen[b"./empty"].fields["atime_ns"] == -1_500_000_000
    assert seen[b"./hard"].fields["ino"] == seen[b"./d/f.txt"].fields["ino"]


def test_walk_limit_and_flags(tmp_path: Path, binary: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    over = subprocess.run([str(binary), str(root), "3", "3"], capture_output=True, check=False)
    assert over.returncode == 4
    run = subprocess.run([str(binary), str(root), "1000", "0"], capture_output=True, check=True)
    plain = walker.parse_walk(run.stdout)
    assert all(not e.mapped and not e.xattrs for e in plain)
    missing = subprocess.run([str(binary), str(tmp_path / "nope"), "9", "0"], capture_output=True)
    assert missing.returncode == 3


def test_parse_walk_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        walker.parse_walk(b"S\0./a\0")  # truncated
    with pytest.raises(ValueError):
        walker.parse_walk(b"L\0x\0")  # a link before any entry
    with pytest.raises(ValueError):
        walker.parse_walk(b"S\0.\0" + b"41ed 2 2 0 0 0 0 512 0 0 1.0 1.0 1.0\0Q\0x\0")
    # Unmappable flags (inline data) and overlaps make a file unmappable, unwritten is kept.
    assert walker.parse_fiemap(b"1 0 100 4096 201") is None
    assert walker.parse_fiemap(b"2 0 100 8192 0 4096 900 4096 1") is None
    got = walker.parse_fiemap(b"2 4096 900 4096 801 0 100 4096 1000")
    assert got is not None and [x.logical for x in got] == [0, 4096] and got[1].unwritten
    assert ext.FASTPATH_FSTYPES  # the walker asks for extents only on these
