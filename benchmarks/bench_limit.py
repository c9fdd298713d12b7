"""How close the activation-cache pass comes to this machine's arithmetic limit (issue 19 part 3).

    .venv/bin/python benchmarks/bench_limit.py                 # both cores (torch's default threads)
    .venv/bin/python benchmarks/bench_limit.py --threads 1

The pass is the biggest part of the README's main command: SmolLM2-135M-Instruct (the offline
GGUF, fp32) computes blocks 0-28 once for every distinct text of the balanced SMS split. This
script measures, in one process (glibc told to keep freed memory, as the CLI does), for the
pass computing every token and for the pass computing shared prefixes once:

1. the pass itself (`ActivationStore`, best of `--passes`), as FLOP/s: the FLOPs of every
   token of every distinct text (linear layers: 2 · parameters per token; causal attention:
   4 · heads · head_dim per query-key pair) over its wall time, so tokens that shared prefixes
   skip count as done;
2. the machine's fp32 GEMM throughput at the pass's shapes (`x Wᵀ` for every linear layer of a
   block, the real weights): at 2048 token rows (`max_tokens`, the largest batch; best of
   `--repeats`), and, as seconds, at the token rows of each of the pass's own batches (padding
   included): the time its GEMMs alone would take.

`fraction_of_2048_row_gemm` is (1) over the 2048-row GEMM rate; `fraction_of_own_gemms` is
the GEMM-alone time over the pass's time.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from common import spam_classifier, timed

MAX_TOKENS = 2048  # ActivationStore's batch size in tokens


def spam_setup():
    """The main command's model and training/validation/test token sequences."""
    model, loaders = spam_classifier()
    return model, [ids for loader in loaders.values() for ids in loader.dataset.token_ids]


def block_linears(model) -> list[tuple[str, torch.Tensor]]:
    block = model.backbone.blocks[0]
    return [(name, module.weight) for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]


def wall(fn) -> float:
    return timed(fn, "cpu")[0]


def gemm_seconds(weight: torch.Tensor, rows: int, repeats: int) -> float:
    """The best time of x Wᵀ for x (rows, in)."""
    x = torch.randn(rows, weight.shape[1])
    torch.nn.functional.linear(x, weight)  # warm-up
    return min(wall(lambda: torch.nn.functional.linear(x, weight)) for _ in range(repeats))


def gemm_limit(model, batch_rows: list[int], blocks: int, repeats: int) -> tuple[float, float]:
    """(GFLOP/s at MAX_TOKENS rows, seconds of the pass's GEMMs alone): every linear layer of
    the frozen blocks at the token rows of each of the pass's batches (padding included)."""
    weights = [w.detach().clone() for _, w in block_linears(model)]
    peak = sum(2 * MAX_TOKENS * w.numel() for w in weights) / sum(gemm_seconds(w, MAX_TOKENS, repeats) for w in weights)
    counts = Counter(batch_rows)
    seconds = sum(n * blocks * sum(gemm_seconds(w, rows, max(3, repeats // 4)) for w in weights)
                  for rows, n in counts.items())
    return peak / 1e9, seconds


def pass_flops(model, sequences: list[tuple[int, ...]], blocks: int) -> float:
    """Linear + causal attention FLOPs of blocks[:blocks] over every token of `sequences`."""
    cfg = model.backbone.cfg
    per_token = 2 * sum(w.numel() for _, w in block_linears(model))
    tokens = sum(len(s) for s in sequences)
    pairs = sum(len(s) * (len(s) + 1) // 2 for s in sequences)  # causal query-key pairs
    return blocks * (per_token * tokens + 4 * cfg.n_heads * cfg.head_dim * pairs)


def time_pass(model, sequences, start: int, share_prefixes: bool, passes: int) -> float:
    from llmft.training.activation_cache import ActivationStore

    return min(wall(lambda: ActivationStore(model, sequences, start, torch.device("cpu"),
                                             share_prefixes=share_prefixes)) for _ in range(passes))


def measure(args) -> dict:
    from llmft.training.activation_cache import SLOTS_PER_TOKEN, cache_start
    from llmft.training.resources import keep_freed_memory
    from llmft.training.shared_prefixes import plan_prefixes, wave_batches

    freed_memory_kept = keep_freed_memory()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    model, sequences = spam_setup()
    start = cache_start(model)
    distinct = list(dict.fromkeys(map(tuple, sequences)))
    flops = pass_flops(model, distinct, start)
    result = {"threads": torch.get_num_threads(), "malloc_keeps_freed_memory": freed_memory_kept,
              "frozen_blocks": start, "distinct_texts": len(distinct), "tokens": sum(map(len, distinct)),
              "pass_gflop": round(flops / 1e9, 1)}
    for share in (False, True):
        plan = plan_prefixes(distinct, share)
        batches = wave_batches(plan, MAX_TOKENS, SLOTS_PER_TOKEN * MAX_TOKENS)
        rows = [len(b) * max(map(plan.new_length, b)) for b in batches]
        peak, gemm_only = gemm_limit(model, rows, start, args.repeats)
        seconds = time_pass(model, sequences, start, share, args.passes)
        result["shared_prefixes" if share else "every_token"] = {
            "batches": len(batches), "waves": max(plan.waves) + 1, "token_rows_computed": sum(rows),
            "seconds": round(seconds, 2), "gflops": round(flops / seconds / 1e9, 1),
            "gemm_gflops_at_2048_rows": round(peak, 1), "fraction_of_2048_row_gemm": round(flops / seconds / 1e9 / peak, 3),
            "gemm_only_seconds_at_these_batches": round(gemm_only, 2), "fraction_of_own_gemms": round(gemm_only / seconds, 3)}
    result["speedup_from_sharing"] = round(result["every_token"]["seconds"] / result["shared_prefixes"]["seconds"], 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--repeats", type=int, default=12, help="GEMM timings per shape at 2048 rows (the best counts)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per variant (the best counts)")
    args = p.parse_args()
    print(json.dumps(measure(args), indent=1))


if __name__ == "__main__":
    main()
