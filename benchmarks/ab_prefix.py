"""Prompt prefills with and without the shared prefix's keys and values, in one process, ABBA
(docs/benchmarks.md, "Shared prompt prefixes in decoding").

    LLMFT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ab_prefix.py --prompts 16 --rounds 4

SmolLM2-135M-Instruct (the offline GGUF) and the `answer` suite's prompts (the book's test
instructions in the model's chat template, whose system prompt every prompt begins with), one
new token each, so that the time is the prefills': batches of 1 and of 8, 1 thread, one
decoding session per set (as `instruct respond` and the `answer` suite run). "off" turns the
session's `PrefixStore` and the batch's one-row prefix pass off. Prints seconds per round, the
token ids each variant embedded, and whether the first tokens agree.
"""

from __future__ import annotations

import json
import time

import bench_answer
import llmft.generation as g


def first_tokens(model, prompts, eos, batch: int, share: bool) -> tuple[float, int, list[list[int]]]:
    """Seconds, token ids embedded, and the first new token of every prompt, for one set."""
    counts: list[int] = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: counts.append(args[0].numel()))
    known, least = g.PrefixStore.known, g.SHARED_PREFIX_MIN_TOKENS
    if not share:
        g.PrefixStore.known, g.SHARED_PREFIX_MIN_TOKENS = (lambda self, tokens: 0), 10 ** 9
    try:
        began = time.perf_counter()
        with g.decoding_session(model):
            out = [row for i in range(0, len(prompts), batch) for row in g.generate_tokens(
                model, prompts[i:i + batch], max_new_tokens=1, eos_ids=eos)]
        return time.perf_counter() - began, sum(counts), out
    finally:
        hook.remove()
        g.PrefixStore.known, g.SHARED_PREFIX_MIN_TOKENS = known, least


def main() -> None:
    args = bench_answer.ab_arguments(__doc__, prompts=16, rounds=4)
    model, prompts, eos = bench_answer.one_process(args.prompts)
    shared = min(g.common_prefix_length(prompts[0], q) for q in prompts)
    report: dict = {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "shared_prefix_tokens": shared}
    for batch in (1, 8):
        first_tokens(model, prompts[:batch], eos, batch, True)  # warm-up (untimed)
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(args.rounds):
            for name in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
                took, embedded, out = first_tokens(model, prompts, eos, batch, name == "on")
                seconds[name].append(round(took, 3))
                report[f"batch {batch} {name} tokens embedded"] = embedded
                report.setdefault(f"batch {batch} first tokens", {})[name] = out
        same = report.pop(f"batch {batch} first tokens")
        report[f"batch {batch} seconds"] = seconds
        report[f"batch {batch} first tokens equal"] = same["on"] == same["off"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
