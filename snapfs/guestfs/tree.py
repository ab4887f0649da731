"""GuestTree: the guest's files of one snapshot, as the VFS browses them.

Owns discovery (filesystems, OS inspection, volume naming), the per-volume mounts inside the
appliance, the per-directory metadata cache, the read caches and the extent-mapped fast path.

Layout inside the appliance: nothing is mounted on the guest "/". Each volume N is mounted
read-only, lazily, at /v/N (made with ``mkmountpoint``); the OS view (files/) is composed here
from the inspection's mountpoints, not in the appliance, so each filesystem is mounted once and
a file has the same inode number in files/ and volumes/.

Caching: snapshot data is immutable, so every directory listing (stats, link targets, xattrs,
extent maps) is cached forever, also across appliance restarts. One appliance round trip per
directory: ``ls`` + ``lstatnslist`` + ``readlinklist`` + ``lxattrlist`` in one worker-thread job
(lib/fuse.c's mount_local_readdir model), or one shell script when a name is not UTF-8.

Thread rules: all methods are async on the trio loop; every libguestfs call goes through
``GuestSession.call`` (worker thread, serialized per session). Cache dicts are only touched on
the loop.
"""

from __future__ import annotations

import errno
import logging
import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from snapfs.errors import GuestfsError, IsADirectory, NotADirectory, NotFound, SnapfsError

from . import devnames, ext4, walker
from . import extents as ext_mod
from .devnames import DeviceNames
from .model import DirEntry, Extent, GuestStat, ReadRaw, View, Volume, derive_ino
from .session import GuestSession, LaunchState, drive_label
from .shell import (
    STAT_FORMAT,
    parse_getfattr,
    parse_stat_record,
    run_script,
    script_error,
    sh_bytes,
)

log = logging.getLogger(__name__)

# Appliance reads are fetched in aligned chunks of this size: a sequential reader's 128 KiB
# FUSE requests then cost one appliance round trip per 2 MiB (the read-ahead), and 2 MiB stays
# inside pread's 4 MiB protocol limit.
CHUNK = 2 << 20
# Chunks kept in memory across all files of the tree (64 MiB).
_CHUNK_CACHE_MAX = 32
# Filesystem types blkid names as libguestfs does, needing no further probing (see
# GuestTree._simple_filesystems); anything else goes through list_filesystems.
_SIMPLE_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat", "ntfs", "swap"})
# Filesystem types never offered as volumes (no files to browse).
_NOT_BROWSABLE = frozenset({"swap", "unknown", "crypto_LUKS", "LVM2_member", "linux_raid_member"})


@dataclass
class _Dir:
    """One directory's prefetched contents."""

    entries: dict[bytes, GuestStat]
    links: dict[bytes, bytes]
    xattrs: dict[bytes, dict[bytes, bytes]]
    # guest inode → extents (None: read through the appliance); None until fetched
    extents: dict[int, list[Extent] | None] | None = None
    # False when the listing came without xattrs (the walker's first pass): fetched later
    xattrs_known: bool = True


@dataclass
class _Discovery:
    devices: list[str]
    # The appliance kernel's names for the API's (None: unknown, no device-name scripts)
    names: DeviceNames | None
    volumes: list[Volume]
    os_mounts: dict[bytes, Volume] | None
    warnings: list[str] = field(default_factory=list)


