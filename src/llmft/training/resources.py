"""Peak memory, measured the same way in training runs and benchmarks; the CPU threads torch uses."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch

from llmft.errors import LlmftError


def set_threads(threads: int | None) -> None:
    """Let torch's CPU ops use `threads` threads (None: torch's own default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise LlmftError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


# glibc's mallopt parameters (malloc.h) and the values llmft sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # the heap keeps up to 1 GiB of freed memory for the next blocks


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse the memory torch frees instead of handing it back to the OS.

    A CPU forward pass allocates and frees activations of a few MB per op; by default glibc
    serves blocks that large with fresh pages from the OS (page faults, zeroing) each time: the
    activation cache's frozen blocks ran 7-20 % faster without that (docs/benchmarks.md, "The
    machine's limit"). True if set (Linux with glibc), else False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process otherwise."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2**20 if sys.platform == "darwin" else rss / 2**10, 1)
