"""Probing NBD URIs for the catalog of an NBD source: size, allocation, bitmap presence.

Blocking (a connection and a block-status pass per URI): the catalog loader calls
``probe_uris`` from a worker thread; it probes in parallel threads, each bounded by a
timeout, so one unreachable server cannot hang a mount.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

import nbd

from snapfs.nbd.extents import query_extents

# An NBD handshake over a LAN takes milliseconds; a server that has not answered in this
# long is reported as broken rather than holding up the whole mount.
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class UriFacts:
    size: int = 0
    allocated: int = 0
    error: str | None = None


def _connect(uri: str, contexts: tuple[str, ...]) -> Any:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # the URI comes from the user's own source file
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.connect_uri(uri)
    return h


def bitmap_context(bitmap: str) -> str:
    return bitmap if bitmap.startswith("qemu:") else f"qemu:dirty-bitmap:{bitmap}"


def probe_uri(uri: str, dirty_bitmap: str | None = None) -> UriFacts:
    contexts = (nbd.CONTEXT_BASE_ALLOCATION,) + (
        (bitmap_context(dirty_bitmap),) if dirty_bitmap else ()
    )
    try:
        h = _connect(uri, contexts)
        try:
            size = h.get_size()
            allocated = query_extents(h, size).data_bytes
            if dirty_bitmap and not h.can_meta_context(bitmap_context(dirty_bitmap)):
                return UriFacts(size, allocated, f"server does not offer {dirty_bitmap}")
            return UriFacts(size, allocated)
        finally:
            h.shutdown()
    except (nbd.Error, RuntimeError) as exc:
        return UriFacts(error=str(exc))


def probe_uris(items: list[tuple[str, str | None]]) -> list[UriFacts]:
    """Probe (uri, dirty bitmap) pairs in parallel, each within ``PROBE_TIMEOUT_S``."""
    if not items:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(items)))
    try:
        futures = [pool.submit(probe_uri, uri, bitmap) for uri, bitmap in items]
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=PROBE_TIMEOUT_S))
            except concurrent.futures.TimeoutError:
                results.append(UriFacts(error=f"no answer within {PROBE_TIMEOUT_S:.0f} s"))
        return results
    finally:
        # A hung probe thread is abandoned, not waited for.
        pool.shutdown(wait=False, cancel_futures=True)
