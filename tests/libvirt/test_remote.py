"""Remote libvirt URIs: the private libvirtd is reached as ``qemu+tcp://127.0.0.1:PORT/system``,
so its pull-mode jobs serve NBD over TCP (plain and TLS with certtool-made certificates),
for ``snapfs backup`` and for the live view through a real FUSE mount."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import nbd
import pytest
from click.testing import CliRunner

from snapfs.config import LibvirtSettings
from snapfs.errors import SnapfsUserError
from snapfs.libvirt import jobs
from snapfs.libvirt.backup import DomainBackup, backup_domain
from snapfs.libvirt_cli import backup_command
from snapfs.nbd.server import relay_plugin_args
from tests import imaging
from tests.fusemount import kill_tree_check, mounted, needs_fuse
from tests.libvirt.daemon import free_port

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB


@pytest.fixture
def tcp_conn(libvirtd: Any) -> Iterator[Any]:
    c = libvirt.open(libvirtd.tcp_uri)
    try:
        yield c
    finally:
        c.close()


def raw(path: Path, tmp: Path) -> bytes:
    return imaging.to_raw(path, tmp / f"{path.parent.parent.name}-{path.stem}.raw")


def job_server(dom: Any) -> tuple[ET.Element, list[str]]:
    """The running job's <server> element and scratch file names."""
    root = ET.fromstring(dom.backupGetXMLDesc(0))
    server = root.find("server")
    assert server is not None
    return server, [s.get("file") or "" for s in root.findall("./disks/disk/scratch")]


def test_what_counts_as_remote() -> None:
    assert jobs.is_local("qemu:///system")
    assert jobs.is_local("qemu+unix:///system?socket=/tmp/x/libvirt-sock")
    assert jobs.is_local("qemu:///session")
    for uri in (
        "qemu+tcp://127.0.0.1:16509/system",
        "qemu+tcp://localhost/system",
        "qemu+ssh://root@backup.example/system",
        "qemu+ssh:///system",
        "qemu://host.example/system",
        "qemu+tls://host.example/system",
    ):
        assert not jobs.is_local(uri), uri
    ep = jobs.remote_endpoint(
        "qemu+tcp://[::1]:16509/system", LibvirtSettings(nbd_port=20000, nbd_ports=3, tls=False)
    )
    assert ep is not None and ep.host == "::1" and ep.ports == (20000, 20001, 20002)
    assert ep.uri(20001, "vda") == "nbd://[::1]:20001/vda"
    assert jobs.remote_endpoint("qemu:///system", LibvirtSettings()) is None


def test_tls_required_but_not_configured(libvirtd: Any, no_settings: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapfsUserError, match="TLS is required"):
        jobs.remote_endpoint(libvirtd.tcp_uri, LibvirtSettings())
    empty = tmp_path / "empty-pki"
    empty.mkdir()
    with pytest.raises(SnapfsUserError, match=r"lacks ca-cert\.pem"):
        jobs.remote_endpoint(libvirtd.tcp_uri, LibvirtSettings(tls_certificates=str(empty)))
    repo = tmp_path / "repo"
    result = CliRunner().invoke(backup_command, [libvirtd.tcp_uri, str(repo)])
    assert result.exit_code == 1
    assert "TLS is required" in result.stderr and "--no-tls" in result.stderr
    assert not repo.exists()


def test_backup_over_tcp_full_then_incremental(
    make_domain, tcp_conn: Any, repo_dir: Path, tmp_path: Path
) -> None:
    d = make_domain("remote", {"vda": 4 * MiB, "vdb": 2 * MiB})
    d.write("vda", 0, 256 * KiB, 0x21)
    d.write("vdb", MiB, 64 * KiB, 0x22)
    dom = tcp_conn.lookupByName("remote")
    # The first candidate port is taken here: the job must move to the next one.
    first = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", first))
    taken.listen()
    try:
        endpoint = jobs.remote_endpoint(
            "qemu+tcp://127.0.0.1:1/system",
            LibvirtSettings(nbd_port=first, nbd_ports=20, tls=False),
        )
        assert endpoint is not None
        at_begin = d.snapshot()
        with DomainBackup(dom, repo_dir, endpoint=endpoint) as b:
            job = b.begin()
            server, scratch = job_server(dom)
            assert server.get("transport") == "tcp" and server.get("name") == "127.0.0.1"
            assert server.get("tls") in (None, "no")
            assert int(server.get("port") or 0) == job.port and job.port != first
            assert job.uri("vda") == f"nbd://127.0.0.1:{job.port}/vda"
            # Scratch files are made on the libvirt host beside the images, named ours.
            assert sorted(os.path.dirname(f) for f in scratch) == [str(tmp_path)] * 2
            assert all(os.path.basename(f).startswith("snapfs-job-") for f in scratch)
            d.write("vda", 0, 64 * KiB, 0x23)  # after the job began: not in this snapshot
            b.copy()
            full = b.commit()
    finally:
        taken.close()
    assert not list(tmp_path.glob("snapfs-job-*.scratch")), "scratch files left behind"
    assert jobs.active_job(dom) is None
    for target in ("vda", "vdb"):
        assert raw(full.path / f"disks/{target}.qcow2", tmp_path) == at_begin[target]
    assert [x.to_copy for x in full.disks] == [256 * KiB, 64 * KiB]

    d.write("vdb", 0, 4 * KiB, 0x24)
    incr = backup_domain(dom, repo_dir, endpoint=endpoint)
    assert incr.parent == full.snapshot_id
    assert {x.name: x.to_copy for x in incr.disks} == {"vda": CLUSTER, "vdb": CLUSTER}
    for target in ("vda", "vdb"):
        assert raw(incr.path / f"disks/{target}.qcow2", tmp_path) == d.snapshot()[target]


