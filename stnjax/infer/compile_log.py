"""Whether a compilation was served by JAX's persistent compilation cache.

JAX reports each lookup of its persistent cache as a monitoring event (a
hit, or a miss that then compiles and writes the entry); `watch` counts the
events during a block, so a caller can log "loaded from the compilation
cache" instead of "compiled" (a second `segment` call on a seen bucket
compiles nothing, and says so). With the cache off no event comes: the
block counts as compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import jax

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


@dataclasses.dataclass
class CacheLookups:
    """Persistent-cache lookups seen during a `watch` block."""
    hits: int = 0
    misses: int = 0

    @property
    def loaded(self) -> bool:
        """Served entirely from the cache (at least one hit, no miss)."""
        return self.hits > 0 and self.misses == 0


@contextlib.contextmanager
def watch() -> Iterator[CacheLookups]:
    """Counts the persistent-cache hits and misses of the block's compilations.

    Listeners are process-wide, and device threads compile other programs
    at the same time; JAX reports a lookup on the thread that compiles, so
    only this thread's events are counted."""
    seen = CacheLookups()
    owner = threading.get_ident()

    def listener(event: str, **_: object) -> None:
        if threading.get_ident() != owner:
            return
        if event == _HIT:
            seen.hits += 1
        elif event == _MISS:
            seen.misses += 1

    jax.monitoring.register_event_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_listener(listener)
