"""The pure parts of the guestfs layer: shell quoting, stat/getfattr/filefrag/devmap parsing,
read planning. No appliance."""

from __future__ import annotations

import os
import subprocess

from snapfs.guestfs import extents as ext
from snapfs.guestfs.model import Extent, derive_ino
from snapfs.guestfs.shell import parse_getfattr, parse_stat_record, sh_bytes


def test_sh_bytes_roundtrip_in_dash() -> None:
    samples = (b"plain", b"bad\xff\xfe", b"new\nline\n", b"'q\" $x `y` %d \\", bytes(range(1, 256)))
    for data in samples:
        script = sh_bytes("V", data) + '; printf %s "$V"'
        out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True).stdout
        assert out == data


def test_parse_stat_record() -> None:
    rec = (b"81a4 2 13 1234 5678 6 8 512 0 0 1600000000.123456789 1500000000.987654321 "
           b"-1.500000000 ./a b")
    name, f = parse_stat_record(rec)
    assert name == b"./a b"
    assert f["mode"] == 0o100644 and f["nlink"] == 2 and f["blocks"] == 8
    assert f["mtime_ns"] == 1_500_000_000_987_654_321
    assert f["ctime_ns"] == -1_500_000_000
    name, f = parse_stat_record(b"2190 1 5 0 0 0 0 512 1 3 1.0 1.0 1.0 ./null")
    assert f["rdev"] == os.makedev(1, 3)


def test_parse_getfattr() -> None:
    text = (b"# file: a.txt\nuser.color=0x626c7565\nuser.e=\"\"\n\n"
            b"# file: ./new\\012line\\134x\xff\nuser.k=0x00ff\n\n")
    assert parse_getfattr(text) == {
        b"a.txt": {b"user.color": b"blue", b"user.e": b""},
        b"new\nline\\x\xff": {b"user.k": b"\x00\xff"},
    }


FILEFRAG = b"""12
14
/F
Filesystem type is: ef53
File size of ./a is 6 (4096 block of 1 bytes)
 ext:     logical_offset:        physical_offset: length:   expected: flags:
   0:        0..    4095:    4491264..   4495359:   4096:             last,eof
./a: 1 extent found
File size of ./b is 10000 (12288 blocks of 1 bytes)
 ext:     logical_offset:        physical_offset: length:   expected: flags:
   0:        0..    4095:      81920..     86015:   4096:
   1:     8192..   12287:     90112..     94207:   4096:      86016: last,unwritten,eof
./b: 2 extents found
"""


def test_parse_filefrag() -> None:
    parsed = ext.parse_filefrag(FILEFRAG)
    assert parsed[12] == (6, [Extent(0, 4491264, 4096)])
    assert parsed[14] == (10000, [Extent(0, 81920, 4096), Extent(8192, 90112, 4096, True)])
    inline = FILEFRAG.replace(b"last,eof", b"last,not_aligned,inline,eof")
    assert ext.parse_filefrag(inline)[12][1] is None
    assert ext.parse_filefrag(FILEFRAG.replace(b"12\n14\n", b"12\n")) == {}  # misaligned


def test_devmap_partition_and_lvm() -> None:
    out = b"""B sda 8:0 - 131072
B sda1 8:1 2048 100000
B sda2 8:2 102048 20000
B dm-0 254:0 - 8192
D dm-0 vg0-lv0
R /dev/dm-0
T vg0-lv0: 0 4096 linear 8:2 2048
T vg0-lv0: 4096 4096 linear 8:1 0
"""
    m = ext.parse_devmap(out, {"sda": 0})
    assert m == (
        ext.Segment(0, 4096 * 512, 0, (102048 + 2048) * 512),
        ext.Segment(4096 * 512, 4096 * 512, 0, 2048 * 512),
    )
    part = ext.parse_devmap(out.replace(b"R /dev/dm-0", b"R /dev/sda1"), {"sda": 0})
    assert part == (ext.Segment(0, 100000 * 512, 0, 2048 * 512),)
    striped = out.replace(b"linear 8:1 0", b"striped 2 128 8:1 0 8:2 0")
    assert ext.parse_devmap(striped, {"sda": 0}) is None


def test_plan_read_holes_unwritten_and_tail() -> None:
    devmap = (ext.Segment(0, 1 << 30, 0, 1000),)
    extents = [Extent(0, 4096, 4096), Extent(8192, 16384, 4096, unwritten=True),
               Extent(16384, 65536, 8192)]
    plan = ext.plan_read(extents, devmap, 20000, 4000, 20000)
    assert plan == [
        (0, 1000 + 4096 + 4000, 96),     # end of the first extent
        (-1, 0, 4096),                   # hole
        (-1, 0, 4096),                   # unwritten: zeros
        (-1, 0, 4096),                   # hole
        (0, 1000 + 65536, 20000 - 16384),  # last extent cut at the file size
    ]
    assert ext.plan_read(extents, (), 20000, 0, 10) is None


def test_derive_ino() -> None:
    a = derive_ino(b"s", "vda1", 12)
    assert a == derive_ino(b"s", "vda1", 12) and a >= 1 << 32 and a < 1 << 63
    assert a != derive_ino(b"s", "vda2", 12) != derive_ino(b"t", "vda1", 12)