def test_backup_over_tls_with_the_cli(
    make_domain, libvirtd: Any, tcp_conn: Any, repo_dir: Path, tmp_path: Path, no_settings: Path
) -> None:
    d = make_domain("remote-tls", {"vda": 2 * MiB})
    d.write("vda", 512 * KiB, 64 * KiB, 0x31)
    dom = tcp_conn.lookupByName("remote-tls")
    port = free_port()
    endpoint = jobs.remote_endpoint(
        libvirtd.tcp_uri,
        LibvirtSettings(nbd_port=port, nbd_ports=1, tls_certificates=str(libvirtd.client_pki)),
    )
    assert endpoint is not None and endpoint.tls
    with DomainBackup(dom, repo_dir, endpoint=endpoint) as b:
        job = b.begin()
        server, _scratch = job_server(dom)
        assert server.get("tls") == "yes" and job.port == port
        assert job.uri("vda").startswith(f"nbds://127.0.0.1:{port}/vda?tls-certificates=")
        # The server really wants TLS: a plain client is turned away.
        plain = nbd.NBD()
        with pytest.raises(nbd.Error):
            plain.connect_uri(f"nbd://127.0.0.1:{port}/vda")
        del plain
        b.copy()
        first = b.commit()
    assert raw(first.path / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]

    d.write("vda", 0, 4 * KiB, 0x32)
    no_settings.write_text(
        f'[libvirt]\nnbd_port = {free_port()}\ntls_certificates = "{libvirtd.client_pki}"\n'
    )
    result = CliRunner().invoke(backup_command, [libvirtd.tcp_uri, str(repo_dir)])
    assert result.exit_code == 0, result.stderr
    assert f"incremental on {first.snapshot_id}" in result.stderr
    assert "65536 bytes copied" in result.stderr
    (second,) = [p for p in repo_dir.glob("vms/*/snapshots/*") if p.name != first.snapshot_id]
    assert raw(second / "disks/vda.qcow2", tmp_path) == d.snapshot()["vda"]
    facts = json.loads((second / "libvirt.json").read_text())
    assert facts["incremental_from"] == first.checkpoint
    assert jobs.active_job(dom) is None


