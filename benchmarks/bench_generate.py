"""Suite `generate`: greedy decoding speed, llmft (with and without the KV cache) against
`transformers` `generate(do_sample=False, use_cache=True)`: the cost of a decoding step (the
`answer` suite measures whole answers of a real model).

Same weights (one exported safetensors folder), the same random prompts (all of one length,
so no padding on either side) and exactly `new_tokens` new tokens per row: llmft gets no
end-of-text ids, transformers gets `min_new_tokens` and no eos id, so nothing stops early. A
call's time covers the prompt (prefill) and every decoding step. Within a process batch sizes
run smallest first and the peak is reset before each (see common.reset_peak_memory), so each
batch size's peak is the model plus what generating at that size adds.
"""

from __future__ import annotations

from typing import Any

from common import (
    Section, load_hf, load_ours, median, memory_header, peak_memory, ratio_cell, reset_peak_memory,
    seconds_cell, shared_weight_runs, timed,
)

IMPLS = {"hf": "transformers generate (KV cache)", "ours-cache": "llmft generate_tokens, KV cache, no guesses",
         "ours-nocache": "llmft generate_tokens, no cache"}  # baseline first


def _generator(spec: dict[str, Any]):
    """(vocab size, generate(prompts, n) -> new token ids per row) for the spec's implementation."""
    import torch

    device = spec["device"]
    if spec["impl"] == "hf":
        model = load_hf(spec["weights"], device).eval()
        model.generation_config.eos_token_id = None  # nothing may end a row early
        model.generation_config.pad_token_id = 0

        def generate(prompts: torch.Tensor, n: int) -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                     use_cache=True, max_new_tokens=n, min_new_tokens=n)
            return out[:, prompts.shape[1]:].tolist()

        return model.config.vocab_size, generate

    from llmft.generation import generate_tokens

    model = load_ours(spec["weights"], device).eval()
    use_cache = spec["impl"] == "ours-cache"

    def generate(prompts: torch.Tensor, n: int) -> list[list[int]]:
        # no prompt-lookup guesses: random weights repeat themselves, which would flatter them
        return generate_tokens(model, prompts.tolist(), max_new_tokens=n, eos_ids=(), use_cache=use_cache,
                               draft_tokens=0)

    return model.cfg.vocab_size, generate


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device, n = spec["device"], spec["new_tokens"]
    vocab, generate = _generator(spec)
    out: dict[str, Any] = {}
    for batch in sorted(spec["batches"]):
        reset_peak_memory(device)
        seeded = torch.Generator().manual_seed(spec["seed"] + batch)
        prompts = torch.randint(0, vocab, (batch, spec["prompt"]), generator=seeded).to(device)
        generate(prompts, min(n, spec["warmup_tokens"]))
        runs = [timed(lambda: generate(prompts, n), device) for _ in range(spec["repeats"])]
        tokens = runs[0][1]
        if any(len(row) != n for row in tokens):
            raise RuntimeError(f"{spec['impl']}: a row stopped before {n} new tokens")
        out[str(batch)] = {"seconds": [s for s, _ in runs], "tokens": tokens, "peak_memory_mb": peak_memory(device)}
    return {"batches": out}


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    return f"{sum(a == b for a, b in zip(tokens, reference))}/{len(reference)} rows"


def run(args) -> Section:
    rows, raw = [], []

    def spec(impl: str) -> dict[str, Any]:
        return {"batches": args.gen_batches, "prompt": args.prompt_tokens, "new_tokens": args.new_tokens,
                "warmup_tokens": args.warmup_tokens, "repeats": 1 if impl == "ours-nocache" else args.repeats}

    for model, results in shared_weight_runs(args, "generate", list(IMPLS), spec):
        for batch in sorted(args.gen_batches):
            per = {impl: [r["batches"][str(batch)] for r in rs] for impl, rs in results.items()}
            times = {impl: [s for b in bs for s in b["seconds"]] for impl, bs in per.items()}
            tps = {impl: batch * args.new_tokens / median(ts) for impl, ts in times.items()}
            reference = per["hf"][0]["tokens"]
            for impl, bs in per.items():
                rows.append([model if impl == "hf" and batch == min(args.gen_batches) else "",
                             str(batch) if impl == "hf" else "", IMPLS[impl], seconds_cell(times[impl]),
                             f"{tps[impl]:,.1f}", ratio_cell(tps[impl], tps["hf"], impl == "hf"),
                             f"{max(b['peak_memory_mb'] for b in bs):,.0f}",
                             "reference" if impl == "hf" else _agreement(bs[0]["tokens"], reference)])
        raw.append({"model": model, "results": results})
    return Section(
        title="Greedy generation: llmft vs transformers",
        intro=[f"Prompts of {args.prompt_tokens} random token ids, exactly {args.new_tokens} new tokens per row "
               f"(no end-of-text can stop a row), greedy, fp32 on `{args.device}`, batch sizes "
               f"{', '.join(map(str, sorted(args.gen_batches)))} (no padding: all prompts have the same length). "
               f"One untimed warm-up call of {min(args.new_tokens, args.warmup_tokens)} new tokens per batch size "
               f"and process, then {args.repeats} timed call(s) per process (1 without the cache: it recomputes the "
               f"whole sequence every step) × {args.rounds} processes per implementation, launched in ABBA order. "
               "Time per call includes the prompt; "
               f"new tokens/s = batch · {args.new_tokens} / median call time. Same safetensors weights on both sides."],
        headers=["model", "batch", "implementation", "seconds per call: median (min–max)", "new tokens/s",
                 "speed vs transformers", memory_header(args.device), "same tokens as transformers"],
        rows=rows,
        notes=["\"same tokens\": greedy continuations of random-weight models, compared row by row; fp32 "
               "rounding differences can flip a near-tie, so an occasional differing row is not a bug by itself.",
               "llmft runs with its default oneDNN-prepacked weights (packed in every timed call) and without "
               "prompt-lookup guesses (random weights repeat themselves, which would flatter them; the `answer` "
               "suite measures them on real answers)."],
        raw=raw,
    )
