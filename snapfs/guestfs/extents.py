"""The fast path: reading guest file data straight from the NBD export.

The appliance reports each regular file's physical extents (``filefrag -e -b1``, FIEMAP,
one batched call per directory) and the block-device stack under each filesystem (partition
start from sysfs, ``dmsetup table`` linear segments for LVM). A read is then translated to
byte ranges of the raw disks and served by ``ReadRaw`` (plain libnbd preads), bypassing the
appliance, which moves data at ~15 MB/s under TCG.

Anything that cannot be mapped exactly returns None and the caller falls back to the
appliance: extents flagged inline/encoded/encrypted/unknown/delalloc/not_aligned, a size
mismatch, a device-mapper target other than ``linear``, an unknown device, or a filesystem
whose FIEMAP addresses are not device offsets (btrfs reports its own logical addresses, so
only FASTPATH_FSTYPES qualify). Unwritten (preallocated) extents and holes read as zeros; the
last extent is cut at the file size.

Thread rules: ``*_script`` builders and ``parse_*`` are pure (the scripts run in the session's
worker thread); ``read_mapped`` is async on the trio loop and only awaits ``ReadRaw``.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .model import Extent, ReadRaw
from .shell import sh_bytes

# Filesystems whose FIEMAP physical offsets are byte offsets on their block device.
FASTPATH_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat"})

# filefrag flags that do not change where the bytes are.
_HARMLESS_FLAGS = frozenset({"last", "eof", "merged", "shared"})
# A single ReadRaw request is kept below NBD's usual 32 MiB maximum.
_RAW_MAX = 8 << 20
_SECTOR = 512


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes [start, start+length) of a block device live on disk ``disk`` at ``disk_offset``."""

    start: int
    length: int
    disk: int
    disk_offset: int


DeviceMap = tuple[Segment, ...]


# -- extents ---------------------------------------------------------------------------------


def filefrag_script(dir_path: bytes) -> str:
    """List (inode, then filefrag output) for every non-empty regular file of a directory.

    Both finds walk the directory in the same order, so the N-th filefrag section belongs to
    the N-th inode. Names with a newline are left out (they could forge lines); those files
    are read through the appliance.
    """
    select = '-mindepth 1 -maxdepth 1 -type f -size +0c ! -name "*${nl}*"'
    return "\n".join(
        [
            sh_bytes("D", dir_path),
            'cd -- "$D" || exit 3',
            "nl=$(printf '\\nx'); nl=${nl%x}",
            f"find . {select} -printf '%i\\n'",
            "echo /F",
            f"find . {select} -exec filefrag -e -b1 {{}} + 2>/dev/null",
            "true",
        ]
    )


# Files per subtree batch: one appliance script for up to this many files (its output is
# about 150 bytes a file), instead of one per directory. Under TCG every process started in
# the appliance costs 40-100 ms, so per-directory scripts made rsync of a 20,000-file tree
# spend three minutes starting processes (docs/benchmarks.md).
SUBTREE_BATCH = 50_000


def filefrag_subtree_script(dir_path: bytes, limit: int = SUBTREE_BATCH) -> str:
    """Like ``filefrag_script`` for every regular file below a directory, in one script.

    The file list is taken once (NUL-separated, capped at ``limit``), so the inode list and
    the filefrag sections come from the same list in the same order. Prints ``/CAPPED`` first
    when the cap cut the list (the subtree is then not complete).
    """
    select = '-type f -size +0c ! -name "*${nl}*"'
    return "\n".join(
        [
            sh_bytes("D", dir_path),
            'cd -- "$D" || exit 3',
            "nl=$(printf '\\nx'); nl=${nl%x}",
            "L=/tmp/snapfs-filefrag.list",
            f"find . -xdev {select} -print0 | head -z -n {limit + 1} > $L",
            f"[ \"$(tr -cd '\\000' < $L | wc -c)\" -gt {limit} ] && echo /CAPPED",
            f"head -z -n {limit} $L | xargs -0 -r stat -c %i",
            "echo /F",
            f"head -z -n {limit} $L | xargs -0 -r filefrag -e -b1 2>/dev/null",
            "rm -f $L",
            "true",
        ]
    )


def parse_filefrag_subtree(
    output: bytes,
) -> tuple[bool, dict[int, tuple[int, list[Extent] | None]]]:
    """(complete, {guest inode: (size, extents or None)}) from ``filefrag_subtree_script``."""
    capped = output.startswith(b"/CAPPED\n")
    if capped:
        output = output[len(b"/CAPPED\n") :]
    return not capped, parse_filefrag(output)


_SIZE_LINE = re.compile(rb"^File size of .* is (\d+) \(")