class GuestTree:
    """Guest file access for one snapshot's session.

    ``read_raw`` enables the fast path (None: every read goes through the appliance).
    ``ino_salt`` makes inode numbers distinct between snapshots (pass the snapshot's id).
    """

    def __init__(
        self,
        session: GuestSession,
        *,
        read_raw: ReadRaw | None = None,
        ino_salt: bytes = b"",
        fast_path: bool = True,
    ) -> None:
        self.session = session
        self.read_raw = read_raw
        # Mapped reads go through a window cache (many small files: one NBD read per window).
        self._raw = ext_mod.WindowCache(read_raw) if read_raw is not None else None
        self.ino_salt = ino_salt
        self.fast_path = fast_path and read_raw is not None
        self._discovery: _Discovery | None = None
        self._dirs: dict[tuple[int, bytes], _Dir] = {}
        self._dir_locks: dict[tuple[int, bytes], trio.Lock] = {}
        self._roots: dict[int, tuple[GuestStat, dict[bytes, bytes]]] = {}
        self._devmaps: dict[int, ext_mod.DeviceMap | None] = {}
        self._devmap_failed: dict[int, float] = {}  # volume → when mapping it last failed
        # Volumes whose whole tree is being (or was) fetched in the background.
        self._tree_prefetch: dict[int, trio.Event] = {}
        self._xattr_prefetch: dict[int, trio.Event] = {}  # the walker's second pass
        self._walk_listings: dict[int, dict[bytes, _Dir]] = {}  # what the first pass listed
        # Extent maps fetched a subtree at a time: volume → guest inode → (size, extents);
        # the subtrees fetched completely, and those tried (fetched at most once).
        self._subtree_extents: dict[int, dict[int, tuple[int, list[Extent] | None]]] = {}
        self._subtree_done: dict[int, set[bytes]] = {}
        self._subtree_tried: dict[int, set[bytes]] = {}
        # ext2/3/4 volumes whose extent maps are read on the host (None: they cannot be)
        self._ext4_layouts: dict[int, ext4.Layout | None] = {}
        self._chunks: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self.stats = {
            "host_extent_dirs": 0,
            "mapped_reads": 0,
            "appliance_reads": 0,
            "dir_fetches": 0,
            "walker_passes": 0,  # whole-volume listings by the walker (not the shell)
            "xattr_passes": 0,
        }

    # -- discovery -----------------------------------------------------------------------------

    async def _discover(self) -> _Discovery:
        if self._discovery is not None:
            return self._discovery
        async with self.session.discovery_lock:
            if self.session.discovery is None:
                self.session.discovery = await self.session.call(self._discover_sync)
        found: _Discovery = self.session.discovery
        self._discovery = found
        return found

    def _discover_sync(self, g: Any, state: LaunchState) -> _Discovery:
        started = time.monotonic()
        labels: dict[str, str] = g.list_disk_labels()
        devices = self._devices_in_drive_order(g, labels)
        probe = devnames.probe(g, labels)
        filesystems = simple_filesystems(devices, probe)
        if filesystems is None:
            log.info("guestfs %s: not a plain layout: probing filesystems", self.session.name)
            filesystems = btrfsvol_api_names(g.list_filesystems(), probe.names)
        names = [self.session.disk_name(i) for i in range(len(devices))]
        volumes: list[Volume] = []
        taken: set[str] = set()
        for device, fstype in filesystems.items():
            if fstype in _NOT_BROWSABLE:
                log.info(
                    "guestfs %s: %s (%s) has no browsable filesystem",
                    self.session.name,
                    device,
                    fstype,
                )
                continue
            name = _volume_name(device, devices, names)
            base, n = name, 2
            while name in taken:
                name, n = f"{base}~{n}", n + 1
            taken.add(name)
            volumes.append(Volume(name, device, fstype, len(volumes)))
        by_device = {v.device: v for v in volumes}
        os_mounts: dict[bytes, Volume] | None = None
        # Inspection mounts and unmounts filesystems itself: it must run before our mounts.
        # With one filesystem, files/ is that filesystem whatever inspection says: skip it
        # (it costs seconds under TCG, on the way to the first listing).
        roots = g.inspect_os() if len(volumes) > 1 else []
        if roots:
            if len(roots) > 1:
                log.warning(
                    "guestfs %s: %d operating systems found; files/ shows %s",
                    self.session.name,
                    len(roots),
                    roots[0],
                )
            mps: dict[str, str] = g.inspect_get_mountpoints(roots[0])
            os_mounts = {}
            for mp, dev in mps.items():
                vol = by_device.get(dev)
                if vol is None:
                    log.warning(
                        "guestfs %s: mountpoint %s: device %s not found", self.session.name, mp, dev
                    )
                    continue
                os_mounts[mp.encode()] = vol
            if b"/" not in os_mounts:
                os_mounts = None
        g.umount_all()
        log.info(
            "guestfs %s: %d volume(s): %s; %s (%.2f s)",
            self.session.name,
            len(volumes),
            ", ".join(f"{v.name}={v.device}({v.fstype})" for v in volumes),
            "OS mountpoints "
            + ", ".join(f"{mp.decode()}={v.name}" for mp, v in sorted(os_mounts.items()))
            if os_mounts
            else "no OS found",
            time.monotonic() - started,
        )
        return _Discovery(devices, probe.names, volumes, os_mounts)

    def _devices_in_drive_order(self, g: Any, labels: dict[str, str]) -> list[str]:
        """The appliance devices of the session's drives, in drive order (by their labels:
        ``list_disk_labels()``).

        The appliance scans its disks asynchronously: /dev/sdX names can come in another
        order than the drives were added (seen here: a volume named after the wrong disk,
        and the appliance's own disk listed among the user's).
        """
        count = len(self.session.disks)
        try:
            return [labels[drive_label(i)] for i in range(count)]
        except KeyError:
            found: list[str] = list(g.list_devices())
            log.warning(
                "guestfs %s: drive labels missing (%s): assuming device order %s",
                self.session.name,
                labels,
                found,
            )
            return found[:count]

    async def volumes(self) -> list[Volume]:
        """Every browsable filesystem on the snapshot's disks (first call launches)."""
        return list((await self._discover()).volumes)

    async def os_mountpoints(self) -> dict[bytes, Volume] | None:
        """The inspected OS's {guest mountpoint: volume}, or None when no OS was found."""
        mounts = (await self._discover()).os_mounts
        return dict(mounts) if mounts is not None else None

    async def volume_view(self, name: str) -> View:
        for vol in await self.volumes():
            if vol.name == name:
                return View(name, ((b"/", vol),))
        raise NotFound(f"no volume {name!r}")

    async def files_view(self) -> View | None:
        """files/: the OS at its mountpoints; with no OS the single volume; else None."""
        disc = await self._discover()
        if disc.os_mounts:
            mounts = sorted(disc.os_mounts.items(), key=lambda kv: (-len(kv[0]), kv[0]))
            return View("files", tuple(mounts))
        if len(disc.volumes) == 1:
            return View("files", ((b"/", disc.volumes[0]),))
        return None

    # -- mounting ------------------------------------------------------------------------------

    def _mount_sync(self, g: Any, state: LaunchState, vol: Volume) -> str:
        """Mount ``vol`` at /v/N in this launch (once); its appliance path."""
        mp = f"/v/{vol.index}"
        if mp in state.mounted:
            err = state.mounted[mp]
            if err is not None:
                raise GuestfsError(err, errno=errno.EIO)
            return mp
        if "/v" not in state.mounted:
            g.mkmountpoint("/v")
            state.mounted["/v"] = None
        g.mkmountpoint(mp)
        errors = []
        for options, dev in self._mount_attempts(vol):
            try:
                g.mount_options(options, dev, mp)
            except RuntimeError as exc:
                errors.append(f"{options}: {exc}" if options else str(exc))
                continue
            state.mounted[mp] = None
            self._mounted_sync(g, state)
            return mp
        message = (
            f"guestfs {self.session.name}: cannot mount volume {vol.name} "
            f"({vol.device}, {vol.fstype}){self._MOUNT_MODE}: {'; '.join(errors)}"
        )
        log.error("%s", message)
        state.mounted[mp] = message
        raise GuestfsError(message, errno=errno.EIO)

    _MOUNT_MODE = ""  # said in mount errors ("read-write" for restore disks)

    def _mount_attempts(self, vol: Volume) -> list[tuple[str, str]]:
        """(mount options, device) to try in turn: read-only, then without log replay."""
        device = vol.device
        if device.startswith("btrfsvol:"):
            dev, sub = _btrfs_subvolume(device)
            return [(f"ro,subvol={sub}", dev)]
        attempts = [("ro", device)]
        if vol.fstype.startswith("ext"):
            attempts.append(("ro,noload", device))  # journal needing recovery
        elif vol.fstype == "xfs":
            attempts.append(("ro,norecovery", device))  # dirty log
        return attempts

    def _mounted_sync(self, g: Any, state: LaunchState) -> None:
        """After a volume was mounted in this launch (for subclasses)."""

    # -- metadata ------------------------------------------------------------------------------

    def _stat(self, vol: Volume, fields: dict[str, int]) -> GuestStat:
        return GuestStat(
            ino=derive_ino(self.ino_salt, vol.name, fields["ino"]),
            guest_ino=fields["ino"],
            mode=fields["mode"],
            nlink=fields["nlink"],
            uid=fields["uid"],
            gid=fields["gid"],
            rdev=fields["rdev"],
            size=fields["size"],
            blocks=fields["blocks"],
            blksize=fields.get("blksize", 4096),
            atime_ns=fields["atime_ns"],
            mtime_ns=fields["mtime_ns"],
            ctime_ns=fields["ctime_ns"],
        )

    def _stat_from_statns(self, vol: Volume, st: dict[str, int]) -> GuestStat:
        return self._stat(
            vol,
            {
                "ino": st["st_ino"],
                "mode": st["st_mode"],
                "nlink": st["st_nlink"],
                "uid": st["st_uid"],
                "gid": st["st_gid"],
                "rdev": st["st_rdev"],
                "size": st["st_size"],
                "blocks": st["st_blocks"],
                "blksize": st["st_blksize"],
                "atime_ns": st["st_atime_sec"] * 1_000_000_000 + st["st_atime_nsec"],
                "mtime_ns": st["st_mtime_sec"] * 1_000_000_000 + st["st_mtime_nsec"],
                "ctime_ns": st["st_ctime_sec"] * 1_000_000_000 + st["st_ctime_nsec"],
            },
        )

    async def _root(self, vol: Volume) -> tuple[GuestStat, dict[bytes, bytes]]:
        cached = self._roots.get(vol.index)
        if cached is not None:
            return cached

        def fetch(g: Any, state: LaunchState) -> tuple[GuestStat, dict[bytes, bytes]]:
            mp = self._mount_sync(g, state, vol)
            st = self._stat_from_statns(vol, g.lstatns(mp))
            xattrs = {x["attrname"].encode(): bytes(x["attrval"]) for x in g.lgetxattrs(mp)}
            return st, xattrs

        result = await self.session.call(fetch)
        self._roots[vol.index] = result
        return result

    async def _dir(self, vol: Volume, vpath: bytes) -> _Dir:
        """The cached listing of directory ``vpath`` of ``vol`` (fetched on first use)."""
        key = (vol.index, vpath)
        cached = self._dirs.get(key)
        if cached is not None:
            return cached
        lock = self._dir_locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._dirs.get(key)
            if cached is not None:
                return cached
            if vpath != b"/":
                parent, name = _split(vpath)
                st = (await self._dir(vol, parent)).entries.get(name)
                if st is None:
                    raise NotFound(f"{vol.name}:{vpath!r}: no such directory")
                if not st.is_dir:
                    raise NotADirectory(f"{vol.name}:{vpath!r}: not a directory")
            prefetching = self._tree_prefetch.get(vol.index)
            if prefetching is not None and not prefetching.is_set():
                # The whole tree is on its way: one wait instead of a round trip of our own.
                await prefetching.wait()
                cached = self._dirs.get(key)
                if cached is not None:
                    self._dir_locks.pop(key, None)
                    return cached
            listing = await self.session.call(lambda g, s: self._list_sync(g, s, vol, vpath))
            _drop_subvolumes(vol, listing)
            self.stats["dir_fetches"] += 1
            self._dirs[key] = listing
            self._dir_locks.pop(key, None)
            if vol.index not in self._tree_prefetch and self.session.readonly is not False:
                # After the first listing of a volume (so that it is not delayed), list the
                # whole volume in one script in the background (up to TREE_BATCH entries):
                # under TCG a round trip per directory is what made rsync of 20,000 files
                # slow (docs/benchmarks.md).
                done = self._tree_prefetch[vol.index] = trio.Event()
                trio.lowlevel.spawn_system_task(self._prefetch_in_background, vol, done)
            return listing

    async def _prefetch_in_background(self, vol: Volume, done: trio.Event) -> None:
        try:
            await self._prefetch_tree(vol)
        except Exception:  # a background helper must never take the mount down
            log.exception("guestfs %s: tree prefetch of %s failed", self.session.name, vol.name)
        finally:
            done.set()

    async def _prefetch_tree(self, vol: Volume) -> None:
        """Fill the listing cache for every directory of ``vol`` from one appliance call."""
        started = time.monotonic()
        binary = await trio.to_thread.run_sync(walker.walker_binary)
        mapped = self.fast_path and vol.fstype in ext_mod.FASTPATH_FSTYPES
        # ext4's extent maps come from the host, a directory at a time when first read: the
        # walk then skips FIEMAP, three quarters of its time under TCG.
        with_extents = mapped and await self._ext4_layout(vol) is None
        prepared = time.monotonic()

        def fetch(g: Any, state: LaunchState) -> tuple[str, bytes] | None:
            mp = self._mount_sync(g, state, vol)
            if binary is not None:
                try:
                    walker.install(g, state, binary)
                    what = walker.WANT_EXTENTS if with_extents else 0
                    script = walker.walk_script(b"/sysroot" + mp.encode(), TREE_BATCH, what)
                    status, out = run_script(g, state, script)
                except RuntimeError as exc:
                    status, out = -1, str(exc).encode()
                if status == 0:
                    return "walk", out
                if status == 4:
                    return None
                log.warning(
                    "guestfs %s: the walker failed on %s (%s): using the shell listing",
                    self.session.name,
                    vol.name,
                    out[-300:].decode(errors="replace") if status == -1 else script_error(g),
                )
            script = "\n".join(
                [
                    sh_bytes("D", b"/sysroot" + mp.encode()),
                    'cd -- "$D" || exit 3',
                    f'[ "$(find . -xdev | head -n {TREE_BATCH + 2} | wc -l)" -gt {TREE_BATCH} ]'
                    " && exit 4",
                    "printf '\\0\\0S\\0\\0'",
                    f"find . -xdev -mindepth 1 -exec stat --printf '{STAT_FORMAT}' {{}} +",
                    "printf '\\0\\0L\\0\\0'",
                    "find . -xdev -mindepth 1 -type l -printf './%P\\0%l\\0'",
                    "printf '\\0\\0X\\0\\0'",
                    "find . -xdev -mindepth 1 -exec getfattr -h -d -m - -e hex {} + 2>/dev/null",
                    "printf '\\0\\0E\\0\\0'",
                ]
            )
            # The extent maps of the same files in the same script (a traversal and its
            # process starts saved); only for filesystems whose extents are disk offsets.
            if with_extents:
                script += "\n" + ext_mod.filefrag_subtree_script(b".", TREE_BATCH)
            script += "\ntrue"
            status, out = run_script(g, state, script)
            return ("shell", out) if status == 0 else None

        try:
            result = await self.session.call(fetch, launch=False)
        except SnapfsError as exc:
            log.info(
                "guestfs %s: no tree prefetch of %s: %s", self.session.name, vol.name, exc.message
            )
            return
        fetched = time.monotonic()
        if result is None:
            log.info(
                "guestfs %s: %s has over %d entries: listed a directory at a time",
                self.session.name,
                vol.name,
                TREE_BATCH,
            )
            return
        kind, out = result
        try:
            if kind == "walk":
                listings = self._apply_walk(vol, walker.parse_walk(out), with_extents)
            else:
                listings = self._parse_tree(vol, out)
        except ValueError as exc:
            log.warning(
                "guestfs %s: tree prefetch of %s unusable: %s", self.session.name, vol.name, exc
            )
            return
        for vpath, listing in listings.items():
            _drop_subvolumes(vol, listing)
            self._dirs.setdefault((vol.index, vpath), listing)
        if kind == "walk":
            self.stats["walker_passes"] += 1
        log.info(
            "guestfs %s: listed %d directories of %s in one pass (%.1f s, %s: %.1f s to "
            "prepare, %.1f s in the appliance, %.1f s to parse)",
            self.session.name,
            len(listings),
            vol.name,
            time.monotonic() - started,
            "walker" if kind == "walk" else "shell",
            prepared - started,
            fetched - prepared,
            time.monotonic() - fetched,
        )
        if mapped:
            # The device map too, while the appliance is up: mapped reads then need no
            # appliance, even after it was shut down for idleness.
            await self._devmap(vol, launch=False)
        if kind == "walk":
            # Extended attributes come in a second pass, started by the first request for
            # one: they double the walk's cost under TCG, and most readers (rsync -a, cp,
            # find) never ask for them; a pass nobody needs would take a CPU from them.
            self._walk_listings[vol.index] = listings

    def _apply_walk(
        self, vol: Volume, entries: list[walker.WalkEntry], with_extents: bool
    ) -> dict[bytes, _Dir]:
        """Listings (without xattrs) and extent maps from the walker's first pass."""
        if not entries or entries[0].path != b".":
            raise ValueError("the walk does not start at its root")
        listings: dict[bytes, _Dir] = {b"/": _Dir({}, {}, {}, xattrs_known=False)}
        extents: dict[int, tuple[int, list[Extent] | None]] = {}
        for entry in entries[1:]:
            parent, name = _walk_split(entry.path)
            st = self._stat(vol, entry.fields)
            listing = listings.get(parent)
            if listing is None:
                listing = listings[parent] = _Dir({}, {}, {}, xattrs_known=False)
            listing.entries[name] = st
            if st.is_dir:
                sub = (parent if parent != b"/" else b"") + b"/" + name
                listings.setdefault(sub, _Dir({}, {}, {}, xattrs_known=False))
            elif entry.link is not None:
                listing.links[name] = entry.link
            if entry.mapped:
                extents[st.guest_ino] = (st.size, entry.extents)
        if with_extents:
            self._subtree_extents.setdefault(vol.index, {}).update(extents)
            self._subtree_tried.setdefault(vol.index, set()).add(b"/")
            self._subtree_done.setdefault(vol.index, set()).add(b"/")
        return listings

    async def _prefetch_xattrs(
        self, vol: Volume, listings: dict[bytes, _Dir], done: trio.Event
    ) -> None:
        """The walker's second pass: every entry's extended attributes, into ``listings``."""
        started = time.monotonic()
        try:

            def fetch(g: Any, state: LaunchState) -> bytes | None:
                mp = self._mount_sync(g, state, vol)
                script = walker.walk_script(
                    b"/sysroot" + mp.encode(), TREE_BATCH, walker.WANT_XATTRS
                )
                status, out = run_script(g, state, script)
                return out if status == 0 else None

            # Not worth a relaunch: xattrs asked for later are fetched a directory at a time.
            out = await self.session.call(fetch, launch=False)
            if out is None:
                log.info("guestfs %s: no xattr pass over %s", self.session.name, vol.name)
                return
            found = 0
            for entry in walker.parse_walk(out)[1:]:
                parent, name = _walk_split(entry.path)
                listing = listings.get(parent)
                if listing is None or listing.xattrs_known:
                    continue
                if entry.xattrs:
                    listing.xattrs[name] = entry.xattrs
                    found += 1
            for listing in listings.values():
                listing.xattrs_known = True
            self.stats["xattr_passes"] += 1
            log.info(
                "guestfs %s: extended attributes of %s in one pass: %d entries have some (%.1f s)",
                self.session.name,
                vol.name,
                found,
                time.monotonic() - started,
            )
        except (SnapfsError, ValueError) as exc:
            log.info("guestfs %s: no xattr pass over %s: %s", self.session.name, vol.name, exc)
        except Exception:  # a background helper must never take the mount down
            log.exception("guestfs %s: xattr pass over %s failed", self.session.name, vol.name)
        finally:
            done.set()

    def _parse_tree(self, vol: Volume, out: bytes) -> dict[bytes, _Dir]:
        # Sections are separated by NUL NUL <letter> NUL NUL: every record in them is a
        # non-empty NUL-terminated field, so two NULs in a row occur only at a separator.
        out, sep, extents_part = out.partition(b"\0\0E\0\0")
        if sep and extents_part:
            complete, found = _parse_subtree_extents(extents_part)
            if found or not extents_part.count(b"File size of"):
                self._subtree_extents.setdefault(vol.index, {}).update(found)
                self._subtree_tried.setdefault(vol.index, set()).add(b"/")
                if complete:
                    self._subtree_done.setdefault(vol.index, set()).add(b"/")
        stat_part, sep1, rest = out.partition(b"\0\0L\0\0")
        link_part, sep2, xattr_part = rest.partition(b"\0\0X\0\0")
        if not (sep1 and sep2 and stat_part.startswith(b"\0\0S\0\0")):
            raise ValueError("sections missing")
        stat_part = stat_part[5:] + b"\0"  # the separator took the last record's NUL
        listings: dict[bytes, _Dir] = {b"/": _Dir({}, {}, {})}

        def split(path: bytes) -> tuple[bytes, bytes]:
            # "./a/b" → ("/a", "b")
            rel = path[2:] if path.startswith(b"./") else path
            head, _, name = rel.rpartition(b"/")
            return b"/" + head, name

        for record in stat_part.split(b"\0"):
            if not record:
                continue
            path, fields = parse_stat_record(record)
            parent, name = split(path)
            st = self._stat(vol, fields)
            listings.setdefault(parent, _Dir({}, {}, {})).entries[name] = st
            if st.is_dir:
                listings.setdefault(parent.rstrip(b"/") + b"/" + name, _Dir({}, {}, {}))
        parts = link_part.split(b"\0")
        for i in range(0, len(parts) - 1, 2):
            parent, name = split(parts[i])
            listings.setdefault(parent, _Dir({}, {}, {})).links[name] = parts[i + 1]
        for path, attrs in parse_getfattr(xattr_part).items():
            parent, name = split(b"./" + path)
            listings.setdefault(parent, _Dir({}, {}, {})).xattrs[name] = attrs
        return listings

    def _list_sync(self, g: Any, state: LaunchState, vol: Volume, vpath: bytes) -> _Dir:
        mp = self._mount_sync(g, state, vol)
        apath = mp.encode() + (b"" if vpath == b"/" else vpath)
        try:
            return self._list_api(g, vol, apath.decode())
        except UnicodeError:
            # A name, link target or xattr name that is not UTF-8: the binding cannot carry
            # it; the shell can.
            return self._list_shell(g, state, vol, apath)

    def _list_api(self, g: Any, vol: Volume, apath: str) -> _Dir:
        names: list[str] = g.ls(apath)
        if not names:
            return _Dir({}, {}, {})
        stats = g.lstatnslist(apath, names)
        entries = {
            n.encode(): self._stat_from_statns(vol, st) for n, st in zip(names, stats, strict=True)
        }
        link_names = [n for n in names if stat_mod.S_ISLNK(entries[n.encode()].mode)]
        links: dict[bytes, bytes] = {}
        if link_names:
            targets = g.readlinklist(apath, link_names)
            links = {n.encode(): t.encode() for n, t in zip(link_names, targets, strict=True)}
        return _Dir(entries, links, _xattrs_api(g, apath, names))

    def _list_shell(self, g: Any, state: LaunchState, vol: Volume, apath: bytes) -> _Dir:
        # Sections are separated by NUL NUL <letter> NUL NUL, as in the whole-volume script:
        # every record is a non-empty NUL-terminated field, so two NULs in a row occur only
        # at a separator (a file named "L" cannot forge one).
        script = "\n".join(
            [
                sh_bytes("D", b"/sysroot" + apath),
                'cd -- "$D" || exit 3',
                "printf '\\0\\0S\\0\\0'",
                f"find . -mindepth 1 -maxdepth 1 -exec stat --printf '{STAT_FORMAT}' {{}} +",
                "printf '\\0\\0L\\0\\0'",
                "find . -mindepth 1 -maxdepth 1 -type l -printf '%f\\0%l\\0'",
                "printf '\\0\\0X\\0\\0'",
                "find . -mindepth 1 -maxdepth 1 -exec getfattr -h -d -m - -e hex {} + 2>/dev/null",
                "true",
            ]
        )
        status, out = run_script(g, state, script)
        if status != 0:
            raise GuestfsError(f"listing {apath!r}: {script_error(g)}", errno=errno.EIO)
        head, sep0, rest = out.partition(b"\0\0S\0\0")
        stat_part, sep1, rest = rest.partition(b"\0\0L\0\0")
        link_part, sep2, xattr_part = rest.partition(b"\0\0X\0\0")
        if head or not (sep0 and sep1 and sep2):
            raise GuestfsError(f"listing {apath!r}: unexpected script output", errno=errno.EIO)
        entries: dict[bytes, GuestStat] = {}
        for record in stat_part.split(b"\0"):
            if record:
                name, fields = parse_stat_record(record)
                entries[name.removeprefix(b"./")] = self._stat(vol, fields)
        parts = [p for p in link_part.split(b"\0") if p]
        links = {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}
        return _Dir(entries, links, parse_getfattr(xattr_part))

    async def _locate(self, view: View, path: bytes) -> tuple[Volume, bytes]:
        if not path.startswith(b"/"):
            raise NotFound(f"relative path {path!r}")
        path = b"/" + b"/".join(p for p in path.split(b"/") if p)
        return view.resolve(path)

    async def getattr(self, view: View, path: bytes) -> GuestStat:
        """Metadata of guest path ``path`` (absolute, bytes) in ``view``."""
        vol, vpath = await self._locate(view, path)
        if vpath == b"/":
            return (await self._root(vol))[0]
        parent, name = _split(vpath)
        st = (await self._dir(vol, parent)).entries.get(name)
        if st is None:
            raise NotFound(f"{view.name}:{path!r}: no such file")
        return st

    async def lookup(self, view: View, dir_path: bytes, name: bytes) -> GuestStat:
        """Metadata of entry ``name`` of directory ``dir_path``."""
        if b"/" in name or name in (b"", b".", b".."):
            raise NotFound(f"bad name {name!r}")
        return await self.getattr(view, _join(dir_path, name))

    async def listdir(self, view: View, path: bytes) -> list[DirEntry]:
        """All entries of a directory (without . and ..), with their metadata."""
        vol, vpath = await self._locate(view, path)
        if vpath != b"/":
            st = await self.getattr(view, path)
            if not st.is_dir:
                raise NotADirectory(f"{view.name}:{path!r}: not a directory")
        listing = await self._dir(vol, vpath)
        result = []
        for name, st in listing.entries.items():
            child = _join(path, name)
            mounted = view.mounted_at(child)
            if mounted is not None and mounted is not vol:
                # A mountpoint shows the mounted volume's root, as in the running guest.
                try:
                    st = (await self._root(mounted))[0]
                except SnapfsError as exc:
                    log.warning("%s: %s", child, exc.message)
            result.append(DirEntry(name, st))
        # A mountpoint that the listing lacks (a nested btrfs subvolume is left out of it).
        here = b"/" + b"/".join(p for p in path.split(b"/") if p)
        for mountpoint, mounted in view.mounts:
            parent, name = _split(mountpoint)
            if mountpoint != b"/" and parent == here and name not in listing.entries:
                try:
                    result.append(DirEntry(name, (await self._root(mounted))[0]))
                except SnapfsError as exc:
                    log.warning("%s: %s", mountpoint, exc.message)
        return result

    async def readlink(self, view: View, path: bytes) -> bytes:
        vol, vpath = await self._locate(view, path)
        if vpath == b"/":
            raise SnapfsError(f"{path!r} is not a symlink", errno=errno.EINVAL)
        parent, name = _split(vpath)
        listing = await self._dir(vol, parent)
        if name not in listing.entries:
            raise NotFound(f"{view.name}:{path!r}: no such file")
        target = listing.links.get(name)
        if target is None:
            raise SnapfsError(f"{path!r} is not a symlink", errno=errno.EINVAL)
        return target

    async def _xattrs(self, view: View, path: bytes) -> dict[bytes, bytes]:
        vol, vpath = await self._locate(view, path)
        if vpath == b"/":
            return (await self._root(vol))[1]
        parent, name = _split(vpath)
        listing = await self._dir(vol, parent)
        if name not in listing.entries:
            raise NotFound(f"{view.name}:{path!r}: no such file")
        if not listing.xattrs_known:
            pending = self._xattr_prefetch.get(vol.index)
            if pending is not None and not pending.is_set():
                await pending.wait()  # the whole volume's xattrs are on their way
            if not listing.xattrs_known:
                # This directory now (one call), then the rest of the volume in the
                # background: a reader of xattrs (rsync -X, getfattr -R) moves on to others.
                listing.xattrs = await self._fetch_dir_xattrs(vol, parent, listing)
                listing.xattrs_known = True
                walked = self._walk_listings.get(vol.index)
                if walked is not None and vol.index not in self._xattr_prefetch:
                    done = self._xattr_prefetch[vol.index] = trio.Event()
                    trio.lowlevel.spawn_system_task(self._prefetch_xattrs, vol, walked, done)
        return listing.xattrs.get(name, {})

    async def _fetch_dir_xattrs(
        self, vol: Volume, vpath: bytes, listing: _Dir
    ) -> dict[bytes, dict[bytes, bytes]]:
        """Extended attributes of every entry of one directory (one appliance call)."""
        names = list(listing.entries)

        def fetch(g: Any, state: LaunchState) -> dict[bytes, dict[bytes, bytes]]:
            mp = self._mount_sync(g, state, vol)
            apath = mp.encode() + (b"" if vpath == b"/" else vpath)
            try:
                return _xattrs_api(g, apath.decode(), [n.decode() for n in names])
            except UnicodeError:
                pass  # a name the binding cannot carry: the shell can
            script = "\n".join(
                [
                    sh_bytes("D", b"/sysroot" + apath),
                    'cd -- "$D" || exit 3',
                    "find . -mindepth 1 -maxdepth 1 -exec getfattr -h -d -m - -e hex {} + "
                    "2>/dev/null",
                    "true",
                ]
            )
            status, out = run_script(g, state, script)
            if status != 0:
                raise GuestfsError(f"xattrs of {apath!r}: {script_error(g)}", errno=errno.EIO)
            return parse_getfattr(out)

        return await self.session.call(fetch)

    async def listxattr(self, view: View, path: bytes) -> list[bytes]:
        return list(await self._xattrs(view, path))

    async def getxattr(self, view: View, path: bytes, name: bytes) -> bytes:
        value = (await self._xattrs(view, path)).get(name)
        if value is None:
            raise SnapfsError(f"{path!r}: no attribute {name!r}", errno=errno.ENODATA)
        return value

    # -- data ----------------------------------------------------------------------------------

    async def read(self, view: View, path: bytes, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a regular file from ``offset`` (short only at end of file)."""
        st = await self.getattr(view, path)
        if st.is_dir:
            raise IsADirectory(f"{view.name}:{path!r} is a directory")
        if not st.is_reg:
            raise SnapfsError(f"{view.name}:{path!r} is not a regular file", errno=errno.EINVAL)
        if offset >= st.size or size <= 0:
            return b""
        size = min(size, st.size - offset)
        vol, vpath = await self._locate(view, path)
        if self.fast_path and vol.fstype in ext_mod.FASTPATH_FSTYPES:
            data = await self._read_fast(vol, vpath, st, offset, size)
            if data is not None:
                self.stats["mapped_reads"] += 1
                return data
        self.stats["appliance_reads"] += 1
        return await self.read_via_appliance(vol, vpath, st, offset, size)

    async def _read_fast(
        self, vol: Volume, vpath: bytes, st: GuestStat, offset: int, size: int
    ) -> bytes | None:
        assert self.read_raw is not None
        parent, _ = _split(vpath)
        extents = await self._extents_of(vol, parent, st)
        if extents is None:
            return None
        devmap = await self._devmap(vol)
        if devmap is None:
            return None
        plan = ext_mod.plan_read(extents, devmap, st.size, offset, size)
        if plan is None:
            return None
        assert self._raw is not None
        return await ext_mod.read_mapped(plan, await self._disk_names(), self._raw)

    async def _disk_names(self) -> list[str]:
        """The session's disk names (what ``read_raw`` takes), in drive order."""
        disc = await self._discover()
        return [self.session.disk_name(i) for i in range(len(disc.devices))]

    async def _extents_of(self, vol: Volume, parent: bytes, st: GuestStat) -> list[Extent] | None:
        """The file's extents: from a subtree batch when one covers it, else per directory."""
        prefetching = self._tree_prefetch.get(vol.index)
        if prefetching is not None and not prefetching.is_set():
            await prefetching.wait()  # it brings the extent maps of the whole volume too
        layout = self._ext4_layouts.get(vol.index)
        if layout is not None:
            listing = await self._dir(vol, parent)
            if listing.extents is None:
                listing.extents = await self._host_extents(vol, layout, parent, listing)
            return listing.extents.get(st.guest_ino)
        known = self._subtree_extents.setdefault(vol.index, {})
        covered = self._subtree_done.setdefault(vol.index, set())
        tried = self._subtree_tried.setdefault(vol.index, set())
        # The whole volume first (one script for up to SUBTREE_BATCH files); a volume too big
        # for one batch is then taken a subtree at a time, from the file's directory down.
        for top in (b"/", parent):
            if _covered(parent, covered) or top in tried:
                continue
            tried.add(top)
            complete, found = await self._fetch_subtree_extents(vol, top)
            known.update(found)
            if complete:
                covered.add(top)
        entry = known.get(st.guest_ino)
        if entry is not None and entry[0] == st.size:
            return entry[1]
        if _covered(parent, covered):
            return None  # in a complete batch but unmappable (or its size disagreed)
        listing = await self._dir(vol, parent)
        if listing.extents is None:
            listing.extents = await self._fetch_extents(vol, parent, listing)
        return listing.extents.get(st.guest_ino)

    async def _run_filefrag(
        self, vol: Volume, vpath: bytes, make_script: Callable[[bytes], str]
    ) -> bytes | None:
        """Output of a filefrag script run in directory ``vpath`` of ``vol``; None on failure."""

        def fetch(g: Any, state: LaunchState) -> bytes | None:
            mp = self._mount_sync(g, state, vol)
            apath = mp.encode() + (b"" if vpath == b"/" else vpath)
            status, out = run_script(g, state, make_script(b"/sysroot" + apath))
            if status != 0:
                log.warning(
                    "guestfs %s: filefrag in %r failed: %s",
                    self.session.name,
                    apath,
                    script_error(g),
                )
                return None
            return out

        try:
            return await self.session.call(fetch)
        except SnapfsError as exc:
            log.warning(
                "guestfs %s: no extent maps for %s:%r: %s",
                self.session.name,
                vol.name,
                vpath,
                exc.message,
            )
            return None

    async def _fetch_subtree_extents(
        self, vol: Volume, top: bytes
    ) -> tuple[bool, dict[int, tuple[int, list[Extent] | None]]]:
        out = await self._run_filefrag(vol, top, ext_mod.filefrag_subtree_script)
        if out is None:
            return False, {}
        complete, found = _parse_subtree_extents(out)
        log.info(
            "guestfs %s: extent maps of %d files below %s:%r%s",
            self.session.name,
            len(found),
            vol.name,
            top,
            "" if complete else " (partial)",
        )
        return complete, found

    async def _fetch_extents(
        self, vol: Volume, parent: bytes, listing: _Dir
    ) -> dict[int, list[Extent] | None]:
        out = await self._run_filefrag(vol, parent, ext_mod.filefrag_script)
        parsed = ext_mod.parse_filefrag(out) if out is not None else {}
        sizes = {st.guest_ino: st.size for st in listing.entries.values() if st.is_reg}
        result: dict[int, list[Extent] | None] = {}
        for ino, (size, extents) in parsed.items():
            # A size that disagrees with the listing means the sections were misaligned.
            result[ino] = extents if sizes.get(ino) == size else None
        return result

    async def _volume_reader(self, vol: Volume, *, launch: bool) -> ext4.VolumeReader | None:
        """Reads of ``vol``'s own bytes, through its device map (None: it has none)."""
        devmap = await self._devmap(vol, launch=launch)
        if devmap is None:
            return None
        disk_names = await self._disk_names()
        read_raw = self._raw
        assert read_raw is not None

        async def read(offset: int, length: int) -> bytes:
            pieces = ext_mod.translate(devmap, offset, length)
            if pieces is None:
                raise ext4.Ext4Error(f"volume bytes {offset}+{length} are not on the disks")
            return await ext_mod.read_mapped(pieces, disk_names, read_raw)

        return read

    async def _ext4_layout(self, vol: Volume) -> ext4.Layout | None:
        """The ext2/3/4 layout of ``vol`` when its extent maps can be read on the host."""
        if vol.index in self._ext4_layouts:
            return self._ext4_layouts[vol.index]
        layout: ext4.Layout | None = None
        if self.fast_path and vol.fstype in ("ext2", "ext3", "ext4"):
            read = await self._volume_reader(vol, launch=False)
            if read is not None:
                try:
                    layout = await ext4.read_layout(read)
                except Exception as exc:  # unsafe layout, NBD error: FIEMAP still works
                    log.info(
                        "guestfs %s: %s: extent maps come from the appliance (%s)",
                        self.session.name,
                        vol.name,
                        exc,
                    )
        if layout is not None:
            log.info(
                "guestfs %s: %s: extent maps are read on the host (%d-byte blocks)",
                self.session.name,
                vol.name,
                layout.block_size,
            )
        self._ext4_layouts[vol.index] = layout
        return layout

    async def _host_extents(
        self, vol: Volume, layout: ext4.Layout, parent: bytes, listing: _Dir
    ) -> dict[int, list[Extent] | None]:
        """The directory's extent maps read on the host; the appliance's FIEMAP for the files
        the host cannot map (block-mapped files of an upgraded ext3, for one)."""
        files = {
            (st.guest_ino, st.size) for st in listing.entries.values() if st.is_reg and st.size > 0
        }
        read = await self._volume_reader(vol, launch=True)
        found: dict[int, list[Extent] | None] = {}
        if read is not None:
            try:
                found = await ext4.file_extents(layout, read, files)
            except Exception as exc:  # an NBD error, a short read: the appliance still knows
                log.warning(
                    "guestfs %s: host extent maps of %s:%r failed: %s",
                    self.session.name,
                    vol.name,
                    parent,
                    exc,
                )
        self.stats["host_extent_dirs"] += 1
        unmapped = sum(found.get(ino) is None for ino, _ in files)
        if unmapped:
            log.info(
                "guestfs %s: %s:%r: %d of %d files not mapped on the host: asking FIEMAP",
                self.session.name,
                vol.name,
                parent,
                unmapped,
                len(files),
            )
            for ino, extents in (await self._fetch_extents(vol, parent, listing)).items():
                if found.get(ino) is None:
                    found[ino] = extents
        return found

    async def _devmap(self, vol: Volume, *, launch: bool = True) -> ext_mod.DeviceMap | None:
        """Where ``vol``'s bytes are on the disks (cached; a failure is retried later)."""
        if vol.index in self._devmaps:
            return self._devmaps[vol.index]
        failed_at = self._devmap_failed.get(vol.index)
        if failed_at is not None and time.monotonic() - failed_at < _DEVMAP_RETRY_S:
            return None
        devmap = await self._fetch_devmap(vol, launch=launch)
        if devmap is None:
            # Try again later rather than losing the fast path for the whole mount.
            self._devmap_failed[vol.index] = time.monotonic()
            return None
        self._devmaps[vol.index] = devmap
        return devmap

    async def _fetch_devmap(self, vol: Volume, *, launch: bool) -> ext_mod.DeviceMap | None:
        disc = await self._discover()
        kernel_device = disc.names.to_kernel(vol.device) if disc.names else None
        if disc.names is None or kernel_device is None:
            log.info(
                "guestfs %s: no kernel device name for %s (%s): reads go through the appliance",
                self.session.name,
                vol.name,
                vol.device,
            )
            return None
        # The script sees kernel names: the disks are indexed by those.
        disk_index = disc.names.kernel_disk_index(disc.devices)

        def fetch(g: Any, state: LaunchState) -> bytes:
            # Mounted first: the script's output is fetched with path calls, which the
            # daemon refuses while nothing is mounted (a fresh launch).
            self._mount_sync(g, state, vol)
            return run_script(g, state, ext_mod.devmap_script(kernel_device))[1]

        try:
            out = await self.session.call(fetch, launch=launch)
        except SnapfsError as exc:
            log.warning(
                "guestfs %s: no device map for %s: %s", self.session.name, vol.name, exc.message
            )
            return None
        devmap = ext_mod.parse_devmap(out, disk_index)
        if devmap is None:
            log.info("guestfs %s: device map script printed: %r", self.session.name, out[:4000])
            log.info(
                "guestfs %s: volume %s (%s) cannot be mapped to disk offsets: reads go "
                "through the appliance for now",
                self.session.name,
                vol.name,
                vol.device,
            )
        return devmap

    async def read_via_appliance(
        self, vol: Volume, vpath: bytes, st: GuestStat, offset: int, size: int
    ) -> bytes:
        """Read through the appliance (``pread``) in cached CHUNK-aligned pieces."""
        out = bytearray()
        end = offset + size
        first, last = offset // CHUNK, (end - 1) // CHUNK
        for chunk_no in range(first, last + 1):
            chunk = await self._chunk(vol, vpath, st, chunk_no)
            lo = max(offset, chunk_no * CHUNK) - chunk_no * CHUNK
            hi = min(end, (chunk_no + 1) * CHUNK) - chunk_no * CHUNK
            out += chunk[lo:hi]
        return bytes(out)

    async def _chunk(self, vol: Volume, vpath: bytes, st: GuestStat, chunk_no: int) -> bytes:
        key = (vol.index, st.guest_ino, chunk_no)
        data = self._chunks.get(key)
        if data is not None:
            self._chunks.move_to_end(key)
            return data
        want = min(CHUNK, st.size - chunk_no * CHUNK)

        def fetch(g: Any, state: LaunchState) -> bytes:
            mp = self._mount_sync(g, state, vol)
            apath = mp.encode() + vpath
            try:
                path = apath.decode()
            except UnicodeDecodeError:
                path = self._alias_sync(g, state, apath)
            parts = []
            got = 0
            while got < want:
                piece: bytes = g.pread(path, want - got, chunk_no * CHUNK + got)
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
            return b"".join(parts)

        data = await self.session.call(fetch)
        self._chunks[key] = data
        while len(self._chunks) > _CHUNK_CACHE_MAX:
            self._chunks.popitem(last=False)
        return data

    def _alias_sync(self, g: Any, state: LaunchState, apath: bytes) -> str:
        """A UTF-8 appliance path for a file whose path is not UTF-8: a bind mount of it."""
        alias = state.aliases.get(apath)
        if alias is not None:
            return alias
        alias = f"/.snapfs/a{len(state.aliases)}"
        script = "\n".join(
            [
                sh_bytes("F", b"/sysroot" + apath),
                f'touch /sysroot{alias} && mount --bind "$F" /sysroot{alias}',
            ]
        )
        status, _ = run_script(g, state, script)
        if status != 0:
            raise GuestfsError(f"cannot alias {apath!r}: {script_error(g)}", errno=errno.EIO)
        state.aliases[apath] = alias
        return alias


# A volume whose device map could not be read is tried again after this long.
_DEVMAP_RETRY_S = 10.0
# Entries per whole-volume listing: one script lists a volume up to this size (about 200
# bytes of output an entry); bigger volumes are listed a directory at a time.
TREE_BATCH = 100_000


def _parse_subtree_extents(out: bytes) -> tuple[bool, dict[int, tuple[int, list[Extent] | None]]]:
    """(complete, extents) of a subtree filefrag script; sections that did not line up
    (nothing parsed although filefrag printed some) make it incomplete: nothing trusted."""
    complete, found = ext_mod.parse_filefrag_subtree(out)
    if not found and out.count(b"File size of"):
        complete = False
    return complete, found


# The root directory of every btrfs subvolume has inode number 256 (BTRFS_FIRST_FREE_OBJECTID);
# no other inode has it.
_BTRFS_SUBVOL_ROOT_INO = 256


def _drop_subvolumes(vol: Volume, listing: _Dir) -> None:
    """Leave nested btrfs subvolumes out of a listing, as the walker (FTW_MOUNT) does.

    A subvolume has inode numbers of its own (its root is 256, its files from 257 up, as in
    every other subvolume): shown inside the top-level volume, its files would collide with
    other subvolumes' in one view (false hard links, another file's data). Each subvolume
    is a volume of its own (``vdb@name``).
    """
    if vol.fstype != "btrfs":
        return
    for name, st in list(listing.entries.items()):
        if st.is_dir and st.guest_ino == _BTRFS_SUBVOL_ROOT_INO:
            del listing.entries[name]
            listing.links.pop(name, None)
            listing.xattrs.pop(name, None)


def _xattrs_api(g: Any, apath: str, names: list[str]) -> dict[bytes, dict[bytes, bytes]]:
    """{name: {attr: value}} of the entries ``names`` of directory ``apath`` (lxattrlist)."""
    xattrs: dict[bytes, dict[bytes, bytes]] = {}
    if not names:
        return xattrs
    flat = g.lxattrlist(apath, names)
    # lxattrlist: per name a marker {attrname: "", attrval: "<count>\0"}, then its attrs.
    i = 0
    for n in names:
        count = int(bytes(flat[i]["attrval"]).rstrip(b"\0") or b"0")
        attrs = {x["attrname"].encode(): bytes(x["attrval"]) for x in flat[i + 1 : i + 1 + count]}
        if attrs:
            xattrs[n.encode()] = attrs
        i += 1 + count
    return xattrs


def _walk_split(path: bytes) -> tuple[bytes, bytes]:
    """A walker path (``./a/b``) as (parent directory ``/a``, name ``b``)."""
    rel = path[2:] if path.startswith(b"./") else path
    head, _, name = rel.rpartition(b"/")
    return b"/" + head, name


def _covered(path: bytes, tops: set[bytes]) -> bool:
    """Whether ``path`` is one of ``tops`` or below one of them."""
    if path in tops or b"/" in tops:
        return True
    while path not in (b"", b"/"):
        path = path.rsplit(b"/", 1)[0] or b"/"
        if path in tops:
            return True
    return False


def _split(vpath: bytes) -> tuple[bytes, bytes]:
    parent, _, name = vpath.rpartition(b"/")
    return (parent or b"/"), name


def _join(dir_path: bytes, name: bytes) -> bytes:
    return (dir_path.rstrip(b"/") or b"") + b"/" + name


def _btrfs_subvolume(device: str) -> tuple[str, str]:
    """("/dev/sdb", "data/inner") of list_filesystems' "btrfsvol:/dev/sdb/data/inner"."""
    dev, _, sub = device[len("btrfsvol:") :].partition("/dev/")[2].partition("/")
    return f"/dev/{dev}", sub


def btrfsvol_api_names(
    filesystems: dict[str, str], names: devnames.DeviceNames | None
) -> dict[str, str]:
    """``list_filesystems`` with its btrfs subvolumes' devices in the API's names.

    libguestfs translates the plain devices it returns to API names but not the device
    inside "btrfsvol:/dev/sdX/sub" (libguestfs 1.48): when the appliance kernel scanned the
    disks out of order, that names another drive, so the subvolume got the wrong disk's
    volume name and its mount went to the wrong disk. Translated here, where the kernel name
    is the one whose plain entry is btrfs (so a libguestfs that does translate is left
    alone)."""
    if names is None:
        return filesystems
    out: dict[str, str] = {}
    for device, fstype in filesystems.items():
        if device.startswith("btrfsvol:"):
            dev, sub = _btrfs_subvolume(device)
            api = names.to_api(dev)
            if (
                api is not None
                and api != dev
                and filesystems.get(api) == "btrfs"
                and filesystems.get(dev) != "btrfs"
            ):
                device = f"btrfsvol:{api}/{sub}"
        out[device] = fstype
    return out


def _volume_name(device: str, devices: Sequence[str], disk_names: Sequence[str]) -> str:
    """vda1 for partition 1 of disk "vda"; vda for a whole-disk filesystem; vg0-root for LVs."""
    if device.startswith("btrfsvol:"):
        dev, sub = _btrfs_subvolume(device)
        return f"{_volume_name(dev, devices, disk_names)}@{sub.replace('/', '_')}"
    for i, disk in enumerate(devices):
        if device == disk:
            return disk_names[i]
        if device.startswith(disk) and device[len(disk) :].isdigit():
            return f"{disk_names[i]}{device[len(disk) :]}"
    parts = device.split("/")
    if len(parts) == 4 and parts[1] == "dev":  # /dev/VG/LV
        return f"{parts[2]}-{parts[3]}"
    return device.rsplit("/", 1)[-1] or device.replace("/", "_")


def simple_filesystems(devices: list[str], probe: devnames.Probe) -> dict[str, str] | None:
    """``list_filesystems`` for plain layouts, from the probe's one ``blkid`` run; None
    otherwise.

    list_filesystems probes LVM, md, LDM and btrfs subvolumes with a process each: 3-4 s
    under TCG on the way to the first listing. When blkid finds only plain filesystems (no
    LVM, RAID, btrfs, encryption), its answer is the same. blkid ran with the kernel's
    device names; the API's differ when the appliance scanned its disks out of order
    (devnames.py): translated here.
    """
    names = probe.names
    if names is None:
        return None
    partitions: list[str] = []
    for kernel in probe.partitions:
        api = names.to_api(kernel)
        if api is None:
            return None
        if api.rstrip("0123456789") in devices:
            partitions.append(api)
    found: dict[str, dict[str, str]] = {}
    for block in probe.blkid.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        api_name = names.to_api(fields.get("DEVNAME", ""))
        if api_name is not None:
            found[api_name] = fields
    result: dict[str, str] = {}
    with_partitions = {p.rstrip("0123456789") for p in partitions}
    for dev in [*devices, *partitions]:
        fstype = found.get(dev, {}).get("TYPE")
        if fstype is None and dev in with_partitions:
            continue  # a partitioned disk: its partitions are the filesystems
        if fstype not in _SIMPLE_FSTYPES:
            # Untyped (an extended partition, empty space, a probe that raced udev) or
            # anything needing more probing: let list_filesystems decide.
            return None
        result[dev] = fstype
    return result
