"""Changed-extent reports of snapshot disks: what is allocated, what differs from the parent.

Owns the JSON shape of ``disks/<disk>.extents.json`` (docs/layout.md), modelled on the OVM
exporter's chunks: lists of ``{"start", "length"}`` in bytes, sorted, merged where
contiguous. For repository snapshots the facts come from the qcow2 allocation of the backing
chain (``qemu-img map``: depth 0 is the snapshot's own image, so what is present there is
exactly what an incremental snapshot changed relative to its parent).

Blocking (runs qemu-img): call from a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from snapfs.catalog import qemu_img
from snapfs.catalog.model import Disk, Snapshot


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[dict[str, int]]:
    """(start, length) pairs → sorted chunks, contiguous or overlapping ones merged."""
    merged: list[list[int]] = []
    for start, length in sorted(ranges):
        if length <= 0:
            continue
        if merged and start <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], start + length)
            merged[-1][1] = end - merged[-1][0]
        else:
            merged.append([start, length])
    return [{"start": s, "length": n} for s, n in merged]


def render_report(
    snap: Snapshot,
    disk: Disk,
    allocated_ranges: Iterable[tuple[int, int]],
    changed_ranges: Iterable[tuple[int, int]] | None,
    *,
    parent: str | None,
) -> bytes:
    """The JSON report; ``changed_ranges`` None when nothing says what changed."""
    allocated = merge_ranges(allocated_ranges)
    changed = None if changed_ranges is None else merge_ranges(changed_ranges)
    doc = {
        "disk": disk.name,
        "snapshot": snap.id,
        "parent": parent,
        "virtual_size": disk.virtual_size,
        "allocated_bytes": sum(c["length"] for c in allocated),
        "changed_bytes": None if changed is None else sum(c["length"] for c in changed),
        "allocated": allocated,
        "changed": changed,
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def extent_report(snap: Snapshot, disk: Disk) -> bytes:
    """The report for a repository snapshot disk, from its qcow2 allocation."""
    extents = qemu_img.map_extents(disk.path, disk.format)
    # Present in the snapshot's own image (depth 0): written since the parent, data or zeros.
    return render_report(
        snap,
        disk,
        ((e.start, e.length) for e in extents if e.data),
        ((e.start, e.length) for e in extents if e.depth == 0 and e.present),
        parent=snap.parent if disk.backing is not None else None,
    )
