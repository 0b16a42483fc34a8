"""Hand large freed blocks back to the OS, so the ServerApp's peak memory is what it holds, not what it held.

A round folds one site's update into a running sum at a time (``server.streaming_aggregation``); every reply
and every decoded tensor is freed once folded. glibc's ``malloc`` serves blocks of 128 KiB and more with
``mmap`` and returns them on ``free``, but it raises that threshold to the size of each such block freed (up
to 32 MiB): after the first reply, a paper-size model's tensors (1-12 MiB each) come from the heap instead,
where freed space is kept and fragmented. Measured by ``benchmarks/server_memory.py --allocator fixed-mmap
glibc-default`` (paper-p16, 2 to 20 sites, one run): 2.84-2.92x the fp32 model with the sliding threshold,
2.74-2.76x with it fixed at 1 MiB. Fixing it costs a page fault per touched page of each large tensor, which a
round of network exchanges does not notice.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "return_large_frees_to_os"]

log = logging.getLogger(__name__)

#: Blocks of this size or more get their own mapping, unmapped when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; ``False`` where there is no glibc.

    Process-wide and idempotent: the ServerApp calls it when it starts a run.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (musl and macOS have no mallopt)
        log.debug("no glibc mallopt: large frees stay with the allocator")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
