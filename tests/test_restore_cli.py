"""``snapfs restore ...`` end to end on a copy of the sample repository (real qemu-img)."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from snapfs import restore_cli
from snapfs.catalog import qemu_img, repo
from snapfs.errors import SnapfsUserError
from snapfs.restore import store
from snapfs.sample import SampleRepository
from tests.imaging import run


@pytest.fixture
def repo_copy(sample_repo: SampleRepository, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    subprocess.run(["cp", "-a", "--sparse=always", str(sample_repo.path), str(dest)], check=True)
    return dest


def invoke(*args: str | Path) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(restore_cli.restore_group, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_create_ls_export_commit_rm(repo_copy: Path, tmp_path: Path) -> None:
    code, out, err = invoke("create", repo_copy, "--vm", "web-01", "--disk", "vda")
    assert code == 0, err
    disk = store.get_restore(repo_copy, "web-01@" + out.split("@")[1] + "@vda")
    assert disk.source is not None and disk.source.vm_name == "web-01"
    catalog = repo.load_repository(repo_copy)
    web = next(vm for vm in catalog.vms if vm.name == "web-01")
    latest = web.latest()
    assert latest is not None and disk.source.snapshot_id == latest.id
    vda = next(d for d in latest.disks if d.name == "vda")
    assert qemu_img.compare(disk.path, vda.path, a_format="qcow2", b_format=vda.format)

    code, out, _ = invoke("ls", repo_copy)
    assert code == 0 and disk.name in out and "web-01 / " in out

    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 64k", disk.path)
    exported = tmp_path / "vda.vmdk"
    code, out, err = invoke("export", repo_copy, disk.name, exported, "--format", "vmdk")
    assert code == 0, err
    assert qemu_img.compare(exported, disk.path, a_format="vmdk", b_format="qcow2")
    assert not qemu_img.compare(exported, vda.path, a_format="vmdk", b_format=vda.format)
    code, _, err = invoke("export", repo_copy, disk.name, exported)
    assert code == 1 and "already exists" in err

    code, out, err = invoke("commit", repo_copy, disk.name, "--vm", "web-01")
    assert code == 0, err
    assert f"incremental on {latest.id}" in out
    catalog = repo.load_repository(repo_copy)
    assert catalog.problems == ()
    web = next(vm for vm in catalog.vms if vm.name == "web-01")
    new = web.latest()
    assert new is not None and len(web.snapshots) == 4 and new.parent == latest.id
    (new_disk,) = new.disks
    assert qemu_img.compare(new_disk.path, disk.path, a_format="qcow2", b_format="qcow2")
    own = [e for e in qemu_img.map_extents(new_disk.path, "qcow2") if e.data and e.depth == 0]
    assert [(e.start, e.length) for e in own] == [(4 << 20, 64 << 10)]
    assert [p.name for p in new.config_files] == ["domain.xml"]

    code, _, err = invoke("rm", repo_copy, disk.name)
    assert code == 0, err
    assert store.list_restores(repo_copy) == ([], [])
    code, _, err = invoke("rm", repo_copy, disk.name)
    assert code == 1 and "no restore disk named" in err


def test_create_errors_are_one_line(repo_copy: Path) -> None:
    for args, message in [
        (["--vm", "nope", "--disk", "vda"], "no VM named 'nope'"),
        (["--vm", "web-01", "--disk", "vda", "--size", "1G"], "not both"),
        (["--size", "ten"], "bad size 'ten'"),
        (["--size", "1G", "--name", ".x"], "must not start with '.'"),
    ]:
        code, _, err = invoke("create", repo_copy, *args)
        assert code == 1, args
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_not_a_repository(tmp_path: Path) -> None:
    code, _, err = invoke("ls", tmp_path)
    assert code == 1 and "neither a snapfs repository nor a snapfs mount" in err


def test_mountpoint_maps_to_repository(repo_copy: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    text = f"snapfs:{repo_copy} {mnt} fuse.snapfs ro 0 0\n"
    assert restore_cli.resolve_repository(mnt, text) == repo_copy
    assert restore_cli.resolve_repository(repo_copy, text) == repo_copy
    with pytest.raises(SnapfsUserError, match="relative path"):
        restore_cli.resolve_repository(mnt, f"snapfs:repo {mnt} fuse.snapfs ro 0 0\n")


def test_rm_and_commit_refused_while_mounted(
    repo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke("create", repo_copy, "--size", "1M", "--name", "scratch")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"snapfs:{repo_copy} /mnt/backup fuse.snapfs ro 0 0\n")
    monkeypatch.setattr(store, "_MOUNTS_FILE", mounts)
    for command in (["rm"], ["commit", "--vm", "web-01"], ["export", "--format", "raw"]):
        extra = [tmp_path / "o.raw"] if command[0] == "export" else []
        code, _, err = invoke(command[0], repo_copy, "scratch", *extra, *command[1:])
        assert code == 1 and "mounted at /mnt/backup" in err, command
    assert store.get_restore(repo_copy, "scratch").error is None
    code, _, err = invoke("rm", repo_copy, "scratch", "--force")
    assert code == 0, err


def test_vm_config_libvirt(repo_copy: Path, tmp_path: Path) -> None:
    invoke("create", repo_copy, "--vm", "web-01", "--disk", "vda", "--name", "a")
    invoke("create", repo_copy, "--vm", "web-01", "--disk", "vdb", "--name", "b")
    code, out, err = invoke(
        "vm-config", repo_copy, "a", "--disk", "vdb=b", "--name", "web-02", "--cpus", "4"
    )
    assert code == 0, err
    root = ET.fromstring(out)
    assert root.findtext("name") == "web-02" and root.findtext("vcpu") == "4"
    assert root.findtext("uuid") not in (None, "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f")
    files = [s.get("file") for s in root.iter("source")]
    assert files == [
        str(store.get_restore(repo_copy, "a").path),
        str(store.get_restore(repo_copy, "b").path),
    ]
    code, _, err = invoke("vm-config", repo_copy, "a", "--out", tmp_path)
    assert code == 0 and (tmp_path / "web-01-restored.xml").is_file()
    assert "disk vdb dropped" in err


def test_vm_config_ovf(repo_copy: Path) -> None:
    invoke("create", repo_copy, "--vm", "db-01", "--disk", "vda", "--name", "d")
    code, out, err = invoke("vm-config", repo_copy, "d", "--memory", "4096")
    assert code == 0, err
    assert "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a" not in out
    root = ET.fromstring(out)
    (file,) = root.iter("File")
    assert file.get("{http://schemas.dmtf.org/ovf/envelope/1/}href") == str(
        store.get_restore(repo_copy, "d").path
    )
    assert "<Name>db-01-restored</Name>" in out and ">4096<" in out


def test_vm_config_needs_a_config_for_empty_disks(repo_copy: Path) -> None:
    invoke("create", repo_copy, "--size", "1G", "--name", "e")
    code, _, err = invoke("vm-config", repo_copy, "e", "--disk", "vda=e")
    assert code == 1 and "--config" in err


def test_restore_json_layout(repo_copy: Path) -> None:
    invoke("create", repo_copy, "--vm", "db-01", "--snapshot", "latest", "--disk", "vda")
    (entry,) = (repo_copy / "restore").iterdir()
    data = json.loads((entry / "restore.json").read_text())
    assert set(data) == {"name", "created", "source", "virtual_size", "format"}
    assert data["name"] == entry.name and data["source"]["vm_id"] == "db-01"
