"""Where a batch-1 decoding step's time goes (docs/benchmarks.md, "Shared prompt prefixes in
decoding": the bound).

    LLMFT_DATA_DIR=../shared/data .venv/bin/python benchmarks/profile_step.py

SmolLM2-135M-Instruct (the offline GGUF, fp32) answers one of the `answer` suite's prompts, 64
new tokens, no guesses, 1 thread, with and without prepacked weights: the step time without a
profiler, then `torch.profiler`'s table of one more run. The Linear layers' share (`mm`, or
oneDNN's `_linear_pointwise` when prepacked) is the time spent reading the weights.
"""

from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile

import bench_answer
import llmft.generation as g

NEW_TOKENS = 64


def answer(model, prompt: list[int]) -> None:
    g.generate_tokens(model, [prompt], max_new_tokens=NEW_TOKENS, eos_ids=[], draft_tokens=0)


def main() -> None:
    model, prompts, _ = bench_answer.one_process(2)
    for prepack in (True, False):
        with g.decoding_session(model, prepack=prepack):
            answer(model, prompts[0])  # warm-up
            for _ in range(2):
                began = time.perf_counter()
                answer(model, prompts[1])
                print(f"prepack={prepack}: {(time.perf_counter() - began) / NEW_TOKENS * 1000:.1f} ms a step "
                      "(the prefill spread over the steps)")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                answer(model, prompts[1])
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))
        print(f"self CPU time a step: {sum(e.self_cpu_time_total for e in events) / 1000 / NEW_TOKENS:.1f} ms, "
              f"{sum(e.count for e in events) / NEW_TOKENS:.0f} operator calls a step")


if __name__ == "__main__":
    main()
