"""One qemu-nbd process serving one image on a private unix socket.

Owns the process and its socket. The listening socket is created here and handed to
qemu-nbd by systemd socket activation (fd 3, ``LISTEN_PID``/``LISTEN_FDS``), so the export
is connectable the moment ``start`` returns: no polling for a socket file to appear.

Lifetime: qemu-nbd is started through ``setpriv --pdeathsig TERM``, so the kernel sends
it SIGTERM when the thread that spawned it exits. ``start`` must therefore be called on
the trio loop thread (the process's main thread, which lives as long as the daemon): even
``kill -9`` of the daemon then takes its servers with it. Spawning forks the daemon, a
short synchronous step; ``stop`` waits asynchronously.

Thread rules: ``start``/``stop`` are async and run on the trio loop only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from snapfs.errors import BackendUnavailable

log = logging.getLogger(__name__)

# How long a server gets to exit on SIGTERM before it is killed: qemu-nbd exits at once
# when idle; a few seconds covers flushing a writable export.
STOP_TIMEOUT_S = 5.0

# The wrapper moves the listening socket to fd 3 and sets the activation variables for its
# own pid ($$), which exec keeps for setpriv and then qemu-nbd. bash, because dash cannot
# redirect file descriptors above 9.
_ACTIVATE = (
    'exec 3<&"$SNAPFS_LISTEN_FD"; '
    "export LISTEN_PID=$$ LISTEN_FDS=1; unset SNAPFS_LISTEN_FD; "
    'exec setpriv --pdeathsig TERM -- "$@"'
)


@dataclass(frozen=True)
class ServerSpec:
    """What to serve and how."""

    image: Path
    format: str
    socket_path: Path
    readonly: bool = True
    shared: int = 16  # max simultaneous clients: our pool plus a libguestfs appliance
    allocation_depth: bool = True  # export qemu:allocation-depth (which layer holds data)
    discard: bool = False  # pass trim through to the image (writable restore disks)


class QemuNbdServer:
    """A qemu-nbd child process bound to ``spec.socket_path``."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_path = spec.socket_path.with_suffix(".log")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        spec = self.spec
        cmd = [
            "qemu-nbd",
            "--persistent",
            f"--shared={spec.shared}",
            f"--format={spec.format}",
            "--cache=writeback",
            "--aio=threads",
        ]
        if spec.readonly:
            cmd.append("--read-only")
        if spec.allocation_depth:
            cmd.append("--allocation-depth")
        if spec.discard:
            cmd += ["--discard=unmap", "--detect-zeroes=unmap"]
        cmd.append(str(spec.image))
        return cmd

    async def start(self) -> None:
        """Bind the socket and spawn qemu-nbd on it; connectable on return."""
        if self.running:
            return
        path = self.spec.socket_path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(16)
            with open(self._stderr_path, "wb") as stderr:
                env = dict(os.environ, SNAPFS_LISTEN_FD=str(sock.fileno()))
                # Popen here, on the loop thread, not trio.lowlevel.open_process (which
                # forks from a worker thread: the death signal would follow that thread).
                self._process = subprocess.Popen(
                    ["bash", "-c", _ACTIVATE, "snapfs-qemu-nbd", *self.command()],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(sock.fileno(),),
                    env=env,
                )
        except OSError as exc:
            raise BackendUnavailable(f"cannot start qemu-nbd for {self.spec.image}: {exc}") from exc
        finally:
            # The child holds its own copy; ours must not keep the socket alive.
            sock.close()
        log.info("started qemu-nbd pid %s for %s on %s", self._process.pid, self.spec.image, path)

    def failure_reason(self) -> str:
        """What the server said on stderr, and how it exited (for error messages)."""
        proc = self._process
        status = "not started" if proc is None else f"exit status {proc.poll()}"
        try:
            text = self._stderr_path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"qemu-nbd {status}" + (f": {text.splitlines()[-1]}" if text else "")

    async def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove its socket."""
        proc = self._process
        if proc is not None and proc.poll() is None:
            with trio.CancelScope(shield=True):
                proc.send_signal(signal.SIGTERM)
                if not await _wait_exit(proc, STOP_TIMEOUT_S):
                    log.warning("qemu-nbd pid %s ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    await _wait_exit(proc, STOP_TIMEOUT_S)
            log.info("stopped qemu-nbd pid %s (%s)", proc.pid, self.spec.image)
        for leftover in (self.spec.socket_path, self._stderr_path):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit without blocking the loop; True if it did."""
    # Polling (not a waiting thread): stops are rare, and poll() also reaps the zombie.
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.poll() is not None


# -- nbdkit relays ---------------------------------------------------------------------------
#
# A guest appliance (libguestfs 1.48) attaches NBD exports over plain unix sockets only. An
# export of a TCP server, usually with TLS (a remote libvirt pull-mode job), is attached
# through a relay: ``nbdkit nbd`` listening on a private unix socket and forwarding each
# client's connection to the upstream URI (a new upstream connection per client, opened when
# the client connects). Read-only. Started exactly like qemu-nbd above (socket activation,
# ``setpriv --pdeathsig TERM`` from the loop thread), so it dies with the daemon too.

# TLS settings libnbd reads from a URI query only when the handle allows local files (nbdkit's
# nbd plugin does not): they become plugin parameters instead.
_RELAY_QUERY_PARAMS = {"tls-certificates": "tls-certificates", "tls-psk-file": "tls-psk"}


def relay_plugin_args(uri: str) -> list[str]:
    """``nbdkit nbd`` parameters that connect to ``uri`` with its TLS settings."""
    parts = urlsplit(uri)
    args: list[str] = []
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _RELAY_QUERY_PARAMS:
            args.append(f"{_RELAY_QUERY_PARAMS[key]}={value}")
        else:
            kept.append((key, value))
    if parts.scheme.startswith("nbds"):
        args.insert(0, "tls=require")
    upstream = urlunsplit(parts._replace(query=urlencode(kept)))
    return [f"uri={upstream}", *args]


class NbdkitRelay(QemuNbdServer):
    """An ``nbdkit nbd`` child process relaying ``uri`` to ``socket_path`` (read-only)."""

    def __init__(self, uri: str, socket_path: Path) -> None:
        display = urlunsplit(urlsplit(uri)._replace(query=""))
        super().__init__(ServerSpec(image=Path(display), format="raw", socket_path=socket_path))
        self.uri = uri

    def command(self) -> list[str]:
        return ["nbdkit", "--foreground", "--readonly", "nbd", *relay_plugin_args(self.uri)]

    def failure_reason(self) -> str:
        return "nbdkit relay" + super().failure_reason().removeprefix("qemu-nbd")
