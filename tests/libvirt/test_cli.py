"""``snapfs backup URI REPO`` end to end (click runner, real libvirtd)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from snapfs.catalog.repo import load_repository
from snapfs.libvirt_cli import backup_command

MiB = 1 << 20


def test_backup_command_full_then_incremental(make_domain, libvirtd, repo_dir: Path) -> None:
    d = make_domain("cli", {"vda": 2 * MiB, "vdb": MiB})
    d.write("vda", 0, 4096, 0x11)
    runner = CliRunner()

    refused = runner.invoke(backup_command, [libvirtd.uri, str(repo_dir), "--incremental"])
    assert refused.exit_code == 1, refused.output
    assert "no snapshot" in refused.stderr and "to be incremental on" in refused.stderr

    first = runner.invoke(
        backup_command, [libvirtd.uri, str(repo_dir), "--vm", "cli", "--skip-disk", "cli:vdb"]
    )
    assert first.exit_code == 0, first.stderr
    assert "first backup into this repository: full" in first.stderr
    assert "disk vdb is not backed up" in first.stderr
    d.write("vda", MiB, 4096, 0x12)
    second = runner.invoke(backup_command, [libvirtd.uri, str(repo_dir), "--skip-disk", "vdb"])
    assert second.exit_code == 0, second.stderr
    assert "incremental on" in second.stderr and "65536 bytes copied" in second.stderr
    (vm,) = load_repository(repo_dir).vms
    assert [len(s.disks) for s in vm.snapshots] == [1, 1]

    bad = runner.invoke(backup_command, ["/not/a/uri", str(repo_dir)])
    assert bad.exit_code == 2
    missing = runner.invoke(backup_command, [libvirtd.uri, str(repo_dir), "--vm", "nope"])
    assert missing.exit_code == 1 and "no domain named 'nope'" in missing.stderr
