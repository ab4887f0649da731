"""A private sshd for ``qemu+ssh://`` URIs in the tests.

One ``sshd -D -e -f CONFIG`` in the foreground on 127.0.0.1 and a free port, with a
throw-away host key and a throw-away client key authorized for root (``UsePAM no``,
``StrictModes no``: the keys live in a temporary directory, not in ``~root/.ssh``). The
one thing made outside that directory is ``/run/sshd``, sshd's compiled-in privilege
separation directory (empty; Debian's service creates it at boot), left in place.

libvirt runs the ``ssh`` client itself. With ``no_verify=1`` that client would record the
host key in ``~root/.ssh/known_hosts``; the URIs made here name an ``ssh`` wrapper
(``command=``) that reads and writes a known_hosts file of the server's own directory
instead (pre-filled with the host key), so nothing outside it is touched. On the remote
side, a ``socket=`` parameter makes libvirt 9 run ``nc -U SOCKET`` (netcat-openbsd);
``virt-ssh-helper`` would ignore the socket and connect to the system daemon's.
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
import urllib.parse
from pathlib import Path

from tests.libvirt.daemon import START_TIMEOUT_S, free_port

SSHD = "/usr/sbin/sshd"
# sshd's privilege separation directory is compiled in; Debian's service creates it at boot.
PRIVSEP_DIR = Path("/run/sshd")


def why_unavailable() -> str | None:
    """Why a private sshd cannot serve qemu+ssh:// here, or None if it can."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (openssh-server; scripts/bootstrap installs it)"
    for tool, package in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({package}; scripts/bootstrap installs it)"
    nc = shutil.which("nc")
    if nc is None:
        return "nc is not installed (netcat-openbsd; scripts/bootstrap installs it)"
    probe = subprocess.run([nc, "-h"], capture_output=True, text=True)
    if "-U" not in probe.stdout + probe.stderr:
        return f"{nc} cannot connect to unix sockets (-U): install netcat-openbsd"
    return None


class SshServer:
    """One private sshd; ``libvirt_uri(socket)`` reaches a libvirtd socket through it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="snapfs-ssh-", dir="/tmp"))
        self.port = free_port()
        self.client_key = self.dir / "client-key"
        self.known_hosts = self.dir / "known_hosts"
        self.log = self.dir / "sshd.log"
        self._ssh = self.dir / "ssh"
        self._proc: subprocess.Popen[bytes] | None = None

    def libvirt_uri(self, libvirt_socket: str | Path) -> str:
        query = urllib.parse.urlencode(
            {
                "socket": str(libvirt_socket),
                "keyfile": str(self.client_key),
                "no_verify": "1",
                "no_tty": "1",
                "command": str(self._ssh),
            },
            safe="/",
        )
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system?{query}"

    def start(self) -> None:
        d = self.dir
        host_key = d / "host-key"
        for key in (host_key, self.client_key):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "snapfs-test",
                    "-f",
                    str(key),
                ],
                check=True,
                capture_output=True,
            )
        shutil.copy(f"{self.client_key}.pub", d / "authorized_keys")
        host_pub = Path(f"{host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self._ssh.write_text(
            "#!/bin/sh\n"
            f"exec ssh -o UserKnownHostsFile={self.known_hosts} "
            '-o GlobalKnownHostsFile=/dev/null -o BatchMode=yes "$@"\n'
        )
        self._ssh.chmod(0o700)
        config = d / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile none\n"
            "LogLevel VERBOSE\n"
        )
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as s,
            ):
                if s.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not come up: {self.log_text()}")

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def accepted(self) -> int:
        """How many logins sshd has accepted so far."""
        return self.log_text().count("Accepted publickey for root from 127.0.0.1")

    def stop(self) -> list[str]:
        """Stop sshd and its per-connection processes; remove the files. Returns the pids
        of processes that had to be killed (connections nobody closed)."""
        killed: list[str] = []
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Connection processes are sshd's children in sessions of their own: the
            # listener's process group does not hold them.
            children = _children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            deadline = time.monotonic() + 10
            while children and time.monotonic() < deadline:
                children = [p for p in children if _alive(p)]
                time.sleep(0.05)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pid), signal.SIGKILL)
                killed.append(pid)
        shutil.rmtree(self.dir, ignore_errors=True)
        return killed


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return out.split()


def _alive(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
