"""Fixtures: one private libvirtd per session, TCG domains without OS, a fresh repository.

Every domain gets fresh images (checkpoint bitmaps stay in a qcow2 after its transient
domain is gone). Teardown checks that nothing of ours is left: no domain, no backup job
directory, no qemu-nbd child of this process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapfs.catalog import writer
from tests.libvirt.daemon import (
    LibvirtDaemon,
    domain_xml,
    qemu_io,
    start_or_skip,
    why_unavailable,
)

MiB = 1 << 20


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[LibvirtDaemon]:
    daemon = LibvirtDaemon()
    start_or_skip(daemon, why_unavailable(), "libvirt")
    try:
        yield daemon
    finally:
        tini = daemon._proc.pid if daemon._proc else None
        daemon.stop()
        if tini is not None:
            # Every process of the daemon's group (libvirtd, QEMU) must be gone.
            left = subprocess.run(
                ["pgrep", "-g", str(tini)], capture_output=True, text=True
            ).stdout.split()
            assert not left, f"processes left behind by libvirtd: {left}"


@pytest.fixture
def conn(libvirtd: LibvirtDaemon) -> Iterator[Any]:
    import libvirt

    # Expected failures (no job to abort in teardown) are not worth printing.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open(libvirtd.uri)
    try:
        yield c
    finally:
        c.close()


@dataclass
class TestDomain:
    """A running TCG domain and a model of what its disks hold."""

    dom: Any
    images: dict[str, Path]
    model: dict[str, bytearray] = field(default_factory=dict)

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        qemu_io(self.dom, target, f"write -P {pattern:#x} {offset} {length}")
        self.model[target][offset : offset + length] = bytes([pattern]) * length

    def snapshot(self) -> dict[str, bytes]:
        return {t: bytes(m) for t, m in self.model.items()}


def _qemu_nbd_children() -> list[str]:
    return subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "qemu-nbd"], capture_output=True, text=True
    ).stdout.split()


@pytest.fixture
def make_domain(conn: Any, tmp_path: Path) -> Iterator[Callable[..., TestDomain]]:
    before = set(_qemu_nbd_children())
    made: list[Any] = []

    def make(
        name: str, disks: dict[str, int], sources: dict[str, Path] | None = None
    ) -> TestDomain:
        """``sources``: qcow2 images to use for some targets (their model is not tracked)."""
        images = {}
        for target, size in disks.items():
            image = tmp_path / f"{name}-{target}.qcow2"
            if sources and target in sources:
                image = sources[target]
            else:
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True
                )
            images[target] = image
        dom = conn.createXML(domain_xml(name, list(images.items())), 0)
        made.append(dom)
        return TestDomain(dom, images, {t: bytearray(s) for t, s in disks.items()})

    try:
        yield make
    finally:
        for dom in made:
            with contextlib.suppress(Exception):
                dom.abortJob()
            with contextlib.suppress(Exception):
                dom.destroy()
        assert not list(Path("/tmp").glob("snapfs-job-*/owner")) or all(
            int(p.read_text()) != os.getpid() for p in Path("/tmp").glob("snapfs-job-*/owner")
        ), "a backup job directory was left behind"
        # Servers of other suites' session fixtures (guestfs tests) may be running: only the
        # ones this test started count.
        children = set(_qemu_nbd_children()) - before
        assert not children, f"qemu-nbd left running: {sorted(children)}"


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    writer.init_repository(root)
    return root


@pytest.fixture
def no_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A settings file of this test only (none of the machine's)."""
    path = tmp_path / "settings.toml"
    monkeypatch.setenv("SNAPFS_CONFIG", str(path))
    return path
