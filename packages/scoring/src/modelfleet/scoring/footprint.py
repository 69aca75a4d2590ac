"""Process-wide memory settings for small devices: fewer malloc arenas, freed heap handed back.

glibc gives each thread that allocates its own arena (up to 8 x cores); a
process with a few long-lived threads (the agent's MQTT loop, scoring pool,
loads) then keeps several MiB of freed memory in each. Two arenas cost nothing
measurable and save ~5 MiB of the agent's idle RSS (the scoring server, whose
threads are short-lived, gains ~0.1 MiB and does not limit them). `trim_heap`
returns pages freed by a model load or swap. Both are no-ops off glibc.
The agent imports these from here: one copy for both processes.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

_M_ARENA_MAX = -8


@functools.cache
def _libc() -> Any:
    """The C library already loaded into the process (no ldconfig run, unlike find_library)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no "main program" handle
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Call early: glibc fixes its arena limit once 8 arenas exist. MALLOC_ARENA_MAX in the env wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)


def trim_heap() -> None:
    """Give freed heap pages back to the OS (after a load, or after a swap released the old version)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
