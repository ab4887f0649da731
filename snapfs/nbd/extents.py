"""Which byte ranges of an export hold data, from NBD block status (``base:allocation``).

Owns the ``ExtentMap`` (an immutable sorted list of data ranges) and the synchronous query
that builds it. Ranges reported as zero (holes, or allocated zeros) need no read: the mount
answers them with zero bytes. Only immutable exports (snapshot disks) get a map; a writable
export would make it stale.

Thread rules: ``query_extents`` blocks (NBD round trips): call it in a worker thread, on a
handle nobody else is using. ``ExtentMap`` is plain data, safe anywhere.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nbd

# Ask for block status in chunks below the protocol's 32-bit length limit.
_QUERY_CHUNK = 1 << 30


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    data: bool  # False: reads as zeros, answer without the server


class ExtentMap:
    """Data ranges of a disk of ``size`` bytes; everything else reads as zeros."""

    def __init__(self, size: int, data_ranges: list[tuple[int, int]]) -> None:
        self.size = size
        merged: list[tuple[int, int]] = []
        for start, end in sorted(data_ranges):
            if start >= end:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    @property
    def data_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def has_data(self, offset: int, length: int) -> bool:
        """Whether any byte of ``[offset, offset+length)`` is data (not a hole)."""
        i = bisect.bisect_right(self._ends, offset)
        return i < len(self._starts) and self._starts[i] < offset + length

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Split ``[offset, offset+length)`` into data and zero segments, in order."""
        end = offset + length
        pos = offset
        i = bisect.bisect_right(self._ends, offset)
        while pos < end:
            if i < len(self._starts) and self._starts[i] < end:
                dstart = max(self._starts[i], pos)
                if dstart > pos:
                    yield Segment(pos, dstart, False)
                dend = min(self._ends[i], end)
                yield Segment(dstart, dend, True)
                pos = dend
                i += 1
            else:
                yield Segment(pos, end, False)
                pos = end


def query_context(handle: Any, size: int, context: str) -> list[tuple[int, int, int]]:
    """All (start, length, flags) extents of ``context`` over the export (blocking)."""
    result: list[tuple[int, int, int]] = []
    pos = 0

    def collect(metacontext: str, offset: int, entries: list[int], error: Any) -> int:
        nonlocal pos
        if metacontext != context:
            return 0
        at = offset
        for length, flags in zip(entries[0::2], entries[1::2], strict=True):
            end = min(at + length, size)
            if end > at:
                result.append((at, end - at, flags))
            at += length
        pos = max(pos, at)
        return 0

    while pos < size:
        before = pos
        handle.block_status(min(_QUERY_CHUNK, size - pos), pos, collect)
        if pos <= before:  # a server that answers nothing would loop forever
            raise RuntimeError(f"no block status for {context} at offset {pos}")
    return result


def query_extents(handle: Any, size: int) -> ExtentMap:
    """Build the map from ``base:allocation`` on a connected handle (blocking)."""
    if not handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        return ExtentMap(size, [(0, size)])
    extents = query_context(handle, size, nbd.CONTEXT_BASE_ALLOCATION)
    return ExtentMap(size, [(s, s + n) for s, n, flags in extents if not flags & nbd.STATE_ZERO])


def dirty_ranges(handle: Any, size: int, bitmap: str) -> list[tuple[int, int]]:
    """(start, length) ranges a ``qemu:dirty-bitmap:`` context marks dirty (blocking)."""
    context = bitmap if bitmap.startswith("qemu:") else f"qemu:dirty-bitmap:{bitmap}"
    if not handle.can_meta_context(context):
        raise RuntimeError(f"the server does not offer {context}")
    # Bit 0 of a dirty-bitmap context's flags means dirty.
    return [(s, n) for s, n, flags in query_context(handle, size, context) if flags & 1]
