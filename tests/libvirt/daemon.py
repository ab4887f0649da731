"""A private libvirtd for the tests (see /work/shared/notes/libvirt-in-tests.md).

Owns one ``libvirtd`` process started in its own mount namespace, with private directories
bind-mounted over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/var/cache/libvirt`` (nothing on the host is touched, several
daemons can run side by side), under ``tini -s`` as child subreaper (QEMU is double-forked
by libvirt; without a subreaper every domain destroy waits 1-2 s for PID 1 to reap it).

The daemon also listens on TCP on 127.0.0.1 (``libvirtd --listen``, ``listen_tcp = 1``,
``auth_tcp = "none"``; libvirt 9's monolithic libvirtd needs ``--listen`` without systemd
socket activation): ``tcp_uri`` (``qemu+tcp://127.0.0.1:PORT/system``) is a remote URI to
snapfs, whose pull-mode jobs then serve NBD over TCP. A throw-away PKI made with
``certtool`` (a CA, a server certificate for 127.0.0.1, a client certificate) is the
daemon's ``backup_tls_x509_cert_dir`` (client certificates verified), and ``client_pki``
is the directory a TLS client passes to libnbd.

Also helpers to make TCG test domains (no guest OS) and to write into their running disks
through QEMU's ``qemu-io`` monitor command. Blocking; tests call it from the test thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

# The QEMU capabilities cache survives between sessions: a warm daemon start takes ~0.2 s,
# a cold one ~1.7 s (measured).
CACHE_DIR = Path("/var/tmp/snapfs-test-libvirt-cache")
# Under CPU contention a daemon start takes seconds; never fail a test on slowness alone.
START_TIMEOUT_S = 120.0

_QEMU_CONF = """\
stdio_handler = "file"
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
"""

_BIND = ("etc", "run", "lib", "log")

_CA = "cn = snapfs test CA\nca\ncert_signing_key\nexpiration_days = 2\n"
_SERVER = (
    "organization = snapfs\ncn = 127.0.0.1\nip_address = 127.0.0.1\ndns_name = localhost\n"
    "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n"
)
_CLIENT = (
    "organization = snapfs\ncn = snapfs-test-client\n"
    "tls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"
)


def free_port() -> int:
    """A TCP port nobody listens on right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _certtool(*args: str) -> None:
    subprocess.run(["certtool", "-q", *args], check=True, capture_output=True)


def make_pki(d: Path) -> tuple[Path, Path]:
    """A CA, a server certificate (127.0.0.1) and a client certificate: (server directory
    as QEMU reads it, client directory as libnbd reads it)."""
    server, client = d / "server", d / "client"
    for x in (d, server, client):
        x.mkdir(mode=0o700)
    for name, text in (("ca.info", _CA), ("server.info", _SERVER), ("client.info", _CLIENT)):
        (d / name).write_text(text)
    ca_key, ca_cert = d / "ca-key.pem", d / "ca-cert.pem"
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(ca_key))
    _certtool(
        "--generate-self-signed",
        "--load-privkey", str(ca_key),
        "--template", str(d / "ca.info"),
        "--outfile", str(ca_cert),
    )  # fmt: skip
    for role, where in (("server", server), ("client", client)):
        key, cert = where / f"{role}-key.pem", where / f"{role}-cert.pem"
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(key))
        _certtool(
            "--generate-certificate",
            "--load-privkey", str(key),
            "--load-ca-certificate", str(ca_cert),
            "--load-ca-privkey", str(ca_key),
            "--template", str(d / f"{role}.info"),
            "--outfile", str(cert),
        )  # fmt: skip
        shutil.copy(ca_cert, where / "ca-cert.pem")
    return server, client


def why_unavailable() -> str | None:
    """Why a private libvirtd cannot run here, or None if it can."""
    for tool in ("libvirtd", "tini", "unshare", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs it)"
    if shutil.which("certtool") is None:
        return "certtool is not installed (gnutls-bin; scripts/bootstrap installs it)"
    if os.geteuid() != 0:
        return "a private system libvirtd needs root (mount namespace, qemu:///system)"
    return None


