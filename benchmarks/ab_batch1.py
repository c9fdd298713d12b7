"""Batch-1 answers with and without prompt-lookup guesses, in one process, ABBA
(docs/benchmarks.md, "Batch-1 decoding").

    LLMFT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ab_batch1.py --prompts 8 --rounds 2

SmolLM2-135M-Instruct (the offline GGUF) answers the first `--prompts` test instructions of the
book's data (the `answer` suite's prompts, chat template), greedy, 128 new tokens at most, one
prompt at a time, 1 thread. Variants: no prepacking and no guesses ("plain"); prepacking and
guesses that fall back to repeating the last token where prompt lookup finds nothing (llmft's
default before session 7, rebuilt here); prepacking and guesses only where a match exists (the
default now); guesses only where a match exists, no prepacking. Prints tokens/s per round and
how many answers equal the plain path's.
"""

from __future__ import annotations

import json
import time

import bench_answer
import llmft.generation as g


def fallback_draft(tokens, max_tokens: int, max_ngram: int = 3) -> list[int]:
    """The guess before session 7: the last token repeated where nothing matches."""
    draft: list[int] = []
    while len(draft) < max_tokens:
        seen = [*tokens, *draft]
        draft += g._continuation(seen, max_tokens - len(draft), max_ngram) or seen[-1:]
    return draft


def main() -> None:
    args = bench_answer.ab_arguments(__doc__, prompts=8, rounds=2)
    model, prompts, eos = bench_answer.one_process(args.prompts)
    matched = g.prompt_lookup_draft
    variants = {"plain": (False, 0, matched), "before: prepack + fallback guesses": (True, 3, fallback_draft),
                "now: prepack + matched guesses": (True, 3, matched), "matched guesses": (False, 3, matched)}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            prepack, draft_tokens, draft = variants[name]
            g.prompt_lookup_draft = draft
            began = time.perf_counter()
            with g.decoding_session(model, prepack=prepack):
                out = [row for prompt in prompts for row in g.generate_tokens(
                    model, [prompt], max_new_tokens=128, eos_ids=eos, draft_tokens=draft_tokens)]
            speeds[name].append(round(sum(map(len, out)) / (time.perf_counter() - began), 2))
            answers[name] = out
    g.prompt_lookup_draft = matched
    print(json.dumps({"tokens_per_second": speeds,
                      "answers_equal_to_plain": {n: sum(a == b for a, b in zip(o, answers["plain"])) for n, o in answers.items()}}))


if __name__ == "__main__":
    main()
