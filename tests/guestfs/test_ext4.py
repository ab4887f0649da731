"""Host-side ext4 extent maps (snapfs/guestfs/ext4.py) on real images made by mkfs.ext4 -d.

Every file's bytes are rebuilt from the image with the parsed extents and compared with the
source file; debugfs (e2fsprogs, reading the image without mounting it) is the second
opinion on the extents themselves. No appliance.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from snapfs.guestfs import ext4
from snapfs.guestfs.model import Extent

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
    reason="e2fsprogs (mkfs.ext4, debugfs) not installed",
)


def _source(root: Path) -> dict[str, bytes]:
    """Files of several shapes: tiny, multi-block, holes, and many islands (an extent tree
    deeper than the four extents an inode holds)."""
    root.mkdir()
    files: dict[str, bytes] = {
        "tiny": b"x",
        "small": os.urandom(3000),
        "multi": os.urandom(5 * MiB + 123),
    }
    sparse = bytearray(9 * MiB)
    sparse[:5000] = b"S" * 5000
    sparse[5 * MiB : 5 * MiB + 70000] = b"T" * 70000
    files["sparse"] = bytes(sparse)
    islands = bytearray(40 * 65536)
    for i in range(40):
        islands[i * 65536 : i * 65536 + 4096] = os.urandom(4096)
    files["islands"] = bytes(islands)
    for name, data in files.items():
        with open(root / name, "wb") as f:
            if name in ("sparse", "islands"):
                # written with holes, so mkfs.ext4 -d keeps them sparse
                for start in range(0, len(data), 4096):
                    block = data[start : start + 4096]
                    if block.strip(b"\0"):
                        f.seek(start)
                        f.write(block)
                f.truncate(len(data))
            else:
                f.write(data)
    (root / "sub").mkdir()
    files["sub/inner"] = os.urandom(70000)
    (root / "sub" / "inner").write_bytes(files["sub/inner"])
    return files


def _mkfs(image: Path, src: Path, *options: str) -> None:
    image.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", *options, "-d", str(src), str(image)],
        check=True,
        capture_output=True,
    )


def _debugfs(image: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(image)], check=True, capture_output=True, text=True
    )
    return out.stdout


def _inode(image: Path, name: str) -> int:
    m = re.search(r"Inode: (\d+)", _debugfs(image, f'stat "/{name}"'))
    assert m, name
    return int(m.group(1))


def _reader(image: Path) -> ext4.VolumeReader:
    async def read(offset: int, length: int) -> bytes:
        with open(image, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


def _rebuild(image: Path, extents: list[Extent], size: int) -> bytes:
    out = bytearray(size)
    with open(image, "rb") as f:
        for e in extents:
            if e.unwritten or e.logical >= size:
                continue
            f.seek(e.physical)
            n = min(e.length, size - e.logical)
            out[e.logical : e.logical + n] = f.read(n)
    return bytes(out)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("ext4src") / "root"
    return root, _source(root)


@pytest.mark.parametrize(
    "options",
    [
        ["-b", "4096"],
        ["-b", "1024"],  # first data block 1: descriptors at block 2
        ["-b", "4096", "-O", "64bit"],  # 64-byte group descriptors
        ["-b", "4096", "-N", "20000", "-g", "8192"],  # many groups, inodes in later groups
    ],
    ids=["4k", "1k", "64bit", "groups"],
)
def test_extents_rebuild_every_file(
    tmp_path: Path, src: tuple[Path, dict[str, bytes]], options: list[str]
) -> None:
    root, files = src
    image = tmp_path / "fs.img"
    _mkfs(image, root, *options)
    inodes = {name: _inode(image, name) for name in files}
    read = _reader(image)

    async def main() -> dict[int, list[Extent] | None]:
        layout = await ext4.read_layout(read)
        return await ext4.file_extents(
            layout, read, [(inodes[n], len(d)) for n, d in files.items()]
        )

    found = trio.run(main)
    for name, data in files.items():
        extents = found[inodes[name]]
        assert extents is not None, name
        assert _rebuild(image, extents, len(data)) == data, name
    # The islands file needs an extent tree below the inode (over four extents).
    # (40 or more: an island may be split where a block group ends)
    assert len(found[inodes["islands"]] or []) >= 40
    # debugfs's "Level" column: "0/ 1" is the root of a tree one level deep
    assert re.search(r"^\s*0/\s*[1-9]", _debugfs(image, 'ex "/islands"'), re.M)
    # debugfs agrees on where every extent of the multi-block file lives.
    rows = re.findall(
        r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+) -\s+\d+\s+(\d+) -\s+\d+\s+(\d+)",
        _debugfs(image, 'ex "/multi"'),
        re.M,
    )
    block = 1024 if "1024" in options else 4096
    assert rows
    assert [(e.logical, e.physical, e.length) for e in found[inodes["multi"]] or []] == [
        (int(lo) * block, int(ph) * block, int(n) * block) for lo, ph, n in rows
    ]


def test_size_or_type_mismatch_is_unmappable(
    tmp_path: Path, src: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = src
    image = tmp_path / "fs.img"
    _mkfs(image, root)
    read = _reader(image)
    small, sub = _inode(image, "small"), _inode(image, "sub")

    async def main() -> dict[int, list[Extent] | None]:
        layout = await ext4.read_layout(read)
        return await ext4.file_extents(
            layout, read, [(small, len(files["small"]) + 1), (sub, 4096), (999999, 10)]
        )

    assert trio.run(main) == {small: None, sub: None, 999999: None}


def test_inline_data_files_are_unmappable(
    tmp_path: Path, src: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = src
    image = tmp_path / "fs.img"
    _mkfs(image, root, "-O", "inline_data")
    read = _reader(image)
    tiny, multi = _inode(image, "tiny"), _inode(image, "multi")

    async def main() -> dict[int, list[Extent] | None]:
        layout = await ext4.read_layout(read)
        return await ext4.file_extents(
            layout, read, [(tiny, 1), (multi, len(files["multi"]))]
        )

    found = trio.run(main)
    assert found[tiny] is None  # its byte lives in the inode
    assert found[multi] is not None


@pytest.mark.parametrize(
    ("mkfs_options", "debugfs_request", "reason"),
    [
        (["-t", "ext3"], None, "no extents feature"),
        (["-O", "^has_journal"], "feature needs_recovery", "journal needs recovery"),
        ([], "ssv last_orphan 12", "orphan"),
        (["-O", "bigalloc", "-C", "16384"], None, "bigalloc"),
    ],
    ids=["ext3", "needs-recovery", "orphans", "bigalloc"],
)
def test_unsafe_filesystems_are_refused(
    tmp_path: Path,
    src: tuple[Path, dict[str, bytes]],
    mkfs_options: list[str],
    debugfs_request: str | None,
    reason: str,
) -> None:
    root, _files = src
    image = tmp_path / "fs.img"
    _mkfs(image, root, *mkfs_options)
    if debugfs_request:
        subprocess.run(
            ["debugfs", "-w", "-R", debugfs_request, str(image)], check=True, capture_output=True
        )
    with pytest.raises(ext4.Ext4Error, match=reason):
        trio.run(ext4.read_layout, _reader(image))


def test_not_ext4_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "zero.img"
    image.write_bytes(bytes(MiB))
    with pytest.raises(ext4.Ext4Error, match="no ext2/3/4 superblock"):
        trio.run(ext4.read_layout, _reader(image))
