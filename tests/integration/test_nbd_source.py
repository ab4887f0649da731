"""NBD sources: a TOML list of NBD URIs mounted like a repository (unix, TCP+TLS-PSK, bitmaps)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import imaging
from tests.fusemount import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path_or_port: Path | int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server died"
        if isinstance(path_or_port, Path):
            if path_or_port.exists():
                return
        else:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", path_or_port)) == 0:
                    return
        time.sleep(0.05)
    raise AssertionError("server did not come up")


@pytest.fixture
def servers(tmp_path: Path):
    """A qcow2 with a dirty bitmap on qemu-nbd (unix) and a raw disk on nbdkit (TCP, TLS-PSK)."""
    base = imaging.random_raw(tmp_path / "a.raw", 8 * MiB, [(0, MiB)])
    qcow = imaging.convert(base, tmp_path / "a.qcow2", "qcow2")
    imaging.run("qemu-img", "bitmap", "--add", "--enable", qcow, "b0")
    for offset, length, pattern in [(2 * MiB, 4096, 0x41), (6 * MiB, MiB, 0x42)]:
        imaging.run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", qcow)
    raw = imaging.random_raw(tmp_path / "b.raw", 4 * MiB, [(MiB, MiB)])
    sock = Path(f"/tmp/snapfs-t-{os.getpid()}-{time.monotonic_ns()}.sock")
    psk = tmp_path / "keys.psk"
    imaging.run("psktool", "-u", "backup", "-p", psk)
    port = free_port()
    procs = [
        subprocess.Popen(
            ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k", str(sock), str(qcow)]
        ),
        subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "--tls=require",
                f"--tls-psk={psk}",
                "file",
                str(raw),
            ]
        ),
    ]
    try:
        wait_for(sock, procs[0])
        wait_for(port, procs[1])
        yield {
            "sock": sock,
            "qcow": qcow,
            "raw": raw,
            "port": port,
            "psk": psk,
            "expect_a": imaging.to_raw(qcow, tmp_path / "ea.raw"),
            "expect_b": raw.read_bytes(),
        }
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        sock.unlink(missing_ok=True)


def test_nbd_source_mounts_like_a_repository(servers, tmp_path: Path) -> None:
    dead_sock = tmp_path / "nobody.sock"
    source = tmp_path / "source.toml"
    source.write_text(f"""
[[vm]]
name = "live-vm"
  [[vm.snapshot]]
  name = "now"
  created = 2026-11-23T01:00:00Z
    [[vm.snapshot.disk]]
    name = "vda"
    uri = "nbd+unix:///?socket={servers["sock"]}"
    dirty_bitmap = "b0"
    [[vm.snapshot.disk]]
    name = "vdb"
    uri = "nbds://127.0.0.1:{servers["port"]}/"
    tls_psk_file = "{servers["psk"]}"
    tls_username = "backup"
    [[vm.snapshot.disk]]
    name = "vdc"
    uri = "nbd+unix:///?socket={dead_sock}"
""")
    with mounted(source, tmp_path / "m") as m:
        disks = m.path / "live-vm" / "snapshots" / "now" / "disks"
        assert sorted(os.listdir(disks)) == [
            "vda.extents.json",
            "vda.img",
            "vdb.extents.json",
            "vdb.img",
            "vdc.extents.json",
            "vdc.img",
        ]
        assert (disks / "vda.img").read_bytes() == servers["expect_a"]
        assert (disks / "vdb.img").read_bytes() == servers["expect_b"]
        st = (disks / "vdb.img").stat()
        assert st.st_size == 4 * MiB and st.st_blocks * 512 == MiB
        report = json.loads((disks / "vda.extents.json").read_text())
        # The bitmap's granularity is the 64 KiB cluster.
        assert report["changed"] == [
            {"start": 2 * MiB, "length": 64 * 1024},
            {"start": 6 * MiB, "length": MiB},
        ]
        assert json.loads((disks / "vdb.extents.json").read_text())["changed"] is None
        # An export nobody serves: listed, EIO on read, reason in the log.
        with pytest.raises(OSError) as info:
            (disks / "vdc.img").read_bytes()
        assert info.value.errno == errno.EIO
        assert "nobody.sock" in m.log_text()


def test_bad_nbd_source_file_is_a_clear_error(tmp_path: Path) -> None:
    import sys

    source = tmp_path / "bad.toml"
    source.write_text("[[vm]\nname=")
    (tmp_path / "m").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "snapfs", "mount", "-f", str(source), str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "bad.toml" in res.stderr and "Traceback" not in res.stderr
