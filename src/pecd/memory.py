"""Process-wide memory settings of a pecd server (docs/performance.md, "Large messages")."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1024 * 1024


def return_freed_messages_to_the_system(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve each allocation of ``threshold`` bytes or more with its own mapping, which
    goes back to the system as soon as it is freed.

    glibc's default threshold starts at 128 KiB and rises, up to 32 MiB, each time such a block is
    freed; from then on buffers the size of a message come from the heaps (one per thread that
    allocates: the event loop, the database thread, the Maildir threads), where a freed one
    mostly stays with the process. With one 25 MB message (tests/test_large_message.py) the
    server peaked at 449 MiB without this and 351 MiB with it, and without it stayed near its
    peak afterwards. A fixed threshold also turns the rise off. Returns False, changing nothing,
    where glibc's ``mallopt`` is not available.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay with the process")
    return ok