@needs_fuse
def test_live_mount_over_tcp(make_domain, libvirtd: Any, tmp_path: Path, no_settings: Path) -> None:
    d = make_domain("remote-live", {"vda": 2 * MiB})
    d.write("vda", MiB, 64 * KiB, 0x41)
    port = free_port()
    no_settings.write_text(
        f'[libvirt]\nnbd_port = {port}\nnbd_ports = 1\ntls_certificates = "{libvirtd.client_pki}"\n'
    )
    at_begin = d.snapshot()
    with mounted(libvirtd.tcp_uri, tmp_path / "m") as m:
        disks = m.path / "remote-live" / "latest" / "disks"
        assert (disks / "vda.img").stat().st_size == 2 * MiB
        assert jobs.active_job(d.dom) is None  # nothing before the first read
        with open(disks / "vda.img", "rb") as f:
            assert f.read(4096) == at_begin["vda"][:4096]
            server, _ = job_server(d.dom)
            assert server.get("transport") == "tcp" and server.get("port") == str(port)
            assert server.get("tls") == "yes"
            d.write("vda", MiB, 64 * KiB, 0x42)  # after the job began: not in the view
            f.seek(0)
            assert f.read() == at_begin["vda"]
        report = json.loads((disks / "vda.extents.json").read_text())
        assert {"start": MiB, "length": 64 * KiB} in report["allocated"]
    assert jobs.active_job(d.dom) is None
    assert not list(tmp_path.glob("snapfs-job-*.scratch"))


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children of children too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@needs_fuse
def test_live_guest_files_over_tls(
    make_domain, libvirtd: Any, tmp_path: Path, no_settings: Path
) -> None:
    """files/ of a remote live view: the appliance attaches the job's TLS export through a
    local nbdkit relay; its files read back byte-exact; unmount leaves no process behind."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    payload = os.urandom(300 * KiB)
    (tree / "etc" / "payload.bin").write_bytes(payload)
    (tree / "hello.txt").write_text("hello from a remote guest\n")
    fs_raw = tmp_path / "fs.raw"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "remotefs", "-d", str(tree), str(fs_raw), "16M"],
        check=True,
    )
    image = tmp_path / "remote-files-vda.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(fs_raw), str(image)],
        check=True,
    )
    d = make_domain("remote-files", {"vda": 16 * MiB}, sources={"vda": image})
    port = free_port()
    no_settings.write_text(
        f'[libvirt]\nnbd_port = {port}\nnbd_ports = 1\ntls_certificates = "{libvirtd.client_pki}"\n'
        '[guestfs]\nbackend = "tcg"\n'
    )
    with mounted(libvirtd.tcp_uri, tmp_path / "m") as m:
        snap = m.path / "remote-files" / "latest"
        assert jobs.active_job(d.dom) is None
        assert (snap / "files" / "hello.txt").read_text() == "hello from a remote guest\n"
        assert (snap / "files" / "etc" / "payload.bin").read_bytes() == payload
        server, _ = job_server(d.dom)
        assert server.get("tls") == "yes" and server.get("port") == str(port)
        below = _descendants(m.proc.pid)
        commands = {pid: _cmdline(pid) for pid in below}
        relays = [p for p, c in commands.items() if c and os.path.basename(c[0]) == "nbdkit"]
        assert len(relays) == 1, commands
        relay = commands[relays[0]]
        assert f"uri=nbds://127.0.0.1:{port}/vda" in relay and "tls=require" in relay
        assert f"tls-certificates={libvirtd.client_pki}" in relay and "--readonly" in relay
        # The appliance (a qemu of the mount) is attached to the relay's unix socket.
        appliance = [c for c in commands.values() if c and "qemu-system" in c[0]]
        # (Through a qcow2 overlay whose backing file is the NBD drive.)
        overlays = [
            a.split(",")[0].removeprefix("file=")
            for c in appliance
            for a in c
            if a.startswith("file=") and "overlay" in a
        ]
        backing = [
            json.loads(
                subprocess.run(
                    ["qemu-img", "info", "-U", "--output=json", path],
                    capture_output=True,
                    check=True,
                ).stdout
            ).get("backing-filename", "")
            for path in overlays
        ]
        assert any("relay.sock" in b for b in backing), (overlays, backing)
        assert (snap / "disks" / "vda.img").read_bytes() == fs_raw.read_bytes()
    left = kill_tree_check(below)
    assert not left, {p: _cmdline(p) for p in left}
    assert jobs.active_job(d.dom) is None
    assert not list(tmp_path.glob("snapfs-job-*.scratch"))


def test_relay_plugin_args() -> None:
    assert relay_plugin_args("nbds://h.example:10809/vda?tls-certificates=/etc/pki/x") == [
        "uri=nbds://h.example:10809/vda",
        "tls=require",
        "tls-certificates=/etc/pki/x",
    ]
    assert relay_plugin_args("nbds://backup@h:1/vdb?tls-psk-file=/k.psk") == [
        "uri=nbds://backup@h:1/vdb",
        "tls=require",
        "tls-psk=/k.psk",
    ]
    assert relay_plugin_args("nbd://[::1]:2/sda") == ["uri=nbd://[::1]:2/sda"]


_RELAY_CHILD = """
import sys
from pathlib import Path

import trio

from snapfs.nbd.server import NbdkitRelay


async def main() -> None:
    relay = NbdkitRelay(sys.argv[1], Path(sys.argv[2]))
    await relay.start()
    print(relay.pid, flush=True)
    await trio.sleep(600)


trio.run(main)
"""


def test_relay_reads_and_dies_with_its_daemon(tmp_path: Path) -> None:
    """A relay of a TCP export (a qemu-nbd of this test) reads the upstream's bytes, is
    read-only, and goes away when the process that started it is killed with SIGKILL.

    (nbdkit 1.32 also sets PR_SET_PDEATHSIG itself, strace shows: this checks the property,
    not which of the two parent-death signals delivers it.)"""
    data = os.urandom(MiB)
    image = tmp_path / "upstream.raw"
    image.write_bytes(data)
    port = free_port()
    serve = ["qemu-nbd", "--persistent", "-r", "-f", "raw", "-b", "127.0.0.1", "-p", str(port)]
    upstream = subprocess.Popen([*serve, "-x", "vda", str(image)], stderr=subprocess.DEVNULL)
    sock = tmp_path / "r.relay.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", _RELAY_CHILD, f"nbd://127.0.0.1:{port}/vda", str(sock)],
        stdout=subprocess.PIPE,
    )
    relay_pid = 0
    try:
        assert child.stdout is not None
        relay_pid = int(child.stdout.readline())
        h = nbd.NBD()
        for _ in range(100):  # qemu-nbd may still be binding its port
            try:
                h.connect_unix(str(sock))
                break
            except nbd.Error:
                h = nbd.NBD()
                time.sleep(0.05)
        # (By now bash and setpriv have exec'd nbdkit.)
        assert os.path.basename(_cmdline(relay_pid)[0]) == "nbdkit"
        assert h.get_size() == MiB and h.is_read_only()
        assert h.pread(MiB, 0) == data
        h.shutdown()
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while kill_tree_check([relay_pid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not kill_tree_check([relay_pid]), "the relay outlived its daemon"
    finally:
        for proc in (child, upstream):
            proc.kill()
            proc.wait()
        if relay_pid and kill_tree_check([relay_pid]):
            os.kill(relay_pid, signal.SIGKILL)
