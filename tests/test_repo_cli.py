"""``snapfs repo ...`` and ``snapfs ls`` through click, and the sample repository's content."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from snapfs.catalog import qemu_img
from snapfs.catalog.repo import load_repository
from snapfs.repo_cli import ls_command, repo_group
from snapfs.sample import (
    PARTITION_OFFSET,
    build_sample_repository,
    edit_ext4,
    make_ext4_disk,
    read_guest_file,
)

MIB = 1 << 20


@click.group()
def cli() -> None:
    """The two commands under test, registered as snapfs.cli will."""


cli.add_command(repo_group)
cli.add_command(ls_command)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def image(path: Path, seed: int, size: int = 4 * MIB) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(rnd.randbytes(512 * 1024))
    return path


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A repository with VM 'web' (full + incremental, two disks) and VM 'db'."""
    root = tmp_path / "repo"
    assert run("repo", "init", root).exit_code == 0
    vda, vdb = image(tmp_path / "vda.raw", 1), image(tmp_path / "vdb.raw", 2, 2 * MIB)
    cfg = tmp_path / "domain.xml"
    cfg.write_text("<domain type='kvm'><name>web</name></domain>\n")
    result = run(
        "repo", "add-snapshot", root, "--vm", "web", "--disk", f"vda={vda}",
        "--disk", f"vdb={vdb}", "--config", cfg, "--name", "monday", "--description", "first",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Added snapshot 'monday'" in result.stdout and "full" in result.stdout
    with open(vda, "r+b") as f:
        f.seek(3 * MIB)
        f.write(b"tuesday")
    result = run(
        "repo", "add-snapshot", root, "--vm", "web", "--disk", f"vda={vda}",
        "--disk", f"vdb={vdb}", "--incremental", "--name", "tuesday",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "incremental on" in result.stdout
    result = run(
        "repo", "add-snapshot", root, "--vm", "db", "--disk", f"sda={image(tmp_path / 'db', 3)}",
        "--source-format", "raw", "--format", "raw", "--name", "only",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_init_errors(tmp_path: Path) -> None:
    assert run("repo", "init", tmp_path / "r").exit_code == 0
    result = run("repo", "init", tmp_path / "r")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'r'}: already a snapfs repository"


def test_ls_table(filled: Path) -> None:
    result = run("ls", filled)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "│" in line]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]
    assert rows[0][:5] == ["db", "only", rows[0][2], "sda", "raw"]
    assert rows[0][5:8] == ["4.0 MiB", "512.0 KiB", "512.0 KiB"]
    web = [row for row in rows if row[0] == "web"]
    assert [(r[1], r[3], r[4], r[8]) for r in web] == [
        ("monday", "vda", "qcow2", ""),
        ("monday", "vdb", "qcow2", ""),
        ("tuesday", "vda", "qcow2", "monday"),  # backing shown as the parent snapshot
        ("tuesday", "vdb", "qcow2", "monday"),
    ]
    assert all(row[9] == "" for row in rows)
    assert result.stderr == ""


def test_ls_json(filled: Path) -> None:
    result = run("ls", "--json", filled)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["problems"] == []
    assert [vm["name"] for vm in data["vms"]] == ["db", "web"]
    web = data["vms"][1]
    assert [s["name"] for s in web["snapshots"]] == ["monday", "tuesday"]
    monday, tuesday = web["snapshots"]
    assert monday["description"] == "first"
    assert tuesday["parent"] == monday["id"]
    assert [Path(p).name for p in monday["config_files"]] == ["domain.xml"]
    vda = tuesday["disks"][0]
    assert vda["name"] == "vda" and vda["format"] == "qcow2"
    assert vda["virtual_size"] == 4 * MIB
    assert vda["allocated"] == 512 * 1024 + 64 * 1024
    assert vda["backing"] == monday["disks"][0]["path"]
    assert vda["error"] is None
    assert (
        qemu_img.compare(
            Path(vda["path"]), Path(monday["disks"][0]["path"]), a_format="qcow2", b_format="qcow2"
        )
        is False
    )


def test_ls_with_problems_exits_1_and_lists_good_entries(filled: Path) -> None:
    (db_snap,) = (filled / "vms" / "db" / "snapshots").iterdir()
    (db_snap / "disks" / "sda.raw").unlink()
    vm_json = filled / "vms" / "web" / "vm.json"
    vm_json.write_text('{"name": "web"')
    result = run("ls", filled)
    assert result.exit_code == 1
    assert "tuesday" in result.stdout and "monday" in result.stdout
    assert "image file is missing" in result.stdout  # in the Error column
    assert "2 problem(s):" in result.stderr
    assert f"{db_snap / 'disks' / 'sda.raw'}: image file is missing" in result.stderr
    assert f"{vm_json}: malformed JSON" in result.stderr
    as_json = run("ls", "--json", filled)
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert len(data["problems"]) == 2
    assert data["vms"][0]["snapshots"][0]["disks"][0]["error"] == "image file is missing"


def test_ls_not_a_repository(tmp_path: Path) -> None:
    result = run("ls", tmp_path)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {tmp_path}: not a snapfs repository")
    assert "Traceback" not in result.output


