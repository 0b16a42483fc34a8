"""server.process_memory: freed large blocks leave the process (a child process each: the setting is global)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# After glibc has freed one mmapped 24 MiB block, its sliding threshold serves 4 MiB blocks from the heap and
# keeps them when they are freed; the child prints how many MiB its resident set fell when eight were freed.
CHILD = textwrap.dedent("""
    import ctypes, sys
    from server.process_memory import return_large_frees_to_os
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "fixed" and not return_large_frees_to_os():
        raise SystemExit("mallopt refused")
    libc.free(libc.malloc(24 << 20))
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    blocks = [libc.malloc(4 << 20) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, 4 << 20)
    before = rss()
    for b in blocks:
        libc.free(b)
    print((before - rss()) >> 20)
""")

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")


def _released_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout.strip())


@glibc
def test_freed_large_blocks_are_returned_with_the_fixed_threshold() -> None:
    assert _released_mib("fixed") >= 30  # 32 MiB freed, all of it unmapped


@glibc
def test_glibc_default_keeps_them_which_is_what_the_fix_is_for() -> None:
    # the reference: without the fixed threshold the same frees leave the resident set as it was
    assert _released_mib("default") <= 2
