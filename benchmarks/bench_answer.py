"""Suite `answer`: greedy answers of a real model to real instructions, llmft against
`transformers` `generate(do_sample=False)`.

The `generate` suite's random weights and random prompts measure the cost of a decoding step;
what a user waits for is a pretrained chat model answering instructions, where answers end at
different lengths and copy from their prompt. Here: SmolLM2-135M-Instruct (the offline GGUF,
dequantised to fp32 and exported once to a safetensors folder that both sides load), the first
`--answer-prompts` entries of the book's instruction data test split (the seeded split
`llmft instruct train` makes) in the model's chat template, the same prompt token ids on both
sides, at most `--answer-tokens` new tokens, stopping at the template's end-of-turn / end-of-text.

Batches: prompts sorted by length and cut into batches of 1 or 8 (the same batches on both
sides; transformers left-pads with an attention mask). A variant's time is the whole set,
llmft's weight packing included; tokens/s = new tokens (up to the stop token) / that time.
Variants: transformers; llmft as it runs by default (prepacked weights, prompt-lookup guesses
for a single row); llmft with both turned off.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common import (
    Section, load_hf, load_ours, median, memory_header, peak_memory, ratio_cell, reset_peak_memory,
    run_interleaved, seconds_cell, timed,
)

MODEL = "smollm2-135m-instruct"
IMPLS = {"hf": "transformers generate", "ours": "llmft generate_tokens (default)",
         "ours-plain": "llmft, prepack and guesses off"}  # baseline first


def _answerer(spec: dict[str, Any]):
    """answer(batches) -> new token ids per prompt, for the spec's implementation."""
    import torch

    device, eos, n = spec["device"], spec["eos_ids"], spec["new_tokens"]
    if spec["impl"] == "hf":
        model = load_hf(spec["weights"], device).eval()

        def answer_batch(prompts: list[list[int]]) -> list[list[int]]:
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     eos_token_id=eos, pad_token_id=eos[0])
            rows = out[:, width:].tolist()
            return [row[:next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]

        def answer(batches: list[list[list[int]]]) -> list[list[int]]:
            return [row for batch in batches for row in answer_batch(batch)]

        return answer

    from llmft.generation import DRAFT_TOKENS, decoding_session, generate_tokens

    model = load_ours(spec["weights"], device).eval()
    default = spec["impl"] == "ours"

    def answer(batches: list[list[list[int]]]) -> list[list[int]]:
        with decoding_session(model, prepack=default):  # weights packed once per set, like `instruct respond`
            return [row for batch in batches for row in generate_tokens(
                model, batch, max_new_tokens=n, eos_ids=eos, draft_tokens=DRAFT_TOKENS if default else 0)]

    return answer


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    answer = _answerer(spec)
    prompts = spec["prompts"]
    out: dict[str, Any] = {}
    for batch in sorted(spec["batches"]):
        batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        answer([[prompts[0]]])  # warm-up (untimed)
        reset_peak_memory(spec["device"])
        seconds, tokens = timed(lambda: answer(batches), spec["device"])
        out[str(batch)] = {"seconds": seconds, "tokens": tokens, "peak_memory_mb": peak_memory(spec["device"])}
    return {"batches": out}


def _prompts(tokenizer, count: int) -> tuple[list[list[int]], list[int], str]:
    """Token ids of the first `count` test instructions in the model's chat template (longest
    first), the template's stop ids, and the template's name."""
    from llmft.data.instruction import load_instruction_data, split_instruction_data
    from llmft.prompts import default_prompt_style

    style = default_prompt_style(tokenizer)
    _, test, _ = split_instruction_data(load_instruction_data("instruction-data"))
    prompts = sorted((tokenizer.encode(style.format(e)) for e in test[:count]), key=len, reverse=True)
    return prompts, style.stop_token_ids(tokenizer), type(style).__name__


def one_process(count: int):
    """What the one-process A/B scripts (`ab_batch1.py`, `ab_prefix.py`, `profile_step.py`) start
    from: glibc keeping freed memory (as the CLI does), 1 torch thread, the model in eval mode,
    and the first `count` prompts with their stop ids, from one load of the offline GGUF."""
    import torch

    from llmft.training.resources import keep_freed_memory
    from llmft.weights import load_pretrained

    keep_freed_memory()
    torch.set_num_threads(1)
    pretrained = load_pretrained(MODEL)
    prompts, eos, _ = _prompts(pretrained.tokenizer, count)
    return pretrained.model.eval(), prompts, eos


def ab_arguments(doc: str, prompts: int, rounds: int):
    """The A/B scripts' command line: `--prompts` and `--rounds`, with these defaults."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=prompts)
    p.add_argument("--rounds", type=int, default=rounds)
    return p.parse_args()


def run(args) -> Section:
    from llmft.weights import load_pretrained
    from llmft.weights.huggingface import export_hf

    pretrained = load_pretrained(MODEL)
    prompts, eos, style = _prompts(pretrained.tokenizer, args.answer_prompts)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="llmft-bench-") as tmp:
        folder = Path(tmp) / MODEL
        export_hf(pretrained.model, folder)

        def spec_for(impl: str) -> dict[str, Any]:
            return {"suite": "answer", "label": f"answer {impl}", "impl": impl, "weights": str(folder),
                    "device": args.device, "prompts": prompts, "eos_ids": eos, "new_tokens": args.answer_tokens,
                    "batches": args.gen_batches}

        results = run_interleaved(list(IMPLS), args.rounds, spec_for)
    for batch in sorted(args.gen_batches):
        per = {impl: [r["batches"][str(batch)] for r in rs] for impl, rs in results.items()}
        reference = per["hf"][0]["tokens"]
        tps = {impl: median([sum(map(len, b["tokens"])) / b["seconds"] for b in bs]) for impl, bs in per.items()}
        for impl, bs in per.items():
            same = sum(a == b for a, b in zip(bs[0]["tokens"], reference))
            rows.append([str(batch) if impl == "hf" else "", IMPLS[impl], seconds_cell([b["seconds"] for b in bs]),
                         f"{sum(map(len, bs[0]['tokens'])):,}", f"{tps[impl]:,.1f}",
                         ratio_cell(tps[impl], tps["hf"], impl == "hf"),
                         f"{max(b['peak_memory_mb'] for b in bs):,.0f}",
                         "reference" if impl == "hf" else f"{same}/{len(reference)}"])
    raw.append({"model": MODEL, "prompts": len(prompts), "results": results})
    return Section(
        title="Answering instructions: llmft vs transformers (real model, real prompts)",
        intro=[f"{MODEL} (offline GGUF, fp32) answers the first {len(prompts)} test-split instructions of the "
               f"book's data in its chat template ({style}), greedy, at most {args.answer_tokens} new tokens, "
               f"stopping at the end-of-turn, fp32 on `{args.device}`; batches of "
               f"{' and '.join(map(str, sorted(args.gen_batches)))} prompts sorted by length, the same on both "
               f"sides. Time = the whole set ({args.rounds} process(es) per variant, ABBA order), llmft's weight "
               "packing included; tokens/s = new tokens / time."],
        headers=["batch", "implementation", "seconds for the set: median (min–max)", "new tokens",
                 "new tokens/s", "speed vs transformers", memory_header(args.device), "answers equal to transformers'"],
        rows=rows,
        notes=["llmft's default: Linear weights prepacked for oneDNN while generating, and for a single row "
               "(batch 1, or the last row left of a batch) 3 prompt-lookup guesses verified per step. "
               "Greedy either way; \"answers equal\" compares token ids: fp32 rounding (another GEMM, several "
               "positions per pass) can flip a near-tie, after which an answer goes its own way."],
        raw=raw,
    )
