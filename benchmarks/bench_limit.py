"""How close the activation-cache pass comes to this machine's arithmetic limit (issue 19 part 3).

    .venv/bin/python benchmarks/bench_limit.py                 # both cores (torch's default threads)
    .venv/bin/python benchmarks/bench_limit.py --threads 1

The pass is the biggest part of the README's main command: SmolLM2-135M-Instruct (the offline
GGUF, fp32) computes blocks 0-28 once for every distinct text of the balanced SMS split. This
script measures, in one process:

1. the machine's fp32 GEMM throughput at the pass's shapes: `x Wᵀ` for every linear layer of a
   block (q, k, v, o, gate, up, down) at the pass's batch size (`max_tokens` = 2048 token rows),
   best of `--repeats`; the limit is their FLOP-weighted harmonic mean (the rate at which the
   pass's GEMMs alone would run);
2. the pass itself (`ActivationStore`, best of `--passes`), once without and once with shared
   prefixes computed once; its FLOPs are the linear layers' (2 · parameters per token) and
   causal attention's (4 · heads · head_dim per query-key pair), counted for every token of every
   distinct text, so the prefix-sharing pass gets no credit for FLOPs it skips in its own rate;
   the ratio of the two wall times says what skipping them buys.

Prints one JSON object (and a markdown table with --markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 2048  # ActivationStore's batch size in tokens


def spam_setup():
    """The main command's model and distinct training/validation/test token sequences."""
    os.environ.setdefault("LLMFT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from llmft.data.classification import label_names, longest
    from llmft.pipelines.classification import ClassifyOptions, build_classifier, load_splits, make_loaders
    from llmft.weights import load_pretrained

    opts = ClassifyOptions(model="smollm2-135m-instruct", data="sms-spam", out=Path("/tmp/unused"))
    splits = load_splits(opts)
    labels = label_names(splits)
    pretrained = load_pretrained(opts.model)
    max_length = min(longest(splits.train, pretrained.tokenizer), pretrained.config.context_length)
    loaders = make_loaders(splits, pretrained.tokenizer, labels, max_length, 8, 123, None)
    model, _ = build_classifier(opts, pretrained, labels)
    sequences = [ids for loader in loaders.values() for ids in loader.dataset.token_ids]
    return model, sequences


def block_linears(model) -> list[tuple[str, torch.Tensor]]:
    block = model.backbone.blocks[0]
    return [(name, module.weight) for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]


def gemm_rates(model, repeats: int) -> dict[str, float]:
    """GFLOP/s of x Wᵀ, x (2048, in), for each linear layer of a block: best of `repeats`."""
    rates = {}
    for name, weight in block_linears(model):
        x = torch.randn(MAX_TOKENS, weight.shape[1])
        w = weight.detach().clone()
        flops = 2 * MAX_TOKENS * w.shape[0] * w.shape[1]
        torch.nn.functional.linear(x, w)  # warm-up
        best = min(timed(lambda: torch.nn.functional.linear(x, w)) for _ in range(repeats))
        rates[name] = flops / best / 1e9
    return rates


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pass_flops(model, sequences: list[tuple[int, ...]], blocks: int) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of blocks[:blocks] over every token of `sequences`."""
    cfg = model.backbone.cfg
    per_token = 2 * sum(w.numel() for _, w in block_linears(model))
    tokens = sum(len(s) for s in sequences)
    pairs = sum(len(s) * (len(s) + 1) // 2 for s in sequences)  # causal query-key pairs
    return blocks * per_token * tokens, blocks * 4 * cfg.n_heads * cfg.head_dim * pairs


def time_pass(model, sequences, start: int, share_prefixes: bool, passes: int) -> float:
    from llmft.training.activation_cache import ActivationStore

    seconds = []
    for _ in range(passes):
        began = time.perf_counter()
        ActivationStore(model, sequences, start, torch.device("cpu"), share_prefixes=share_prefixes)
        seconds.append(time.perf_counter() - began)
    return min(seconds)


def measure(args) -> dict:
    from llmft.training.activation_cache import cache_start
    from llmft.training.shared_prefixes import plan_prefixes

    if args.threads:
        torch.set_num_threads(args.threads)
    model, sequences = spam_setup()
    start = cache_start(model)
    distinct = list(dict.fromkeys(map(tuple, sequences)))
    rates = gemm_rates(model, args.repeats)
    weights = {name: w.numel() for name, w in block_linears(model)}
    limit = sum(weights.values()) / sum(weights[n] / rates[n] for n in rates)  # FLOP-weighted harmonic mean
    linear, attention = pass_flops(model, distinct, start)
    plan = plan_prefixes(distinct)
    result = {"threads": torch.get_num_threads(), "frozen_blocks": start, "distinct_texts": len(distinct),
              "tokens": sum(map(len, distinct)), "tokens_computed_with_sharing": plan.new_tokens(),
              "waves": max(plan.waves) + 1,
              "gemm_gflops": {n: round(r, 1) for n, r in rates.items()}, "gemm_limit_gflops": round(limit, 1),
              "pass_gflop": round((linear + attention) / 1e9, 1), "attention_share": round(attention / (linear + attention), 4)}
    for share in (False, True):
        seconds = time_pass(model, sequences, start, share, args.passes)
        rate = (linear + attention) / seconds / 1e9
        key = "shared_prefixes" if share else "every_token"
        result[key] = {"seconds": round(seconds, 2), "gflops": round(rate, 1), "fraction_of_limit": round(rate / limit, 3)}
    result["speedup_from_sharing"] = round(result["every_token"]["seconds"] / result["shared_prefixes"]["seconds"], 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--repeats", type=int, default=20, help="GEMM timings per shape (the best counts)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per variant (the best counts)")
    args = p.parse_args()
    print(json.dumps(measure(args), indent=1))


if __name__ == "__main__":
    main()
