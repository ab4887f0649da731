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
from collections.abc import Mapping
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


def probe(g: Any, labels: Mapping[str, str]) -> DeviceNames | None:
    """Read the drive label links in the appliance: one ``debug sh`` call.

    ``labels`` is ``list_disk_labels()`` (label → API name, partitions included). None when
    a link is missing or unreadable: callers must then not use shell scripts that take device
    names.
    """
    # Partitions have labels too ("da1"): the drives' own labels are letters only.
    ordered = sorted(label for label in labels if re.fullmatch(r"[A-Za-z]+", label))
    if not ordered:
        return None
    links = " ".join(f"/dev/disk/guestfs/{label}" for label in ordered)
    try:
        kernel = g.debug("sh", [f"readlink -f {links}; true"]).split()
    except (RuntimeError, UnicodeError) as exc:
        log.info("drive label links unreadable: %s", exc)
        return None
    if len(kernel) != len(ordered) or not all(_DISK_OR_PARTITION.fullmatch(k) for k in kernel):
        log.info("drive label links %s resolve to %s: no kernel names", ordered, kernel)
        return None
    names = DeviceNames({labels[label]: k for label, k in zip(ordered, kernel, strict=True)})
    if any(labels[label] != k for label, k in zip(ordered, kernel, strict=True)):
        log.info("appliance kernel names differ from the API's: %s", names)
    return names