def test_add_snapshot_errors(filled: Path, tmp_path: Path) -> None:
    bad_spec = run("repo", "add-snapshot", filled, "--vm", "web", "--disk", "vda")
    assert bad_spec.exit_code == 2
    assert "expected NAME=IMAGE" in bad_spec.output
    missing = run("repo", "add-snapshot", filled, "--vm", "x", "--disk", f"vda={tmp_path}/no")
    assert missing.exit_code == 1
    assert missing.output.strip() == f"Error: {tmp_path}/no: no such image file"
    dup = run(
        "repo", "add-snapshot", filled, "--vm", "web", "--name", "monday",
        "--disk", f"vda={tmp_path / 'vda.raw'}",
    )  # fmt: skip
    assert dup.exit_code == 1
    assert "already has a snapshot named 'monday'" in dup.output
    no_parent = run(
        "repo", "add-snapshot", filled, "--vm", "new", "--incremental",
        "--disk", f"vda={tmp_path / 'vda.raw'}",
    )  # fmt: skip
    assert no_parent.exit_code == 1
    assert "no snapshot to be incremental on" in no_parent.output
    assert sorted(p.name for p in (filled / "vms").iterdir()) == ["db", "web"]


# --- the sample ---------------------------------------------------------------------------


def test_make_ext4_disk_and_edit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dir with space").mkdir(parents=True)
    (tree / "dir with space" / "f.txt").write_bytes(b"content\n")
    for partitioned, table in ((True, "gpt"), (True, "dos"), (False, "gpt")):
        disk = tmp_path / f"{partitioned}-{table}.raw"
        offset = make_ext4_disk(tree, disk, 16 * MIB, partitioned, table=table)
        assert offset == (PARTITION_OFFSET if partitioned else 0)
        assert disk.stat().st_size == 16 * MIB
        assert read_guest_file(disk, "/dir with space/f.txt", offset) == b"content\n"
        if partitioned:
            dump = subprocess.run(
                ["sfdisk", "--json", str(disk)], check=True, capture_output=True, text=True
            ).stdout
            table_json = json.loads(dump)["partitiontable"]
            assert table_json["label"] == table
            assert table_json["partitions"][0]["start"] == PARTITION_OFFSET // 512
        edit_ext4(
            disk, offset, writes={"/new/deep/x": b"x" * 5000}, removes=["/dir with space/f.txt"]
        )
        assert read_guest_file(disk, "/new/deep/x", offset) == b"x" * 5000
        with pytest.raises(FileNotFoundError):
            read_guest_file(disk, "/dir with space/f.txt", offset)


def test_sample_command_builds_a_clean_repository(tmp_path: Path) -> None:
    result = run("repo", "sample", tmp_path / "sample")
    assert result.exit_code == 0, result.output
    listing = run("ls", tmp_path / "sample")
    assert listing.exit_code == 0, listing.output
    assert "web-01" in listing.stdout and "db-01" in listing.stdout


def test_sample_repository_content(tmp_path: Path) -> None:
    sample = build_sample_repository(tmp_path / "sample")
    catalog = load_repository(sample.path)
    assert catalog.problems == ()
    assert [vm.name for vm in catalog.vms] == ["db-01", "web-01"]
    _, web = catalog.vms
    assert [len(vm.snapshots) for vm in catalog.vms] == [3, 3]
    assert [d.name for d in web.snapshots[0].disks] == ["vda", "vdb"]
    for vm in catalog.vms:
        first, *later = vm.snapshots
        assert all(d.backing is None for d in first.disks)
        for parent, child in zip(vm.snapshots, later, strict=False):
            assert child.parent == parent.id
            for disk in child.disks:
                assert disk.format == "qcow2"
                assert disk.backing is not None and disk.backing.parent.parent == parent.path
                assert disk.file_size < 2 * MIB  # only the changes
    configs = {vm.name: vm.snapshots[0].config_files[0] for vm in catalog.vms}
    assert configs["web-01"].name == "domain.xml"
    assert configs["web-01"].read_text().startswith("<domain type='kvm'>")
    assert configs["db-01"].name == "config.ovf"
    assert "<ovf:Envelope" in configs["db-01"].read_text()

    assert len(sample.expected) == 9
    checked = 0
    for vm in catalog.vms:
        for snap in vm.snapshots:
            for disk in snap.disks:
                flat = tmp_path / "flat.raw"
                subprocess.run(
                    ["qemu-img", "convert", "-O", "raw", str(disk.path), str(flat)], check=True
                )
                for path, content in sample.expected[(vm.name, snap.name, disk.name)].items():
                    if content is None:
                        with pytest.raises(FileNotFoundError):
                            read_guest_file(flat, path)
                    else:
                        assert read_guest_file(flat, path) == content, (vm.name, snap.name, path)
                    checked += 1
                flat.unlink()
    assert checked > 50
    # The snapshots really differ: a file changed between the second and third snapshot.
    web_vda = [sample.expected[("web-01", s.name, "vda")] for s in web.snapshots]
    assert web_vda[1]["/home/alice/notes.txt"] != web_vda[2]["/home/alice/notes.txt"]
    assert web_vda[0]["/var/log/messages"] is not None and web_vda[1]["/var/log/messages"] is None


def test_sample_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    result = run("repo", "sample", tmp_path)
    assert result.exit_code == 1
    assert "directory is not empty" in result.output
