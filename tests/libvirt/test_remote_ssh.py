"""``qemu+ssh://`` URIs: the private libvirtd is reached through a private sshd on
127.0.0.1 (``socket=`` names the daemon's unix socket, which ``nc -U`` relays on the
remote side), and ``snapfs backup`` takes full and incremental backups over it. Being a
remote URI, the jobs serve NBD over TCP with TLS (client certificates verified)."""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from click.testing import CliRunner

from snapfs.config import LibvirtSettings
from snapfs.libvirt import jobs
from snapfs.libvirt_cli import backup_command
from tests.libvirt.daemon import free_port, start_or_skip
from tests.libvirt.sshd import SshServer, why_unavailable
from tests.libvirt.test_remote import raw

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB


@pytest.fixture(scope="module")
def sshd(libvirtd: Any) -> Iterator[SshServer]:
    server = SshServer()
    start_or_skip(server, why_unavailable(), "qemu+ssh://")
    try:
        yield server
    finally:
        killed = server.stop()
        assert not killed, f"ssh connections left open (killed): {killed}"


@pytest.fixture
def ssh_uri(libvirtd: Any, sshd: SshServer) -> str:
    return sshd.libvirt_uri(libvirtd.dir / "sock" / "libvirt-sock")


def test_ssh_uri_reaches_the_private_daemon(ssh_uri: str, sshd: SshServer) -> None:
    assert not jobs.is_local(ssh_uri)
    logins = sshd.accepted()
    conn = libvirt.open(ssh_uri)
    try:
        # The daemon behind the tunnel is the private one: it lists no domain but ours.
        assert conn.getURI().startswith("qemu+ssh://root@127.0.0.1:")
        assert conn.getLibVersion() > 0
    finally:
        conn.close()
    assert sshd.accepted() == logins + 1, sshd.log_text()
    endpoint = jobs.remote_endpoint(ssh_uri, LibvirtSettings(tls=False))
    assert endpoint is not None and endpoint.host == "127.0.0.1"


def backup(uri: str, repo: Path, caplog: pytest.LogCaptureFixture) -> tuple[str, list[ET.Element]]:
    """Run ``snapfs backup --vm remote-ssh URI REPO``: (its stderr, the <domainbackup>
    elements it passed to backupBegin)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="snapfs.libvirt.jobs"):
        result = CliRunner().invoke(backup_command, ["--vm", "remote-ssh", uri, str(repo)])
    assert result.exit_code == 0, result.stderr
    begins = []
    for record in caplog.records:
        found = re.search(r"<domainbackup .*</domainbackup>", record.getMessage())
        if record.getMessage().startswith("backupBegin") and found:
            begins.append(ET.fromstring(found.group(0)))
    return result.stderr, begins


def nbd_server(begins: list[ET.Element]) -> dict[str, str]:
    """The NBD server of the one job begun."""
    assert len(begins) == 1, begins
    server = begins[0].find("server")
    assert server is not None
    return dict(server.attrib)


def test_backup_over_ssh_full_then_incremental(
    make_domain,
    libvirtd: Any,
    sshd: SshServer,
    ssh_uri: str,
    repo_dir: Path,
    tmp_path: Path,
    no_settings: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = make_domain("remote-ssh", {"vda": 4 * MiB, "vdb": 2 * MiB})
    d.write("vda", 0, 256 * KiB, 0x51)
    d.write("vdb", MiB, 64 * KiB, 0x52)
    port = free_port()
    no_settings.write_text(
        f'[libvirt]\nnbd_port = {port}\nnbd_ports = 1\ntls_certificates = "{libvirtd.client_pki}"\n'
    )
    server = {"transport": "tcp", "name": "127.0.0.1", "port": str(port), "tls": "yes"}

    logins = sshd.accepted()
    stderr, begins = backup(ssh_uri, repo_dir, caplog)
    # libvirt was reached through our sshd; the job served NBD over TCP with TLS (the
    # daemon verifies client certificates: a plain or certificate-less client is refused).
    assert sshd.accepted() > logins, sshd.log_text()
    assert nbd_server(begins) == server
    assert ", full, " in stderr and f"{256 * KiB + 64 * KiB} bytes copied" in stderr, stderr
    (full,) = repo_dir.glob("vms/*/snapshots/*")
    full_checkpoint = json.loads((full / "libvirt.json").read_text())["checkpoint"]
    for target in ("vda", "vdb"):
        assert raw(full / f"disks/{target}.qcow2", tmp_path) == d.snapshot()[target], target
    assert jobs.active_job(d.dom) is None
    assert not list(tmp_path.glob("snapfs-job-*.scratch")), "scratch files left behind"

    d.write("vdb", 0, 4 * KiB, 0x53)
    d.write("vda", 2 * MiB, 128 * KiB, 0x54)
    logins = sshd.accepted()
    stderr, begins = backup(ssh_uri, repo_dir, caplog)
    assert sshd.accepted() > logins, sshd.log_text()
    assert nbd_server(begins) == server
    modes = {x.get("name"): x.get("incremental") for x in begins[0].iter("disk")}
    assert modes == {"vda": full_checkpoint, "vdb": full_checkpoint}
    assert f"incremental on {full.name}" in stderr, stderr
    # Only the dirty clusters crossed: 2 of vda, 1 of vdb.
    assert f"{3 * CLUSTER} bytes copied" in stderr, stderr
    (incr,) = [p for p in repo_dir.glob("vms/*/snapshots/*") if p.name != full.name]
    for target in ("vda", "vdb"):
        assert raw(incr / f"disks/{target}.qcow2", tmp_path) == d.snapshot()[target], target
    facts = json.loads((incr / "libvirt.json").read_text())
    assert facts["incremental_from"] == full_checkpoint
    assert jobs.active_job(d.dom) is None
    assert not list(tmp_path.glob("snapfs-job-*.scratch")), "scratch files left behind"
