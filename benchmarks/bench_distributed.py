"""The classification activation-cache pass on N processes (docs/benchmarks.md, issue 13).

    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py

SmolLM2-135M-Instruct (the offline GGUF), the book's balanced SMS split, the default recipe's
frozen prefix (every block before the trainable last one), one torch thread per process: the
wall time of computing and exchanging the cached states. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("LLMFT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from llmft.pipelines.classification import ClassifyOptions, build_classifier, load_splits, make_loaders
    from llmft.data.classification import label_names, longest
    from llmft.training.activation_cache import cache_start, cached_loaders
    from llmft.training.distributed import init_distributed
    from llmft.weights import load_pretrained

    w = init_distributed("cpu")
    opts = ClassifyOptions(model="smollm2-135m-instruct", data="sms-spam", out=Path("/tmp/unused"))
    splits = load_splits(opts)
    labels = label_names(splits)
    pretrained = load_pretrained(opts.model)
    max_length = min(longest(splits.train, pretrained.tokenizer), pretrained.config.context_length)
    loaders = make_loaders(splits, pretrained.tokenizer, labels, max_length, 8, 123, None)
    model, _ = build_classifier(opts, pretrained, labels)
    start = time.perf_counter()
    cached_loaders(model, loaders, 123, torch.device("cpu"), cache_start(model))
    seconds = time.perf_counter() - start
    if w.is_main:
        print(json.dumps({"processes": w.size, "cache_seconds": round(seconds, 2), "frozen_blocks": cache_start(model)}))


if __name__ == "__main__":
    main()
