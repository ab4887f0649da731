"""Guest images for OS inspection, btrfs subvolumes and ntfs (tests/guestfs/test_os.py and
tests/integration/test_guest_os.py).

- ``build_os_disk``: a synthetic Debian guest, no appliance: GPT, p1 ext4 root (/etc/fstab,
  /etc/os-release, /etc/debian_version, /bin, /usr/bin) and p2 ext4 /home, both mounted by
  UUID= in the fstab (UUIDs set with mkfs.ext4 -U). libguestfs 1.48 takes a filesystem for a
  Linux root when it has a directory /etc, /bin a directory (or a symlink to usr/bin) and a
  file /etc/fstab or /etc/hosts (daemon/inspect_fs.ml); the mountpoints come from the fstab.
- ``build_btrfs_ntfs``: a whole-disk btrfs (mkfs.btrfs --rootdir; btrfs-progs 6.2 has no
  --subvol, so subvolumes are made by one short appliance session) and a GPT disk with one
  ntfs partition (mkntfs on the host, filled in the same session), when the appliance has
  ntfs-3g.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .conftest import MiB, _gpt, _run

ROOT_UUID = "3f1c2b9e-6d1a-4f0e-9a57-0c1d2e3f4a5b"
HOME_UUID = "8e7d6c5b-4a39-4281-b706-f5e4d3c2b1a0"
FSTAB = (
    f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
    f"UUID={HOME_UUID} /home ext4 defaults 0 2\n"
    "proc /proc proc defaults 0 0\n"
).encode()
OS_RELEASE = (
    b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
    b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n'
)
USER_FILE = b"alice/notes.txt"
NONASCII = "Grüße ☃.txt"


def os_tools_missing() -> str | None:
    for tool in ("mkfs.ext4", "sfdisk", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


@dataclass
class OsDisk:
    raw: Path
    root: Path  # the source trees
    home: Path


def build_os_disk(work: Path) -> OsDisk:
    root = work / "root"
    for d in ("etc", "bin", "usr/bin", "home", "proc", "tmp", "var/log"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "fstab").write_bytes(FSTAB)
    (root / "etc" / "os-release").write_bytes(OS_RELEASE)
    (root / "etc" / "debian_version").write_bytes(b"12.5\n")
    (root / "etc" / "hostname").write_bytes(b"snapguest\n")
    (root / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost snapguest\n")
    (root / "bin" / "sh").write_bytes(b"#!/not/really\n")
    os.symlink("../../bin/sh", root / "usr" / "bin" / "sh")
    (root / "var" / "log" / "syslog").write_bytes(os.urandom(300_000))
    home = work / "home"
    (home / "alice" / "docs").mkdir(parents=True)
    (home / "bob").mkdir()
    (home / USER_FILE.decode()).write_bytes(b"alice's notes\n" * 100)
    (home / "alice" / "docs" / "report.bin").write_bytes(os.urandom(3 * MiB + 17))
    (home / "alice" / NONASCII).write_bytes(b"non-ascii name\n")
    os.symlink("../alice/notes.txt", home / "bob" / "alices-notes")
    os.chown(home / "alice", 1000, 1000)
    os.chown(home / USER_FILE.decode(), 1000, 1000)
    p1, p2 = work / "p1.ext4", work / "p2.ext4"
    for img, size, uuid, label, tree in (
        (p1, 48 * MiB, ROOT_UUID, "root", root),
        (p2, 32 * MiB, HOME_UUID, "home", home),
    ):
        img.touch()
        os.truncate(img, size)
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-U", uuid, "-L", label, "-d", tree, img)
    raw = work / "os.raw"
    _gpt(raw, 100 * MiB, [(p1, 1), (p2, 50)])
    p1.unlink()
    p2.unlink()
    return OsDisk(raw, root, home)


# btrfs: top-level content (mkfs.btrfs --rootdir) and subvolumes made in the appliance.
BTRFS_TOP = {"top.txt": b"top level\n"}
SUBVOLS = ("data", "vols/inner")  # "vols" is a plain directory of the top level
SUBVOL_FILES = {
    "data": {"d.txt": b"in data\n" * 50, "sub/deeper.txt": b"deeper\n"},
    "vols/inner": {"i.txt": b"inner subvolume\n"},
}
BTRFS_BIG = "data/big.bin"  # a multi-MiB file inside subvolume "data"
# ntfs: files written through ntfs-3g in the appliance.
NTFS_DIRS = ("Dir", "Dir/Sub")
NTFS_SMALL = {"Dir/hello.txt": b"hello ntfs\n", f"Dir/{NONASCII}": b"umlaut and snowman\n"}
NTFS_BIG = "Dir/Sub/big.bin"


@dataclass
class BtrfsNtfs:
    btrfs: Path
    ntfs: Path | None  # None: no ntfs (ntfs_missing says why)
    ntfs_missing: str | None
    big: Path  # source of BTRFS_BIG
    ntfs_big: Path  # source of NTFS_BIG


def build_btrfs_ntfs(work: Path) -> BtrfsNtfs:
    import guestfs

    top = work / "btrfs-top"
    top.mkdir()
    for name, data in BTRFS_TOP.items():
        (top / name).write_bytes(data)
    (top / "vols").mkdir()
    btrfs = work / "btrfs.raw"
    btrfs.touch()
    os.truncate(btrfs, 160 * MiB)
    _run("mkfs.btrfs", "-q", "-f", "--rootdir", top, btrfs)
    big = work / "btrfs-big"
    big.write_bytes(os.urandom(5 * MiB + 333))
    ntfs_big = work / "ntfs-big"
    ntfs_big.write_bytes(os.urandom(3 * MiB + 4321))
    ntfs: Path | None = None
    ntfs_missing: str | None = None
    if shutil.which("mkntfs") is None:
        ntfs_missing = "mkntfs not installed on the host"
    else:
        part = work / "p1.ntfs"
        part.touch()
        os.truncate(part, 32 * MiB)
        _run("mkntfs", "-F", "-Q", "-q", "-L", "snapntfs", part)
        ntfs = work / "ntfs.raw"
        _gpt(ntfs, 40 * MiB, [(part, 1)])
        part.unlink()

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(btrfs), format="raw", readonly=False)
    if ntfs is not None:
        g.add_drive_opts(str(ntfs), format="raw", readonly=False)
    g.launch()
    try:
        g.mount("/dev/sda", "/")
        for sub in SUBVOLS:
            g.btrfs_subvolume_create(f"/{sub}")
            for name, data in SUBVOL_FILES[sub].items():
                path = f"/{sub}/{name}"
                g.mkdir_p(path.rsplit("/", 1)[0])
                g.write(path, data)
        g.upload(str(big), f"/{BTRFS_BIG}")
        g.umount_all()
        if ntfs is not None:
            if not g.available_all_groups() or "ntfs3g" not in g.available_all_groups():
                ntfs_missing = "libguestfs has no ntfs3g group"
            elif not g.feature_available(["ntfs3g"]):
                ntfs_missing = "the appliance has no ntfs-3g (available ntfs3g: false)"
            else:
                g.mount("/dev/sdb1", "/")
                for d in NTFS_DIRS:
                    g.mkdir(f"/{d}")
                for name, data in NTFS_SMALL.items():
                    g.write(f"/{name}", data)
                g.upload(str(ntfs_big), f"/{NTFS_BIG}")
                g.umount_all()
        g.shutdown()
    finally:
        g.close()
    if ntfs_missing is not None and ntfs is not None:
        ntfs.unlink()
        ntfs = None
    return BtrfsNtfs(btrfs, ntfs, ntfs_missing, big, ntfs_big)


def to_qcow2(raw: Path, out_dir: Path) -> Path:
    """A qcow2 copy of ``raw`` in ``out_dir`` (the raw image may be shared with other tests)."""
    qcow = out_dir / f"{raw.stem}.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    return qcow
