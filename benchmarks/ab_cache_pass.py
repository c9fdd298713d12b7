"""Two A/B checks of the activation-cache pass behind docs/benchmarks.md ("The machine's limit").

    .venv/bin/python benchmarks/ab_cache_pass.py batching        # one process, ABBA, both cores
    .venv/bin/python benchmarks/ab_cache_pass.py malloc --pairs 5  # alternating processes, 1 thread

`batching`: the whole pass (SmolLM2-135M-Instruct, the main command's texts) with exact-length
batches (no padding: the batching before session 7), batches of similar lengths (at most an
eighth padding) and shared prefixes computed once; seconds per variant and round.
`malloc`: the frozen blocks on four fixed batches, in a fresh process each, glibc's malloc as
it comes ("plain") or told to keep freed memory ("tuned", `keep_freed_memory`); GFLOP/s of the
linear layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_limit import block_linears, spam_setup  # noqa: E402


def batching(rounds: int) -> dict[str, list[float]]:
    import llmft.training.shared_prefixes as sp
    from llmft.training.activation_cache import ActivationStore, cache_start
    from llmft.training.resources import keep_freed_memory

    keep_freed_memory()
    model, sequences = spam_setup()
    start, padding = cache_start(model), sp.MAX_PADDING
    variants = {"exact-length": (0.0, False), "similar-length": (padding, False), "shared-prefixes": (padding, True)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            sp.MAX_PADDING, share = variants[name]
            began = time.perf_counter()
            ActivationStore(model, sequences, start, torch.device("cpu"), share_prefixes=share)
            seconds[name].append(round(time.perf_counter() - began, 2))
    return seconds


def malloc_worker(tuned: bool) -> float:
    from llmft.training.activation_cache import cache_start
    from llmft.training.resources import keep_freed_memory
    from llmft.training.shared_prefixes import run_after_prefixes

    if tuned:
        keep_freed_memory()
    torch.set_num_threads(1)
    model, _ = spam_setup()
    backbone, start = model.backbone.eval(), cache_start(model)
    torch.manual_seed(0)
    batches = [torch.randint(0, 1000, shape) for shape in ((64, 32), (16, 128), (128, 16), (40, 50))]
    per_token = 2 * sum(w.numel() for _, w in block_linears(model)) * start
    with torch.no_grad():
        run = lambda: [run_after_prefixes(backbone, ids, torch.zeros(len(ids), dtype=torch.long), None, start, [])
                       for ids in batches]
        run()  # warm-up
        began = time.perf_counter()
        run(), run()
        seconds = time.perf_counter() - began
    return per_token * 2 * sum(ids.numel() for ids in batches) / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["batching", "malloc", "malloc-worker"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--tuned", action="store_true")
    args = p.parse_args()
    if args.check == "batching":
        print(json.dumps(batching(args.rounds)))
    elif args.check == "malloc-worker":
        print(json.dumps(malloc_worker(args.tuned)))
    else:
        out = {"plain": [], "tuned": []}
        for _ in range(args.pairs):
            for name in out:
                cmd = [sys.executable, __file__, "malloc-worker", *(["--tuned"] if name == "tuned" else [])]
                result = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[name].append(round(json.loads(result.stdout.strip().splitlines()[-1]), 1))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
