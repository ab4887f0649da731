"""Settings of the libguestfs layer: which accelerator, how long a launch may take, how many
appliances may live at once, and how big each one is.

Pure data, no I/O; ``snapfs.config`` (the lead's) builds one from the user's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Backend = Literal["auto", "kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class GuestfsSettings:
    """How appliances are launched and kept.

    ``backend``: "kvm" and "tcg" force an accelerator; "auto" tries KVM (when /dev/kvm is usable)
    with ``kvm_launch_timeout_s`` and falls back to TCG if that launch fails or hangs, remembering
    the verdict for the rest of the process (KVM guests hang on some hosts that have /dev/kvm).
    """

    backend: Backend = "auto"
    # A TCG launch takes 20-40 s on a 2-core machine, more while other appliances boot: 300 s
    # only catches a launch that is truly stuck.
    launch_timeout_s: float = 300.0
    # A working KVM launch takes 3-10 s; past 60 s it is hung, not slow.
    kvm_launch_timeout_s: float = 60.0
    # Each appliance is a qemu with memsize_mb of guest RAM and a busy CPU while booting.
    max_appliances: int = 4
    # An idle appliance is shut down after this long; its caches stay (snapshots are immutable).
    idle_timeout_s: float = 300.0
    # libguestfs' default is 1280 MiB; 768 is plenty for read-only browsing and lets more
    # appliances fit.
    memsize_mb: int = 768
    # Boot the appliance from an uncompressed copy of its kernel (guestfs/appliance.py): 4-5 s
    # less per TCG launch here. Off: libguestfs's own appliance, as it ships.
    fast_boot: bool = True
    # Forward libguestfs' own library and appliance messages to logging (DEBUG level).
    debug: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "kvm", "tcg"):
            raise ValueError(f"guestfs backend must be auto, kvm or tcg, not {self.backend!r}")
        if self.max_appliances < 1:
            raise ValueError("max_appliances must be at least 1")
        if self.launch_timeout_s <= 0 or self.kvm_launch_timeout_s <= 0:
            raise ValueError("launch timeouts must be positive")
        if self.memsize_mb < 256:
            raise ValueError("memsize_mb below 256 cannot boot the appliance")
