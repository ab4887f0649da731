"""Test images built in seconds with qemu-img/qemu-io (no appliance, no root tricks)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def sparse_raw(path: Path, size: int, writes: list[tuple[int, int, int]]) -> Path:
    """A raw image of ``size`` bytes with pattern writes (offset, length, byte) and holes."""
    run("truncate", "-s", str(size), path)
    for offset, length, pattern in writes:
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", path)
    return path


def random_raw(path: Path, size: int, data_ranges: list[tuple[int, int]]) -> Path:
    """A raw image with random bytes in ``data_ranges`` (offset, length), holes elsewhere."""
    run("truncate", "-s", str(size), path)
    with open("/dev/urandom", "rb") as rnd, open(path, "r+b") as out:
        for offset, length in data_ranges:
            out.seek(offset)
            out.write(rnd.read(length))
    return path


def convert(src: Path, dst: Path, fmt: str, src_fmt: str = "raw") -> Path:
    run("qemu-img", "convert", "-f", src_fmt, "-O", fmt, src, dst)
    return dst


def overlay(base: Path, dst: Path, writes: list[tuple[int, int, int]]) -> Path:
    """A qcow2 overlay on ``base`` (relative backing path) with pattern writes."""
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.name,
        "-F",
        run("qemu-img", "info", "--output=json", base).split('"format": "')[1].split('"')[0],
        dst,
    )
    for offset, length, pattern in writes:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", dst)
    return dst


def to_raw(image: Path, dst: Path) -> bytes:
    """What qemu reads from ``image`` through its backing chain, as bytes."""
    run("qemu-img", "convert", "-O", "raw", image, dst)
    return dst.read_bytes()
