"""Extent maps of ext4 files read on the host, straight from the volume's bytes.

Owns parsing the ext4 on-disk format as far as file data placement goes: the superblock,
the group descriptors, inodes and their extent trees. The bytes come from the NBD export
(through the volume's device map), so this costs a few host reads per directory, where
FIEMAP in the appliance costs an open, an ioctl and a close per file under TCG (measured
here: a walk of 20,000 files takes 2.7 s without FIEMAP and 8.2 s with it).

Only what can be trusted is mapped; everything else returns None and the caller keeps the
appliance's answer (FIEMAP or ``pread``):
- a filesystem whose journal needs recovery (the appliance's kernel replays it into its
  overlay, so its view differs from the export's bytes), with orphans to process, without
  the extents feature, with meta_bg, bigalloc or compression;
- a file that is not extent-mapped (ext2/3 block maps), inline, encrypted, or whose inode
  does not look like the regular file of that size the appliance listed (size, mode).

Thread rules: pure parsing plus awaiting a ``VolumeReader`` (async, on the trio loop).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .model import Extent

# Reads ``length`` bytes at byte ``offset`` of the volume (the filesystem's block device).
VolumeReader = Callable[[int, int], Awaitable[bytes]]

_SB_OFFSET = 1024
_MAGIC = 0xEF53
_INCOMPAT_OK = (
    0x2  # filetype
    | 0x40  # extents
    | 0x80  # 64bit
    | 0x100  # mmp
    | 0x200  # flex_bg
    | 0x400  # ea_inode
    | 0x2000  # csum_seed
    | 0x4000  # largedir
    | 0x8000  # inline_data (checked per inode)
    | 0x10000  # encrypt (checked per inode)
    | 0x20000  # casefold
)
_INCOMPAT_EXTENTS, _INCOMPAT_64BIT = 0x40, 0x80
_RO_COMPAT_BIGALLOC = 0x200
_BG_INODE_UNINIT = 0x1
# Inode flags that put a file's bytes anywhere but plainly in its extents.
_FL_UNMAPPABLE = 0x4 | 0x200 | 0x800 | 0x10000000  # compr, comprblk, encrypt, inline_data
_FL_EXTENTS = 0x80000
_EXTENT_MAGIC = 0xF30A
_MAX_DEPTH = 5
_UNWRITTEN_LEN = 32768
_S_IFMT, _S_IFREG = 0o170000, 0o100000
# Inode-table reads are merged across gaps up to this size, and capped at _READ_MAX.
_MERGE_GAP = 64 << 10
_READ_MAX = 1 << 20


class Ext4Error(ValueError):
    """The bytes do not describe a filesystem (or a file) this module can map."""


@dataclass(frozen=True)
class Layout:
    """Where an ext4 filesystem keeps its inodes."""

    block_size: int
    inode_size: int
    inodes_per_group: int
    inodes_count: int
    inode_tables: tuple[int, ...]  # per group: first block of its inode table (0: uninit)


async def read_layout(read: VolumeReader) -> Layout:
    """The superblock and group descriptors; Ext4Error when unsafe or not ext4."""
    sb = await read(_SB_OFFSET, 1024)
    if len(sb) != 1024:
        raise Ext4Error("short superblock read")
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    if magic != _MAGIC:
        raise Ext4Error("no ext2/3/4 superblock")
    inodes_count, blocks_lo = struct.unpack_from("<II", sb, 0x0)
    first_data_block, log_block_size = struct.unpack_from("<II", sb, 0x14)
    (blocks_per_group,) = struct.unpack_from("<I", sb, 0x20)
    (inodes_per_group,) = struct.unpack_from("<I", sb, 0x28)
    (rev_level,) = struct.unpack_from("<I", sb, 0x4C)
    (inode_size,) = struct.unpack_from("<H", sb, 0x58)
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    (last_orphan,) = struct.unpack_from("<I", sb, 0xE8)
    (desc_size,) = struct.unpack_from("<H", sb, 0xFE)
    (blocks_hi,) = struct.unpack_from("<I", sb, 0x150)
    if incompat & 0x4:
        raise Ext4Error("the journal needs recovery")
    if incompat & ~_INCOMPAT_OK:
        raise Ext4Error(f"unsupported incompatible features {incompat & ~_INCOMPAT_OK:#x}")
    if not incompat & _INCOMPAT_EXTENTS:
        raise Ext4Error("no extents feature (block-mapped ext2/3)")
    if ro_compat & _RO_COMPAT_BIGALLOC:
        raise Ext4Error("bigalloc")
    if last_orphan:
        raise Ext4Error("orphan inodes to process")
    if log_block_size > 6 or not blocks_per_group or not inodes_per_group:
        raise Ext4Error("implausible superblock")
    block_size = 1024 << log_block_size
    if rev_level == 0:
        inode_size = 128
    if inode_size < 128 or inode_size > block_size or inode_size & (inode_size - 1):
        raise Ext4Error(f"implausible inode size {inode_size}")
    is64 = bool(incompat & _INCOMPAT_64BIT)
    if not is64:
        desc_size, blocks_hi = 32, 0
    elif desc_size < 64 or desc_size & (desc_size - 1):
        raise Ext4Error(f"implausible descriptor size {desc_size}")
    blocks = blocks_lo | blocks_hi << 32
    groups = -(-(blocks - first_data_block) // blocks_per_group)
    if groups <= 0 or groups * inodes_per_group < inodes_count:
        raise Ext4Error("group count does not cover the inodes")
    gdt = await read((first_data_block + 1) * block_size, groups * desc_size)
    if len(gdt) != groups * desc_size:
        raise Ext4Error("short group descriptor read")
    tables: list[int] = []
    for g in range(groups):
        base = g * desc_size
        (table_lo,) = struct.unpack_from("<I", gdt, base + 0x8)
        (flags,) = struct.unpack_from("<H", gdt, base + 0x12)
        table_hi = struct.unpack_from("<I", gdt, base + 0x28)[0] if is64 else 0
        table = table_lo | table_hi << 32
        if table >= blocks:
            raise Ext4Error(f"group {g}: inode table beyond the filesystem")
        tables.append(0 if flags & _BG_INODE_UNINIT else table)
    return Layout(block_size, inode_size, inodes_per_group, inodes_count, tuple(tables))


def _inode_offset(layout: Layout, ino: int) -> int | None:
    if not 1 <= ino <= layout.inodes_count:
        return None
    group, index = divmod(ino - 1, layout.inodes_per_group)
    table = layout.inode_tables[group]
    if not table:
        return None
    return table * layout.block_size + index * layout.inode_size


async def file_extents(
    layout: Layout, read: VolumeReader, files: Iterable[tuple[int, int]]
) -> dict[int, list[Extent] | None]:
    """{inode: extents (bytes, sorted), or None if unmappable} for (inode, size) pairs.

    ``size`` is what the appliance listed: an inode whose size or type differs is
    unmappable (a stale or misread inode must never be served as the file).
    """
    wanted = {}
    for ino, size in files:
        offset = _inode_offset(layout, ino)
        wanted[ino] = (offset, size)
    raw = await _read_inodes(layout, read, [o for o, _ in wanted.values() if o is not None])
    out: dict[int, list[Extent] | None] = {}
    for ino, (offset, size) in wanted.items():
        data = raw.get(offset) if offset is not None else None
        if data is None:
            out[ino] = None
            continue
        try:
            out[ino] = await _extents_of_inode(layout, read, data, size)
        except Ext4Error:
            out[ino] = None
    return out


async def _read_inodes(layout: Layout, read: VolumeReader, offsets: list[int]) -> dict[int, bytes]:
    """{offset: the inode's bytes}, in few reads (a directory's inodes are usually close)."""
    out: dict[int, bytes] = {}
    pending = sorted(set(offsets))
    i = 0
    while i < len(pending):
        start, j = pending[i], i
        while (
            j + 1 < len(pending)
            and pending[j + 1] - pending[j] <= _MERGE_GAP
            and pending[j + 1] + layout.inode_size - start <= _READ_MAX
        ):
            j += 1
        end = pending[j] + layout.inode_size
        data = await read(start, end - start)
        if len(data) != end - start:
            raise Ext4Error("short inode table read")
        for offset in pending[i : j + 1]:
            out[offset] = data[offset - start : offset - start + layout.inode_size]
        i = j + 1
    return out


async def _extents_of_inode(
    layout: Layout, read: VolumeReader, inode: bytes, size: int
) -> list[Extent]:
    (mode,) = struct.unpack_from("<H", inode, 0x0)
    (size_lo,) = struct.unpack_from("<I", inode, 0x4)
    (links,) = struct.unpack_from("<H", inode, 0x1A)
    (flags,) = struct.unpack_from("<I", inode, 0x20)
    (size_hi,) = struct.unpack_from("<I", inode, 0x6C)
    if mode & _S_IFMT != _S_IFREG or links == 0:
        raise Ext4Error("not a live regular file")
    if size_lo | size_hi << 32 != size:
        raise Ext4Error("size differs from the listing")
    if flags & _FL_UNMAPPABLE or not flags & _FL_EXTENTS:
        raise Ext4Error("not a plain extent-mapped file")
    leaves: list[tuple[int, int, int]] = []  # (logical block, physical block, raw len)
    await _walk_node(layout, read, inode[0x28 : 0x28 + 60], 4, None, leaves)
    bs = layout.block_size
    extents: list[Extent] = []
    for logical, physical, raw_len in sorted(leaves):
        unwritten = raw_len > _UNWRITTEN_LEN
        length = raw_len - _UNWRITTEN_LEN if unwritten else raw_len
        if length <= 0 or physical == 0:
            raise Ext4Error("bad extent")
        if extents and extents[-1].logical + extents[-1].length > logical * bs:
            raise Ext4Error("overlapping extents")
        extents.append(Extent(logical * bs, physical * bs, length * bs, unwritten))
    return extents


async def _walk_node(
    layout: Layout,
    read: VolumeReader,
    node: bytes,
    capacity: int,
    depth_expected: int | None,
    leaves: list[tuple[int, int, int]],
) -> None:
    magic, entries, max_entries, depth = struct.unpack_from("<HHHH", node, 0)
    if magic != _EXTENT_MAGIC:
        raise Ext4Error("no extent header")
    if depth > _MAX_DEPTH or (depth_expected is not None and depth != depth_expected):
        raise Ext4Error("bad extent tree depth")
    if entries > max_entries or max_entries > capacity:
        raise Ext4Error("bad extent header counts")
    for k in range(entries):
        base = 12 + 12 * k
        if depth == 0:
            block, raw_len, start_hi, start_lo = struct.unpack_from("<IHHI", node, base)
            leaves.append((block, start_lo | start_hi << 32, raw_len))
        else:
            _block, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, base)
            child_block = leaf_lo | leaf_hi << 32
            if not child_block:
                raise Ext4Error("bad extent index")
            child = await read(child_block * layout.block_size, layout.block_size)
            if len(child) != layout.block_size:
                raise Ext4Error("short extent block read")
            cap = (layout.block_size - 12) // 12
            await _walk_node(layout, read, child, cap, depth - 1, leaves)