def parse_filefrag(output: bytes) -> dict[int, tuple[int, list[Extent] | None]]:
    """{guest inode: (size filefrag saw, extents or None if unmappable)} from filefrag_script.

    Returns {} when the sections do not line up with the inode list (then nothing is trusted).
    """
    head, sep, body = output.partition(b"/F\n")
    if not sep:
        return {}
    inodes = [int(x) for x in head.split()]
    sections: list[tuple[int, list[bytes]]] = []
    for line in body.split(b"\n"):
        m = _SIZE_LINE.match(line)
        if m:
            sections.append((int(m.group(1)), []))
        elif sections:
            sections[-1][1].append(line)
    if len(sections) != len(inodes):
        return {}
    result: dict[int, tuple[int, list[Extent] | None]] = {}
    for ino, (size, lines) in zip(inodes, sections, strict=True):
        result[ino] = (size, _parse_extent_lines(lines))
    return result


def _parse_extent_lines(lines: Sequence[bytes]) -> list[Extent] | None:
    extents: list[Extent] = []
    for raw in lines:
        line = raw.decode("ascii", "replace")
        parts = [p.strip() for p in line.split(":")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue  # header, "N extents found", "Filesystem type is"
        try:
            logical = int(parts[1].split("..")[0])
            physical = int(parts[2].split("..")[0])
            length = int(parts[3])
        except ValueError:
            return None
        flags = set(filter(None, parts[-1].split(","))) if len(parts) > 4 else set()
        unwritten = "unwritten" in flags
        flags.discard("unwritten")
        if flags - _HARMLESS_FLAGS:
            return None
        extents.append(Extent(logical, physical, length, unwritten))
    extents.sort(key=lambda e: e.logical)
    for a, b in itertools.pairwise(extents):
        if a.logical + a.length > b.logical:
            return None
    return extents


# -- device stack ----------------------------------------------------------------------------


def devmap_script(device: str) -> str:
    """Print every block device (name, maj:min, start, size), dm names and ``dmsetup table``.

    Reads sysfs with the ``read`` builtin: a fork per device would cost ~40 ms each.
    """
    return "\n".join(
        [
            "for d in /sys/class/block/*; do n=${d##*/}; read -r dev < $d/dev; "
            "read -r size < $d/size; start=-; "
            "if [ -r $d/start ]; then read -r start < $d/start; fi; "
            'echo "B $n $dev $start $size"; '
            "if [ -r $d/dm/name ]; then read -r dmn < $d/dm/name; "
            'echo "D $n $dmn"; fi; done',
            f"echo \"R $(readlink -f '{device}')\"",
            "dmsetup table 2>/dev/null | sed 's/^/T /'",
            "true",
        ]
    )


def parse_devmap(output: bytes, disk_index: Mapping[str, int]) -> DeviceMap | None:
    """Where the bytes of the device named by the script's R line live on the raw disks.

    ``disk_index`` maps appliance disk names (sda, sdb, …) to the session's disk positions.
    """
    blocks: dict[str, tuple[str, str, int]] = {}  # name → (maj:min, start, size bytes)
    by_devno: dict[str, str] = {}
    dm_names: dict[str, str] = {}  # dm-0 → vg0-root
    tables: dict[str, list[list[str]]] = {}
    target = ""
    for raw in output.decode("utf-8", "replace").splitlines():
        parts = raw.split()
        if not parts:
            continue
        if parts[0] == "B" and len(parts) == 5:
            blocks[parts[1]] = (parts[2], parts[3], int(parts[4]) * _SECTOR)
            by_devno[parts[2]] = parts[1]
        elif parts[0] == "D" and len(parts) == 3:
            dm_names[parts[1]] = parts[2]
        elif parts[0] == "R" and len(parts) == 2:
            target = parts[1].rsplit("/", 1)[-1]
        elif parts[0] == "T" and len(parts) >= 5:
            tables.setdefault(parts[1].rstrip(":"), []).append(parts[2:])

    def resolve(name: str, depth: int = 0) -> list[Segment] | None:
        if name not in blocks or depth > 8:
            return None
        _devno, start, size = blocks[name]
        if name in disk_index:
            return [Segment(0, size, disk_index[name], 0)]
        m = re.fullmatch(r"(sd[a-z]+|vd[a-z]+)(\d+)", name)
        if m and start != "-" and m.group(1) in disk_index:
            return [Segment(0, size, disk_index[m.group(1)], int(start) * _SECTOR)]
        dm_name = dm_names.get(name)
        if dm_name is None or dm_name not in tables:
            return None
        segments: list[Segment] = []
        for row in tables[dm_name]:
            # "<start> <length> linear <maj:min> <offset>", all in 512-byte sectors
            if len(row) != 5 or row[2] != "linear":
                return None
            seg_start, seg_len = int(row[0]) * _SECTOR, int(row[1]) * _SECTOR
            under_name = by_devno.get(row[3])
            under = resolve(under_name, depth + 1) if under_name else None
            if under is None:
                return None
            pieces = translate(tuple(under), int(row[4]) * _SECTOR, seg_len)
            if pieces is None:
                return None
            pos = seg_start
            for disk, off, n in pieces:
                segments.append(Segment(pos, n, disk, off))
                pos += n
        return segments

    segments = resolve(target) if target else None
    return tuple(segments) if segments else None


def translate(devmap: DeviceMap, offset: int, length: int) -> list[tuple[int, int, int]] | None:
    """[(disk, disk offset, length)] covering device bytes [offset, offset+length)."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        for seg in devmap:
            if seg.start <= pos < seg.start + seg.length:
                n = min(end, seg.start + seg.length) - pos
                out.append((seg.disk, seg.disk_offset + pos - seg.start, n))
                pos += n
                break
        else:
            return None
    return out


# -- the read --------------------------------------------------------------------------------


def plan_read(
    extents: Sequence[Extent], devmap: DeviceMap, file_size: int, offset: int, length: int
) -> list[tuple[int, int, int]] | None:
    """The read as [(disk or -1 for zeros, disk offset, length)], or None if unmappable."""
    end = min(file_size, offset + length)
    pos = offset
    plan: list[tuple[int, int, int]] = []
    for ext in extents:
        if pos >= end:
            break
        ext_end = ext.logical + ext.length
        if ext_end <= pos:
            continue
        if ext.logical > pos:  # a hole before this extent
            n = min(ext.logical, end) - pos
            plan.append((-1, 0, n))
            pos += n
            if pos >= end:
                break
        n = min(ext_end, end) - pos
        if ext.unwritten:
            plan.append((-1, 0, n))
        else:
            pieces = translate(devmap, ext.physical + (pos - ext.logical), n)
            if pieces is None:
                return None
            plan.extend(pieces)
        pos += n
    if pos < end:
        plan.append((-1, 0, end - pos))  # a hole at the end of the file
    return plan


async def read_mapped(
    plan: Sequence[tuple[int, int, int]], disk_names: Sequence[str], read_raw: ReadRaw
) -> bytes:
    out = bytearray()
    for disk, offset, length in plan:
        if disk < 0:
            out += bytes(length)
            continue
        done = 0
        while done < length:
            n = min(_RAW_MAX, length - done)
            data = await read_raw(disk_names[disk], offset + done, n)
            if len(data) != n:
                raise OSError(f"short raw read: {len(data)} of {n} bytes")
            out += data
            done += n
    return bytes(out)


class WindowCache:
    """Whole disk windows around small mapped reads, for readers of many small files.

    A directory's small files usually sit close together on the disk, so a reader going
    through them (rsync, cp -r, tar) would send one NBD request per file. After a second
    small read lands in the same ``window``-aligned window, the whole window is read once and
    the following small reads there are served from memory. Only for immutable data (a
    snapshot): nothing here is ever invalidated. Reads bigger than ``small`` or spanning two
    windows go straight through.
    """

    def __init__(
        self,
        read_raw: ReadRaw,
        *,
        window: int = 1 << 20,
        max_windows: int = 32,
        small: int = 128 << 10,
    ) -> None:
        self._read_raw = read_raw
        self._window = window
        self._max_windows = max_windows
        self._small = small
        self._windows: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        # Windows that had one small read (bounded: only recent ones matter).
        self._touched: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.hits = 0
        self.fills = 0

    async def __call__(self, disk: str, offset: int, length: int) -> bytes:
        w = self._window
        first = offset // w
        if length > self._small or (offset + length - 1) // w != first:
            return await self._read_raw(disk, offset, length)
        key = (disk, first)
        start = offset - first * w
        data = self._windows.get(key)
        if data is not None and start + length <= len(data):
            self._windows.move_to_end(key)
            self.hits += 1
            return data[start : start + length]
        if key in self._touched:
            try:
                data = await self._read_raw(disk, first * w, w)
            except Exception:  # past the disk's end, say: then read just the piece
                data = b""
            if len(data) == w:
                self.fills += 1
                self._windows[key] = data
                while len(self._windows) > self._max_windows:
                    self._windows.popitem(last=False)
                return data[start : start + length]
        self._touched[key] = None
        self._touched.move_to_end(key)
        while len(self._touched) > 4 * self._max_windows:
            self._touched.popitem(last=False)
        return await self._read_raw(disk, offset, length)
