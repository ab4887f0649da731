"""Translating between libguestfs API device names and the appliance kernel's names.

The libguestfs daemon renames devices: its API calls /dev/sda the first drive added, whatever
name the appliance kernel gave it (the kernel scans disks asynchronously, so the first drive
can be the kernel's sdb). Shell scripts run in the appliance (``debug sh``: blkid, sysfs,
dmsetup) see the kernel's names. Anything passing a device name between the two must
translate, or it describes the wrong disk. This module owns that translation, built from the
drive label links libguestfs makes (``/dev/disk/guestfs/<label>``), which follow the drive and
not the scan order.

Only whole disks and their partitions differ; LVM, device-mapper and md names are the same on
both sides.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# A whole disk as the appliance names it (virtio-scsi sdX, virtio-blk vdX) and its partitions.
_DISK_OR_PARTITION = re.compile(r"(/dev/(?:sd|vd|hd|xvd)[a-z]+)(\d*)")


class DeviceNames:
    """Both directions of the API ↔ kernel name mapping for one appliance launch."""

    def __init__(self, api_to_kernel: Mapping[str, str]) -> None:
        self._to_kernel = dict(api_to_kernel)
        self._to_api = {k: a for a, k in api_to_kernel.items()}

    def to_kernel(self, device: str) -> str | None:
        """The kernel's name for an API device name; None when it names an unknown disk."""
        return self._translate(device, self._to_kernel)

    def to_api(self, device: str) -> str | None:
        """The API's name for a kernel device name; None when it names an unknown disk."""
        return self._translate(device, self._to_api)

    def kernel_disk_index(self, api_disks: list[str]) -> dict[str, int]:
        """{kernel disk base name (sdb): position of its API name in ``api_disks``}."""
        out: dict[str, int] = {}
        for i, api in enumerate(api_disks):
            kernel = self._to_kernel.get(api)
            if kernel is not None:
                out[kernel.rsplit("/", 1)[-1]] = i
        return out

    @staticmethod
    def _translate(device: str, table: Mapping[str, str]) -> str | None:
        m = _DISK_OR_PARTITION.fullmatch(device)
        if m is None:
            # Not a disk or partition: LVs, /dev/mapper, md keep their names. Anything that is
            # not a /dev path (btrfsvol:…) has no kernel name at all.
            return device if device.startswith("/dev/") else None
        disk = table.get(m.group(1))
        return None if disk is None else disk + m.group(2)

    def __repr__(self) -> str:
        return f"DeviceNames({self._to_kernel})"


@dataclass
class Probe:
    """What one shell run in a fresh appliance saw: the kernel's names of the drives, their
    partitions (kernel names) and ``blkid -o export`` of all of them."""

    names: DeviceNames | None
    partitions: list[str] = field(default_factory=list)
    blkid: str = ""


_END = "=== snapfs blkid ==="


def probe_script(labels: Sequence[str]) -> str:
    """One ``debug sh`` script: resolve the drive label links, glob each disk's partitions
    (shell builtins only: a process start costs ~50 ms under TCG), then one blkid run."""
    links = " ".join(f"/dev/disk/guestfs/{label}" for label in labels)
    return "\n".join(
        [
            f"K=$(readlink -f {links})",
            'echo "K" $K',
            'P=; for d in $K; do for p in "$d"[0-9]*; do [ -b "$p" ] && P="$P $p"; done; done',
            'echo "P" $P',
            f"echo '{_END}'",
            # Only DEVNAME, TYPE and PTTYPE are printed (ASCII; a label could be any bytes
            # and break the binding's UTF-8 decoding).
            '[ -n "$K" ] && blkid -c /dev/null -o export -s TYPE -s PTTYPE $K $P',
            "true",
        ]
    )


def drive_labels(labels: Mapping[str, str]) -> list[str]:
    """The drives' own labels (letters only; partitions have labels too: "da1"), sorted."""
    return sorted(label for label in labels if re.fullmatch(r"[A-Za-z]+", label))


def parse_probe(out: str, labels: Mapping[str, str]) -> Probe:
    """``labels`` is ``list_disk_labels()`` (label → API name, partitions included)."""
    ordered = drive_labels(labels)
    head, _, blkid = out.partition(_END + "\n")
    kernel: list[str] = []
    partitions: list[str] = []
    for line in head.splitlines():
        if line.startswith("K"):
            kernel = line.split()[1:]
        elif line.startswith("P"):
            partitions = line.split()[1:]
    if (
        not ordered
        or len(kernel) != len(ordered)
        or not all(_DISK_OR_PARTITION.fullmatch(k) for k in [*kernel, *partitions])
    ):
        log.info("drive label links %s resolve to %s: no kernel names", ordered, kernel)
        return Probe(None)
    names = DeviceNames({labels[label]: k for label, k in zip(ordered, kernel, strict=True)})
    if any(labels[label] != k for label, k in zip(ordered, kernel, strict=True)):
        log.info("appliance kernel names differ from the API's: %s", names)
    return Probe(names, partitions, blkid)


def probe(g: Any, labels: Mapping[str, str]) -> Probe:
    """Run ``probe_script`` in the appliance (one ``debug sh``; nothing need be mounted)."""
    ordered = drive_labels(labels)
    if not ordered:
        return Probe(None)
    try:
        out: str = g.debug("sh", [probe_script(ordered)])
    except (RuntimeError, UnicodeError) as exc:
        log.info("drive label links unreadable: %s", exc)
        return Probe(None)
    return parse_probe(out, labels)