class LibvirtDaemon:
    """One private libvirtd; ``uri`` connects to it."""

    def __init__(self) -> None:
        # Short path: the sockets inside must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="snapfs-lv-", dir="/tmp"))
        self.uri = f"qemu+unix:///system?socket={self.dir}/sock/libvirt-sock"
        self.tcp_port = free_port()
        self.tcp_uri = f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"
        self.client_pki = self.dir / "pki" / "client"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.dir
        for name in (*_BIND, "sock"):
            (d / name).mkdir(mode=0o700)
        CACHE_DIR.mkdir(mode=0o700, exist_ok=True)
        server_pki, _client = make_pki(d / "pki")
        (d / "etc" / "qemu.conf").write_text(
            _QEMU_CONF
            + f'backup_tls_x509_cert_dir = "{server_pki}"\n'
            + "backup_tls_x509_verify = 1\n"
        )
        conf = d / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{d}/sock"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            "listen_tcp = 1\n"
            "listen_tls = 0\n"
            'listen_addr = "127.0.0.1"\n'
            f'tcp_port = "{self.tcp_port}"\n'
            'auth_tcp = "none"\n'
            f'log_outputs = "3:file:{d}/libvirtd.log"\n'
        )
        self._launch()

    def _launch(self) -> None:
        """Start libvirtd on the prepared directories and wait until it answers."""
        d = self.dir
        conf = d / "libvirtd.conf"
        script = (
            f"mount --bind {d}/etc /etc/libvirt && "
            f"mount --bind {d}/run /run/libvirt && "
            f"mount --bind {d}/lib /var/lib/libvirt && "
            f"mount --bind {d}/log /var/log/libvirt && "
            f"mount --bind {CACHE_DIR} /var/cache/libvirt && "
            f"exec libvirtd --listen -f {conf} -p {d}/libvirtd.pid"
        )
        for target in (
            "/etc/libvirt",
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/log/libvirt",
            "/var/cache/libvirt",
        ):
            os.makedirs(target, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "tini",
                "-s",
                "-g",
                "--",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(d / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited: {self.log_tail()}")
            if (d / "sock" / "libvirt-sock").exists():
                try:
                    libvirt.open(self.uri).close()
                    libvirt.open(self.tcp_uri).close()
                    return
                except libvirt.libvirtError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"libvirtd did not come up: {self.log_tail()}")

    def libvirtd_pid(self) -> int:
        return int((self.dir / "libvirtd.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL libvirtd alone (its domains' QEMU processes keep running, as after a crash
        of the daemon) and wait until it is gone."""
        assert self._proc is not None
        os.kill(self.libvirtd_pid(), signal.SIGKILL)
        self._proc.wait(30)  # tini exits with its child; QEMU is reparented

    def restart(self) -> None:
        """Start libvirtd again after ``kill``, on the same directories: it reconnects to the
        QEMU processes still running (their monitor sockets and status XML are there)."""
        assert self._proc is not None and self._proc.poll() is not None
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "sock" / "libvirt-sock").unlink()
        self._launch()

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("stdout.log", "libvirtd.log"):
            with contextlib.suppress(OSError):
                text += (self.dir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Destroy every domain, stop the daemon (and everything under tini), remove files."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        with contextlib.suppress(libvirt.libvirtError):
                            if dom.isActive():
                                dom.destroy()
                finally:
                    conn.close()
            # tini -g forwards the signal to the whole process group (libvirtd and any QEMU
            # left behind).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- domains -------------------------------------------------------------------------------


def domain_xml(name: str, disks: list[tuple[str, Path]], *, no_backup: tuple[str, ...] = ()) -> str:
    """A TCG domain without OS (it sits in SeaBIOS), with qcow2 virtio disks."""
    disk_xml = ""
    for target, image in disks:
        backup = " backup='no'" if target in no_backup else ""
        disk_xml += (
            f"<disk type='file' device='disk'{backup}>"
            f"<driver name='qemu' type='qcow2'/><source file='{image}'/>"
            f"<target dev='{target}' bus='virtio'/></disk>"
        )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices>{disk_xml}<controller type='usb' model='none'/>"
        "<memballoon model='none'/></devices></domain>"
    )


def qemu_io(dom: Any, target: str, command: str) -> None:
    """Run a qemu-io command (e.g. ``write -P 0x55 0 65536``) on a running disk.

    The device is addressed by its QOM path (``-d virtio-disk0`` and node names fail here)
    built from the disk's alias in the live XML."""
    root = ET.fromstring(dom.XMLDesc(0))
    alias = None
    for disk in root.findall("./devices/disk"):
        t = disk.find("target")
        a = disk.find("alias")
        if t is not None and t.get("dev") == target and a is not None:
            alias = a.get("name")
    if alias is None:
        raise RuntimeError(f"domain has no disk {target}")
    reply = libvirt_qemu.qemuMonitorCommand(
        dom,
        f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{command}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    if reply.strip():
        raise RuntimeError(f"qemu-io {command!r} on {target}: {reply.strip()}")


def start_or_skip(server: Any, unavailable: str | None, what: str) -> None:
    """Start a private test server (``start``/``stop``), or skip the tests that need it,
    saying why: the machine lacks a part (``unavailable``) or the server cannot run here."""
    if unavailable is not None:
        print(f"{what} tests skipped: {unavailable}")
        pytest.skip(unavailable)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        print(f"{what} tests skipped: the private server cannot run here: {exc}")
        pytest.skip(f"private server for {what} cannot run here: {exc}")
