"""Peak memory, measured the same way in training runs and benchmarks; the CPU threads torch uses."""

from __future__ import annotations

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


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process otherwise."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2**20 if sys.platform == "darwin" else rss / 2**10, 1)
