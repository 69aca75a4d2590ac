"""footprint: the malloc arena limit really applies (glibc), the environment wins, trimming is safe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Six threads allocate while alive; glibc's malloc_info then lists one <heap> per arena.
_PROBE = r"""
import ctypes, os, re, sys, tempfile, threading
import numpy  # as in the agent: NumPy (and its BLAS thread) may come first
from modelfleet.scoring.footprint import limit_malloc_arenas, trim_heap
if sys.argv[1] == "limit":
    limit_malloc_arenas()
ready = threading.Barrier(7)
done = threading.Event()
def work():
    keep = [bytearray(200) for _ in range(5000)]
    ready.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
ready.wait()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
fd, path = tempfile.mkstemp()
stream = libc.fdopen(fd, b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(len(re.findall(r"<heap nr=", open(path).read())))
os.unlink(path)
done.set()
for t in threads:
    t.join()
trim_heap()
"""


def _arenas(mode: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=environ, capture_output=True,
                         text=True, timeout=60, check=True)
    return int(out.stdout.strip())


@pytest.fixture(autouse=True)
def _glibc_only() -> None:
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("malloc arenas are a glibc feature")


def test_limit_malloc_arenas_caps_arenas_even_after_numpy_started_its_thread() -> None:
    assert _arenas("none") > 2  # without the limit each allocating thread gets an arena
    assert _arenas("limit") <= 2


def test_malloc_arena_max_in_the_environment_wins() -> None:
    assert _arenas("limit", MALLOC_ARENA_MAX="3") == 3
