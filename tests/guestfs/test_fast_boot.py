"""Fast boot (snapfs/guestfs/appliance.py): the uncompressed-kernel copy of libguestfs's
appliance, its refusals, and the session's fallback to libguestfs's own appliance."""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import guestfs
import pytest

from snapfs.errors import BackendUnavailable
from snapfs.guestfs import GuestfsSettings, GuestSession, appliance
from snapfs.guestfs import session as session_mod
from snapfs.guestfs.appliance import NotBootable, check_pvh_entry, vmlinux_from_bzimage
from snapfs.guestfs.session import find_qemu_pids


def _host_kernel() -> Path:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels or not os.access(kernels[-1], os.R_OK):
        pytest.skip("no readable /boot/vmlinuz-* on this machine")
    return kernels[-1]


def _fake_bzimage(payload: bytes, version: int = 0x20F) -> bytes:
    """A bzImage header (setup_sects=1) with ``payload`` as the compressed kernel."""
    image = bytearray(1024)
    image[0x1F1] = 1
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    return bytes(image) + payload


def _elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal ELF64 LE image with one PT_NOTE segment holding ``notes`` (name, type)."""
    body = b""
    for name, note_type in notes:
        name0 = name + b"\0"
        desc = b"\0" * 8
        body += struct.pack("<III", len(name0), len(desc), note_type)
        body += name0.ljust((len(name0) + 3) & ~3, b"\0") + desc
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 1
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(header) + phdr + body


def test_host_kernel_unpacks_to_an_elf_with_a_pvh_entry() -> None:
    vmlinux = vmlinux_from_bzimage(_host_kernel().read_bytes())
    assert vmlinux[:4] == b"\x7fELF"
    # Debian's kernels are built with CONFIG_PVH: this is what makes fast boot possible here.
    check_pvh_entry(vmlinux)


@pytest.mark.parametrize("compress", [gzip.compress, lambda b: lzma.compress(b, lzma.FORMAT_XZ)])
def test_payload_formats(compress: object) -> None:
    elf = _elf_with_notes([(b"Xen", 18)])
    assert vmlinux_from_bzimage(_fake_bzimage(compress(elf))) == elf  # type: ignore[operator]


def test_refusals() -> None:
    with pytest.raises(NotBootable, match="not an x86 bzImage"):
        vmlinux_from_bzimage(b"\0" * 4096)
    with pytest.raises(NotBootable, match="boot protocol"):
        vmlinux_from_bzimage(_fake_bzimage(b"", version=0x204))
    with pytest.raises(NotBootable, match="compression"):
        vmlinux_from_bzimage(_fake_bzimage(b"\x02\x21\x4c\x18" + b"x" * 100))  # lz4
    with pytest.raises(NotBootable, match="decompress"):
        vmlinux_from_bzimage(_fake_bzimage(gzip.compress(b"x" * 1000)[:-20]))
    with pytest.raises(NotBootable, match="not an ELF"):
        vmlinux_from_bzimage(_fake_bzimage(gzip.compress(b"not an elf")))
    with pytest.raises(NotBootable, match="no PVH entry"):
        check_pvh_entry(_elf_with_notes([(b"Xen", 5), (b"GNU", 18)]))
    check_pvh_entry(_elf_with_notes([(b"GNU", 3), (b"Xen", 18)]))


def _fake_supermin(cachedir: Path, kernel: bytes) -> Path:
    source = appliance.supermin_dir(str(cachedir))
    source.mkdir(parents=True)
    (source / "kernel").write_bytes(kernel)
    (source / "initrd").write_bytes(b"initrd")
    (source / "root").write_bytes(b"root")
    return source


def test_prepare_makes_one_copy_per_build_and_refuses_stale_builds(tmp_path: Path) -> None:
    elf = _elf_with_notes([(b"Xen", 18)])
    source = _fake_supermin(tmp_path, _fake_bzimage(gzip.compress(elf)))
    inputs = tmp_path / "lib"
    (inputs / "supermin.d").mkdir(parents=True)
    (inputs / "supermin.d" / "packages").write_text("x")
    old = source.stat().st_mtime - 3600
    os.utime(inputs / "supermin.d" / "packages", (old, old))

    fast = appliance.prepare(str(tmp_path), str(inputs))
    assert fast is not None
    assert (fast.path / "kernel").read_bytes() == elf
    for name in ("initrd", "root"):
        # Hard links: the copy keeps this build's files even when supermin replaces them.
        assert (fast.path / name).stat().st_ino == (source / name).stat().st_ino
    assert (fast.path / "README.fixed").exists()
    assert appliance.prepare(str(tmp_path), str(inputs)) == fast  # made once

    # supermin rebuilds (new files): a new copy, the old one pruned.
    for name in ("initrd", "root"):
        (source / name).unlink()
        (source / name).write_bytes(b"new " + name.encode())
    fresh = appliance.prepare(str(tmp_path), str(inputs))
    assert fresh is not None and fresh != fast and not fast.path.exists()

    # An input newer than the build: libguestfs must get the chance to rebuild.
    os.utime(inputs / "supermin.d" / "packages")
    future = source.stat().st_mtime + 3600
    os.utime(inputs / "supermin.d" / "packages", (future, future))
    assert appliance.prepare(str(tmp_path), str(inputs)) is None


def test_prepare_remembers_an_unbootable_kernel(tmp_path: Path) -> None:
    _fake_supermin(tmp_path, _fake_bzimage(gzip.compress(_elf_with_notes([(b"Xen", 5)]))))
    assert appliance.prepare(str(tmp_path), str(tmp_path / "none")) is None
    home = tmp_path / f"snapfs-appliance-{os.getuid()}"
    (marker,) = home.glob("*.unusable")
    assert "no PVH entry" in marker.read_text()
    assert appliance.prepare(str(tmp_path), str(tmp_path / "none")) is None


def test_no_supermin_build_yet(tmp_path: Path) -> None:
    assert appliance.prepare(str(tmp_path), str(tmp_path)) is None


def _nbd_head(sock: str, size: int) -> bytes:
    import nbd

    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        data: bytes = h.pread(size, 0)
    finally:
        h.shutdown()
    return data


@pytest.mark.guestfs
async def test_fast_boot_launch_reads_the_disks(disks: list[tuple[str, str]]) -> None:
    s = GuestSession("fast", disks[:1], GuestfsSettings(backend="tcg"))
    try:
        # The first launch on a fresh machine builds libguestfs's appliance (no fast boot
        # possible yet); every later one boots the uncompressed kernel.
        await s.call(lambda g, state: None)
        if not s.last_launch_fast_boot:
            await s.shutdown_appliance()
            await s.call(lambda g, state: None)
        assert s.last_launch_fast_boot
        assert await s.call(lambda g, state: g.list_devices()) == ["/dev/sda"]
        head = await s.call(lambda g, state: g.pread_device("/dev/sda", 65536, 0))
        assert head == _nbd_head(disks[0][1], 65536)
    finally:
        await s.aclose()
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == []


@pytest.mark.guestfs
async def test_broken_fast_boot_falls_back_to_the_normal_appliance(
    disks: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fast-boot directory whose kernel qemu cannot boot: the launch fails, the session
    # launches libguestfs's own appliance instead and stops trying fast boot.
    # (Its initrd and root are libguestfs's real ones: libguestfs segfaults on an empty root.)
    source = appliance.supermin_dir(guestfs.GuestFS().get_cachedir())
    if not (source / "root").exists():  # a normal launch builds it
        build = GuestSession("build", disks[:1], GuestfsSettings(backend="tcg", fast_boot=False))
        await build.call(lambda g, state: None)
        await build.aclose()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "kernel").write_bytes(b"this is no kernel")
    (broken / "README.fixed").write_bytes(b"")
    for name in ("initrd", "root"):
        (broken / name).symlink_to(source / name)
    monkeypatch.setattr(
        appliance, "prepare", lambda cachedir, path: appliance.FastAppliance(broken)
    )
    monkeypatch.setattr(session_mod._FastBootVerdict, "works", None)
    s = GuestSession("broken-fast", disks[:1], GuestfsSettings(backend="tcg"))
    try:
        assert await s.call(lambda g, state: g.list_devices()) == ["/dev/sda"]
        assert not s.last_launch_fast_boot
        assert len(s.attempt_markers) == 2
        assert session_mod._FastBootVerdict.works is False
    finally:
        await s.aclose()
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == []


@pytest.mark.parametrize("normal_launch_works", [True, False])
async def test_fast_boot_is_blamed_only_when_the_normal_appliance_launches(
    monkeypatch: pytest.MonkeyPatch, normal_launch_works: bool
) -> None:
    # Stubbed launches (the two outcomes cannot be produced on demand with a real
    # accelerator): a KVM failure fails both attempts and must not turn fast boot off.
    attempts: list[bool] = []

    async def launch_once(self: GuestSession, mode: str, timeout: float, *, fast_boot: bool):
        attempts.append(fast_boot)
        self._fast_boot_used = fast_boot
        if fast_boot or not normal_launch_works:
            raise BackendUnavailable(f"{mode} launch failed")

    monkeypatch.setattr(GuestSession, "_launch_once", launch_once)
    monkeypatch.setattr(session_mod._FastBootVerdict, "works", None)
    s = GuestSession("verdict", [("vda", "/nonexistent.sock")], GuestfsSettings(backend="kvm"))
    if normal_launch_works:
        await s._launch_with_fast_boot("kvm", 1.0)
        assert session_mod._FastBootVerdict.works is False
    else:
        with pytest.raises(BackendUnavailable):
            await s._launch_with_fast_boot("kvm", 1.0)
        assert session_mod._FastBootVerdict.works is None
    assert attempts == [True, False]
