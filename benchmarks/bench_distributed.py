"""The classification activation-cache pass on N processes (docs/benchmarks.md, issue 13).

    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py

SmolLM2-135M-Instruct (the offline GGUF), the book's balanced SMS split, the default recipe's
frozen prefix (every block before the trainable last one), one torch thread per process: the
wall time of computing and exchanging the cached states. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    from common import spam_classifier
    from llmft.training.activation_cache import cache_start, cached_loaders
    from llmft.training.distributed import init_distributed

    w = init_distributed("cpu")
    model, loaders = spam_classifier()
    start = time.perf_counter()
    cached_loaders(model, loaders, 123, torch.device("cpu"), cache_start(model))
    seconds = time.perf_counter() - start
    if w.is_main:
        print(json.dumps({"processes": w.size, "cache_seconds": round(seconds, 2), "frozen_blocks": cache_start(model)}))


if __name__ == "__main__":
    main()
