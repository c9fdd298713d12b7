"""Instruction quality on the book's own split: our answers to its 110 test instructions against
the book's GPT-2 medium (355M) answers to the same instructions.

    LLMFT_DATA_DIR=../shared/data llmft instruct train --model MODEL --data instruction-data --book-split \
        --prompt-style alpaca --out runs/NAME [--mask-prompt]
    llmft instruct respond runs/NAME --split test --max-new-tokens 256
    python benchmarks/bench_book_split.py NAME=runs/NAME/test-responses.json ... \
        --out docs/results/book-split-scores.json

The book's split is the file in order, 85 / 10 / 5 % (train / test / validation): its test entries
are entries 935–1044, the ones `instruction-data-with-response.json` answers (checked here, entry
by entry). Both sides are scored the same way (`llmft.evaluation.metrics`: exact match after
normalising case, punctuation and spaces; ROUGE-L F1 over words) against the reference `output`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llmft.evaluation.metrics import score_responses

BOOK = "instruction-data/instruction-data-with-response.json"
KEYS = ("instruction", "input", "output")


def load_answers(path: str) -> list[dict]:
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise SystemExit(f"{path}: expected a JSON list of entries")
    return entries


def check_same_entries(ours: list[dict], book: list[dict], name: str) -> None:
    """Both files answer the same instructions in the same order."""
    if len(ours) != len(book):
        raise SystemExit(f"{name}: {len(ours)} entries, the book's file has {len(book)}")
    for i, (a, b) in enumerate(zip(ours, book)):
        if any(a.get(k) != b.get(k) for k in KEYS):
            raise SystemExit(f"{name}: entry {i} is not the book's test entry {i} ({a.get('instruction')!r})")


def score(entries: list[dict]) -> dict:
    s = score_responses(entries)
    words = sum(len(e["model_response"].split()) for e in entries) / len(entries)
    return {"exact_match": round(100 * s["exact_match"], 2), "rouge_l_f1": round(100 * s["rouge_l_f1"], 2),
            "words_per_answer": round(words, 1)}


def table(scores: dict[str, dict]) -> str:
    book = scores["book GPT-2 medium (355M)"]["rouge_l_f1"]
    lines = ["| answers (110 test instructions) | exact match | ROUGE-L F1 | vs the book | words per answer |",
             "| --- | --- | --- | --- | --- |"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['exact_match']:.2f}% | {s['rouge_l_f1']:.2f} | "
                     f"{s['rouge_l_f1'] - book:+.2f} | {s['words_per_answer']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="NAME=PATH of an `instruct respond` file of the book's test split")
    p.add_argument("--book", default=str(Path(os.environ.get("LLMFT_DATA_DIR", "../shared/data")) / BOOK))
    p.add_argument("--out", help="write the scores (and the answers side by side) as JSON here")
    args = p.parse_args(argv)
    book = load_answers(args.book)
    runs = dict(spec.split("=", 1) for spec in args.runs)
    answers = {name: load_answers(path) for name, path in runs.items()}
    for name, entries in answers.items():
        check_same_entries(entries, book, name)
    scores = {"book GPT-2 medium (355M)": score(book), **{name: score(e) for name, e in answers.items()}}
    print(table(scores))
    if args.out:
        side = [{**{k: b[k] for k in KEYS}, "book": b["model_response"],
                 **{name: entries[i]["model_response"] for name, entries in answers.items()}}
                for i, b in enumerate(book)]
        Path(args.out).write_text(json.dumps({"scores": scores, "runs": runs, "answers": side}, indent=1,
                                             ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
