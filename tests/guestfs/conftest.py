"""Fixtures for the libguestfs layer: guest images built without the appliance (except LVM),
served by our own qemu-nbd processes, and ONE shared appliance for the whole test session.

Images (session scoped):
- vda: GPT, p1 ext4 (the full source tree, mkfs.ext4 -d), p2 xfs (mkfs.xfs -p protofile),
  p3 vfat (mcopy), p4 ext4 with its group descriptors overwritten (cannot be mounted);
- vdb: whole-disk btrfs (mkfs.btrfs --rootdir);
- vdc: LVM (vg0/lv0, ext4): LVM needs device-mapper, so it is built once by an appliance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

MiB = 1 << 20
BIG_SIZE = 24 * MiB
LV_FILE = b"lvm says hello\n" * 1000


def _run(*argv: str | Path, **kw: object) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def _make_tree(root: Path) -> None:
    root.mkdir()
    b = bytes(root)
    (root / "a.txt").write_bytes(b"hello\n")
    os.link(root / "a.txt", root / "hard")
    (root / "dir" / "empty").mkdir(parents=True)
    os.link(root / "a.txt", root / "dir" / "hard2")
    os.symlink("a.txt", root / "link")
    os.symlink(b"/nowhere/\xff\xfe", b + b"/badlink")
    with open(b + b"/bad\xff\xfename", "wb") as f:
        f.write(b"non-utf8 name\n")
    with open(b + b"/new\nline", "wb") as f:
        f.write(b"newline name\n")
    with open(b + b"/" + b"L" * 255, "wb") as f:
        f.write(b"long name\n")
    # Names equal to the listing script's section letters (tree.py, _list_shell).
    (root / "L").write_bytes(b"an L\n")
    (root / "X").write_bytes(b"an X\n")
    os.mkdir(b + b"/odd\xfcdir")
    with open(b + b"/odd\xfcdir/inner", "wb") as f:
        f.write(b"x" * 70000)
    os.setxattr(root / "a.txt", "user.color", b"blue")
    os.setxattr(root / "dir", "user.empty", b"")
    os.setxattr(b + b"/bad\xff\xfename", "user.bin", bytes(range(256)))
    # sparse: data, a 5 MiB hole, data, a trailing hole
    with open(root / "sparse", "wb") as f:
        f.write(b"S" * 5000)
        f.seek(5 * MiB)
        f.write(b"T" * 70000)
        f.truncate(9 * MiB)
    (root / "big").write_bytes(os.urandom(BIG_SIZE))
    (root / "small").write_bytes(os.urandom(3000))
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o20640, os.makedev(1, 3))
    os.chown(root / "small", 1234, 5678)
    os.chmod(root / "small", 0o4751)
    for name in ("a.txt", "small", "big"):
        os.utime(root / name, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


def _gpt(disk: Path, size: int, parts: list[tuple[Path, int]]) -> None:
    """A GPT disk with each image in its own partition (offsets in MiB)."""
    with open(disk, "wb") as f:
        f.truncate(size)
    script = "label: gpt\n" + "".join(
        f"start={off * 2048}, size={(img.stat().st_size + 511) // 512}\n" for img, off in parts
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True,
                   capture_output=True)
    for img, off in parts:
        _run("dd", f"if={img}", f"of={disk}", "bs=1M", f"seek={off}", "conv=notrunc,sparse",
             "status=none")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for tool in ("mkfs.ext4", "mkfs.xfs", "mkfs.vfat", "mcopy", "mkfs.btrfs", "sfdisk",
                 "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    work = tmp_path_factory.mktemp("guestimg")
    tree = work / "tree"
    _make_tree(tree)
    ext4 = work / "p1.ext4"
    ext4.touch()
    os.truncate(ext4, 64 * MiB)
    _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "snaproot", "-d", tree, ext4)
    # xfs: a protofile (mkfs.xfs(8)) with a multi-MiB file and a small one
    (work / "xfs-big").write_bytes(os.urandom(3 * MiB + 123))
    (work / "xfs-small").write_bytes(b"xfs small\n")
    proto = work / "proto"
    proto.write_text(
        "/dev/null\n0 0\nd--755 0 0\n"
        f"big ---644 0 0 {work / 'xfs-big'}\n"
        f"sub d--750 42 43\nsmall ---600 42 43 {work / 'xfs-small'}\n$\n$\n"
    )
    xfs = work / "p2.xfs"
    xfs.touch()
    os.truncate(xfs, 320 * MiB)
    _run("mkfs.xfs", "-q", "-f", "-p", proto, xfs)
    vfat = work / "p3.vfat"
    _run("mkfs.vfat", "-C", vfat, str(16 * 1024))
    (work / "fat-data").write_bytes(os.urandom(200_000))
    _run("mcopy", "-i", vfat, work / "fat-data", "::DATA.BIN")
    broken = work / "p4.ext4"
    broken.touch()
    os.truncate(broken, 16 * MiB)
    _run("mkfs.ext4", "-q", "-F", "-b", "4096", broken)
    with open(broken, "r+b") as f:  # group descriptors: magic stays, mount fails
        f.seek(4096)
        f.write(b"\xff" * 4096)
    vda = work / "vda.raw"
    _gpt(vda, 512 * MiB, [(ext4, 1), (xfs, 70), (vfat, 400), (broken, 420)])
    vdb = work / "vdb.raw"
    vdb.touch()
    os.truncate(vdb, 128 * MiB)
    _run("mkfs.btrfs", "-q", "-f", "--rootdir", tree, vdb)
    vdc = work / "vdc.raw"
    vdc.touch()
    os.truncate(vdc, 64 * MiB)
    _build_lvm(vdc, work)
    out = {"tree": tree, "xfs-big": work / "xfs-big", "xfs-small": work / "xfs-small",
           "fat-data": work / "fat-data"}
    for name, raw in (("vda", vda), ("vdb", vdb), ("vdc", vdc)):
        qcow = work / f"{name}.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
        raw.unlink()
        out[name] = qcow
    return out


def _build_lvm(disk: Path, work: Path) -> None:
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(disk), format="raw", readonly=False)
    g.launch()
    try:
        g.part_disk("/dev/sda", "gpt")
        g.pvcreate("/dev/sda1")
        g.vgcreate("vg0", ["/dev/sda1"])
        # two segments on the PV (a gap between them) to exercise the dm linear mapping
        g.lvcreate("pad", "vg0", 4)
        g.lvcreate("lv0", "vg0", 16)
        g.lvremove("/dev/vg0/pad")
        g.lvresize("/dev/vg0/lv0", 40)
        g.mkfs("ext4", "/dev/vg0/lv0")
        g.mount("/dev/vg0/lv0", "/")
        g.write("/lvfile", LV_FILE)
        g.fill_pattern("0123456789abcdef", 20 * MiB, "/spanning")
        # nanosecond times (mkfs -d/--rootdir copy whole seconds only)
        g.debug("sh", ["touch -m -d @1500000000.987654321 /sysroot/lvfile"])
        g.umount_all()
        g.shutdown()
    finally:
        g.close()


class NbdServers:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def serve(self, image: Path) -> str:
        sock = str(self.work / f"{image.stem}.sock")
        # pdeathsig: a test process that crashes (a segfault in a binding) takes its
        # servers with it instead of leaving them running.
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--",
             "qemu-nbd", "-r", "-t", "-e", "8", "-f", "qcow2", "-k", sock, str(image)],
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        for _ in range(100):
            if os.path.exists(sock):
                return sock
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd for {image} exited {proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"qemu-nbd for {image} did not create {sock}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def disks(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[list[tuple[str, str]]]:
    servers = NbdServers(tmp_path_factory.mktemp("nbd"))
    try:
        yield [(name, servers.serve(images[name])) for name in ("vda", "vdb", "vdc")]
    finally:
        servers.stop()


class RawReader:
    """A tiny ReadRaw over one libnbd handle per disk (the lead's pool plugs in instead)."""

    def __init__(self, disks: list[tuple[str, str]]) -> None:
        import nbd

        self.handles = {}
        for name, sock in disks:
            h = nbd.NBD()
            h.connect_unix(sock)
            self.handles[name] = h
        self.calls = 0

    async def __call__(self, disk: str, offset: int, length: int) -> bytes:
        self.calls += 1
        h = self.handles[disk]
        data: bytes = await trio.to_thread.run_sync(h.pread, length, offset)
        return data

    def close(self) -> None:
        for h in self.handles.values():
            h.shutdown()


@pytest.fixture(scope="session")
def raw_reader(disks: list[tuple[str, str]]) -> Iterator[RawReader]:
    r = RawReader(disks)
    yield r
    r.close()
