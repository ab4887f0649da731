"""GuestSession: one libguestfs handle (one appliance) per snapshot, launched lazily.

Owns the handle's whole life: creation, the launch with a timeout (killing a hung qemu), the
KVM → TCG fallback, serialized calls, idle shutdown and close.

Thread rules:
- Every libguestfs call runs in a worker thread (``trio.to_thread.run_sync``) under this
  session's ``CapacityLimiter(1)``; a ``trio.Lock`` keeps launch and calls in order. The trio
  loop never touches the handle, so a slow launch in one session stalls no other session.
- A libguestfs handle is not thread safe; the lock guarantees one thread at a time uses it.
- ``call(fn)`` runs ``fn(g, state)`` in the thread; ``state`` is a fresh ``LaunchState`` per
  launch, for what an appliance restart forgets (mounts, aliases).
- The Python binding raises RuntimeError without an errno: ``_run`` turns it into
  ``GuestfsError`` with the errno guessed from the message (``snapfs.errors.guess_errno``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from snapfs.errors import BackendUnavailable, GuestfsError, guess_errno

from . import appliance
from .settings import GuestfsSettings

if TYPE_CHECKING:
    from .pool import AppliancePool

log = logging.getLogger(__name__)

T = TypeVar("T")

# After a launch timeout we SIGKILL the appliance's qemu and wait this long for g.launch() to
# notice and return; a launch still stuck after that is abandoned (its thread leaks).
_KILL_GRACE_S = 30.0


class LaunchTimeout(BackendUnavailable):
    """The appliance did not come up within the launch timeout (and was killed)."""


class _KvmVerdict:
    """Process-wide memory of whether KVM guests work here (None: not tried yet).

    Also kept on disk (``verdict_path``) for a week per kernel, so that a new mount on a
    machine where KVM guests hang does not wait for a KVM launch timeout again.
    """

    works: bool | None = None
    loaded = False


class _FastBootVerdict:
    """Process-wide: False once a fast-boot launch failed where a normal one may not."""

    works: bool | None = None


# How long a remembered KVM verdict holds (a kernel or qemu update may change it).
_VERDICT_MAX_AGE_S = 7 * 24 * 3600


def drive_label(index: int) -> str:
    """The libguestfs label of the snapshot's ``index``-th drive (list_disk_labels).

    Labels may only hold ASCII letters: "da", "db", … "dz", "dba", …
    """
    letters = ""
    while True:
        index, digit = divmod(index, 26)
        letters = chr(ord("a") + digit) + letters
        if index == 0:
            return "d" + letters


def verdict_path() -> Path:
    base = os.environ.get("SNAPFS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "snapfs"
    )
    return Path(base) / "kvm-verdict.json"


def _load_verdict() -> bool | None:
    try:
        data = json.loads(verdict_path().read_text())
        if (
            data.get("kernel") == platform.release()
            and time.time() - float(data.get("at", 0)) < _VERDICT_MAX_AGE_S
            and isinstance(data.get("works"), bool)
        ):
            return bool(data["works"])
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def _save_verdict(works: bool) -> None:
    path = verdict_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"kernel": platform.release(), "works": works, "at": time.time()})
        )
        tmp.replace(path)
    except OSError as exc:
        log.debug("cannot remember the KVM verdict in %s: %s", path, exc)


@dataclass
class LaunchState:
    """What one running appliance knows; a relaunch starts from a fresh one."""

    generation: int
    mounted: dict[str, str | None] = field(default_factory=dict)  # mount dir → error or None
    aliases: dict[bytes, str] = field(default_factory=dict)  # appliance path → alias path
    scratch_ready: bool = False
    walker_ready: bool = False  # snapfs-walk uploaded (walker.py)


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def find_qemu_pids(marker: str) -> list[int]:
    """Pids of qemu processes whose command line contains ``marker`` (a handle's tmpdir).

    During launch ``g.get_pid()`` is not available yet; every appliance qemu gets its overlay
    file under the handle's private tmpdir, so that path identifies it among all qemus.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        argv0 = cmdline.split(b"\0", 1)[0]
        if b"qemu" in os.path.basename(argv0) and marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class GuestSession:
    """One appliance over all disks of one snapshot, each attached read-only from NBD.

    ``disks`` is a list of (disk name, unix socket path); each drive is labelled
    (``drive_label``), because the appliance's /dev/sdX names need not follow drive order.
    ``readonly=False`` attaches them writable (a restore disk's own writable qemu-nbd); the
    appliance root overlay still lives in the private tmpdir, so the launch watchdog finds
    its qemu either way.
    """

    def __init__(
        self,
        name: str,
        disks: Sequence[tuple[str, str]],
        settings: GuestfsSettings | None = None,
        pool: AppliancePool | None = None,
        *,
        readonly: bool = True,
    ) -> None:
        if not disks:
            raise ValueError("a guestfs session needs at least one disk")
        self.name = name
        self.disks = tuple(disks)
        self.settings = settings or GuestfsSettings()
        self._pool = pool
        # False only for restore disks (snapfs.guestfs.rwtree): the drives are written.
        self.readonly = readonly
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._g: Any = None
        self._state: LaunchState | None = None
        self._generation = 0
        self._tmpdir: str | None = None
        self._closed = False
        self._failure: str | None = None  # the last launch failure, for the log
        self.attempt_markers: list[str] = []  # tmpdir of every launch attempt (for tests)
        # What GuestTree discovered (filesystems, inspection): once per session, because
        # inspection unmounts everything and must not run again under mounted volumes.
        self.discovery: Any = None
        self.discovery_lock = trio.Lock()
        self.busy = 0
        self.last_used = 0.0
        self.launch_count = 0
        self.calls = 0  # appliance round trips asked for (each one worker-thread job)
        self.last_launch_backend: str | None = None
        self.last_launch_fast_boot = False
        self._fast_boot_used = False  # by the launch attempt under way
        # Hooks of the owner: before a launch (start the NBD servers the disks are on) and
        # after the appliance is gone (release them).
        self.before_launch: Callable[[], Awaitable[None]] | None = None
        # Export names of disks on servers with named exports (a libvirt job: "vda").
        self.export_names: dict[str, str] = {}
        self.after_shutdown: Callable[[], Awaitable[None]] | None = None
        if pool is not None:
            pool.register(self)

    # -- state seen by the pool ---------------------------------------------------------------

    @property
    def launched(self) -> bool:
        return self._g is not None

    @property
    def qemu_marker(self) -> str | None:
        """The private tmpdir that appears in this session's qemu command line (for tests)."""
        return self._tmpdir

    def disk_name(self, index: int) -> str:
        return self.disks[index][0]

    # -- calls -------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Any, LaunchState], T], *, launch: bool = True) -> T:
        """Run ``fn(g, state)`` in a worker thread, launching the appliance first if needed.

        ``launch=False`` (background work, which must not keep an idle snapshot's appliance
        alive or bring it back): BackendUnavailable if the appliance is not running.
        """
        if self._closed:
            raise BackendUnavailable(f"guestfs session {self.name} is closed")
        self.calls += 1
        self.busy += 1
        try:
            async with self._lock:
                if self._g is None:
                    if not launch:
                        raise BackendUnavailable(f"guestfs {self.name}: appliance not running")
                    await self._launch_locked()
                g, state = self._g, self._state
                assert state is not None
                self.last_used = trio.current_time()
                try:
                    result: T = await trio.to_thread.run_sync(
                        self._run, fn, g, state, limiter=self._limiter
                    )
                    return result
                finally:
                    self.last_used = trio.current_time()
        finally:
            self.busy -= 1

    @staticmethod
    def _run(fn: Callable[[Any, LaunchState], T], g: Any, state: LaunchState) -> T:
        try:
            return fn(g, state)
        except RuntimeError as exc:
            message = str(exc)
            raise GuestfsError(message, errno=guess_errno(message)) from exc

    async def drain(self, older_than: float = 0.0) -> None:
        """Apply changes deferred for ``older_than`` seconds (none here: see RwGuestSession)."""

    # -- launch ------------------------------------------------------------------------------

    async def _launch_locked(self) -> None:
        if self._pool is not None:
            await self._pool.make_room(self)
        try:
            if self.before_launch is not None:
                # The owner makes sure the NBD servers behind ``disks`` are up.
                await self.before_launch()
            try:
                await self._launch_plan()
            except BaseException:
                if self.after_shutdown is not None:
                    with trio.CancelScope(shield=True):
                        await self.after_shutdown()
                raise
        finally:
            if self._pool is not None:
                self._pool.launch_finished(self)

    async def _launch_plan(self) -> None:
        settings = self.settings
        if settings.backend == "auto" and not _KvmVerdict.loaded:
            _KvmVerdict.loaded = True
            if _KvmVerdict.works is None:
                _KvmVerdict.works = await trio.to_thread.run_sync(_load_verdict)
                if _KvmVerdict.works is False:
                    log.info(
                        "guestfs: KVM guests hung or failed here before (%s): using TCG",
                        verdict_path(),
                    )
        if settings.backend == "tcg":
            plan = ["tcg"]
        elif settings.backend == "kvm":
            plan = ["kvm"]
        elif _KvmVerdict.works is False or not _kvm_usable():
            plan = ["tcg"]
        else:
            plan = ["kvm", "tcg"]
        for i, mode in enumerate(plan):
            timeout = settings.kvm_launch_timeout_s if mode == "kvm" else settings.launch_timeout_s
            try:
                await self._launch_with_fast_boot(mode, timeout)
            except BackendUnavailable as exc:
                self._failure = exc.message
                if mode == "kvm" and settings.backend == "auto":
                    _KvmVerdict.works = False
                    await trio.to_thread.run_sync(_save_verdict, False)
                    log.warning(
                        "guestfs %s: KVM launch failed (%s); using TCG from now on in this process",
                        self.name,
                        exc.message,
                    )
                if i == len(plan) - 1:
                    raise
                continue
            if mode == "kvm":
                if _KvmVerdict.works is not True:
                    await trio.to_thread.run_sync(_save_verdict, True)
                _KvmVerdict.works = True
            return

    async def _launch_with_fast_boot(self, mode: str, timeout: float) -> None:
        """One launch in ``mode``, from the fast-boot appliance when there is one; a fast-boot
        launch that fails (not one that times out: that is the accelerator's doing) is retried
        once from libguestfs's own appliance. Only if that one launches is fast boot blamed and
        turned off for the rest of the process: when both fail (KVM unusable, say), the cause
        is elsewhere and fast boot stays on.
        """
        fast = self.settings.fast_boot and _FastBootVerdict.works is not False
        try:
            await self._launch_once(mode, timeout, fast_boot=fast)
        except LaunchTimeout:
            raise
        except BackendUnavailable as exc:
            if not self._fast_boot_used:
                raise
            log.warning(
                "guestfs %s: fast-boot launch failed (%s); trying libguestfs's own appliance",
                self.name,
                exc.message,
            )
            await self._launch_once(mode, timeout, fast_boot=False)
            _FastBootVerdict.works = False
            log.warning(
                "guestfs %s: libguestfs's own appliance launched where fast boot failed: "
                "fast boot is off for the rest of this process",
                self.name,
            )

    async def _launch_once(self, mode: str, timeout: float, *, fast_boot: bool) -> None:
        self._fast_boot_used = False
        tmpdir = tempfile.mkdtemp(prefix="snapfs-gfs-")
        self.attempt_markers.append(tmpdir)
        settings = self.settings

        def create() -> Any:
            import guestfs

            g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
            try:
                # The overlay of each read-only drive lands in tmpdir: it names our qemu.
                g.set_tmpdir(tmpdir)
                g.set_memsize(settings.memsize_mb)
                if mode == "tcg":
                    g.set_backend_settings(["force_tcg"])
                if fast_boot:
                    fast = appliance.prepare(g.get_cachedir(), g.get_path())
                    if fast is not None:
                        g.set_path(str(fast.path))
                        self._fast_boot_used = True
                if settings.debug:
                    _route_events(g, self.name)
                for index, (disk_name, sock) in enumerate(self.disks):
                    # For the nbd protocol the "filename" is the export name. The label
                    # ties the appliance's device to this drive: the appliance scans its
                    # SCSI disks asynchronously, so /dev/sdX order is not drive order.
                    g.add_drive_opts(
                        self.export_names.get(disk_name, ""),
                        format="raw",
                        protocol="nbd",
                        server=[f"unix:{sock}"],
                        readonly=self.readonly,
                        name=disk_name,
                        label=drive_label(index),
                    )
            except BaseException:
                g.close()
                raise
            return g

        try:
            g = await trio.to_thread.run_sync(create, limiter=self._limiter)
        except RuntimeError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise BackendUnavailable(f"guestfs {self.name}: cannot set up handle: {exc}") from exc

        timed_out = False
        done = trio.Event()

        async def watchdog() -> None:
            nonlocal timed_out
            with trio.move_on_after(timeout):
                await done.wait()
                return
            timed_out = True
            log.error(
                "guestfs %s: %s launch did not finish in %.0f s: killing its qemu",
                self.name,
                mode,
                timeout,
            )
            while not done.is_set():
                pids = await trio.to_thread.run_sync(find_qemu_pids, tmpdir)
                _kill_pids(pids)
                with trio.move_on_after(0.5):
                    await done.wait()

        log.info(
            "guestfs %s: launching appliance (%s%s, %d MiB, %d disk(s), timeout %.0f s)",
            self.name,
            mode,
            ", fast boot" if self._fast_boot_used else "",
            settings.memsize_mb,
            len(self.disks),
            timeout,
        )
        start = time.monotonic()
        error: str | None = None
        abandoned = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            try:
                with trio.move_on_after(timeout + _KILL_GRACE_S) as hard_stop:
                    # cancellable: only so a launch that ignores the kill can be abandoned.
                    await trio.to_thread.run_sync(g.launch, cancellable=True, limiter=self._limiter)
                if hard_stop.cancelled_caught:
                    abandoned = True
                    error = "launch hung even after its qemu was killed; handle abandoned"
            except RuntimeError as exc:
                error = str(exc).splitlines()[0]
            finally:
                done.set()
        elapsed = time.monotonic() - start
        if abandoned:
            log.error("guestfs %s: %s", self.name, error)
            raise LaunchTimeout(f"guestfs {self.name}: {error}")
        if timed_out or error is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_handle, g, limiter=self._limiter)
                await trio.to_thread.run_sync(_kill_pids, find_qemu_pids(tmpdir))
            shutil.rmtree(tmpdir, ignore_errors=True)
            if timed_out:
                raise LaunchTimeout(
                    f"guestfs {self.name}: {mode} launch timed out after {timeout:.0f} s"
                )
            log.error(
                "guestfs %s: %s launch failed after %.1f s: %s", self.name, mode, elapsed, error
            )
            raise BackendUnavailable(f"guestfs {self.name}: appliance launch failed: {error}")
        self._generation += 1
        self._g = g
        self._tmpdir = tmpdir
        self._state = LaunchState(self._generation)
        self.launch_count += 1
        self.last_launch_backend = mode
        self.last_used = trio.current_time()
        self.last_launch_fast_boot = self._fast_boot_used
        log.info(
            "guestfs %s: appliance up in %.1f s (%s%s)",
            self.name,
            elapsed,
            mode,
            ", fast boot" if self._fast_boot_used else "",
        )

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown_appliance(self) -> None:
        """Stop the appliance (idle or LRU eviction); the next call launches a new one."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                await self._shutdown_locked()

    async def _shutdown_locked(self) -> None:
        g, tmpdir = self._g, self._tmpdir
        self._g = None
        self._state = None
        if g is None:
            return
        log.info("guestfs %s: shutting down appliance", self.name)
        try:
            await trio.to_thread.run_sync(_close_handle, g, limiter=self._limiter)
            if tmpdir is not None:
                # g.close() waits for qemu; anything left is a qemu it lost track of.
                _kill_pids(await trio.to_thread.run_sync(find_qemu_pids, tmpdir))
                shutil.rmtree(tmpdir, ignore_errors=True)
            self._tmpdir = None
        finally:
            if self.after_shutdown is not None:
                await self.after_shutdown()

    async def aclose(self) -> None:
        """Close for good: stop the appliance; later calls fail with BackendUnavailable."""
        self._closed = True
        await self.shutdown_appliance()
        if self._pool is not None:
            self._pool.unregister(self)


def _close_handle(g: Any) -> None:
    try:
        g.shutdown()
    except RuntimeError as exc:
        log.debug("guestfs shutdown: %s", exc)
    g.close()


def _route_events(g: Any, name: str) -> None:
    """Send libguestfs library, appliance and trace messages to logging at DEBUG."""
    import guestfs

    glog = logging.getLogger(f"{__name__}.libguestfs")

    def callback(event: int, event_handle: int, buf: Any, array: Any) -> None:
        text = buf.decode("utf-8", "replace") if isinstance(buf, bytes) else str(buf)
        glog.debug("%s: %s", name, text.rstrip())

    events = guestfs.EVENT_LIBRARY | guestfs.EVENT_APPLIANCE | guestfs.EVENT_TRACE
    g.set_event_callback(callback, events)
    g.set_verbose(True)
