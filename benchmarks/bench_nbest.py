"""Choosing among a beam search's hypotheses: does a re-ranking of the n-best list answer the
book's instructions better than the top beam? The rules are chosen on the validation split, then
read on test.

    python benchmarks/bench_nbest.py decode runs/NAME --split validation --out runs/NAME/validation-nbest4.json
    python benchmarks/bench_nbest.py score NAME-validation=runs/NAME/validation-nbest4.json ... \
        --out docs/results/book-split-nbest.json

`decode` answers a split of an instruction run with beam search (as `llmft instruct respond
--num-beams N` does; here every entry's prompt on its own) and keeps every held hypothesis: its score
(summed log-probability over length ** penalty), its length in tokens and its answer text.
`score` reads such files and scores each rule's pick by ROUGE-L F1 against the entry's `output`:

- `top`: the best-scored hypothesis (what `respond` answers);
- `mbr`, `mbr-weighted`: minimum Bayes risk (Kumar & Byrne, 2004) with ROUGE-L as the gain: the
  hypothesis with the highest mean ROUGE-L against the others, uniformly or weighted by the
  softmax of their scores;
- `length-A`: the hypotheses re-ranked by summed log-probability over length ** A (1.0 is `top`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from llmft.evaluation.metrics import rouge_l_f1
from llmft.generation import beam_search_hypotheses, cut_at_stop, stop_check
from llmft.pipelines.instruction import load_chat_model

LENGTH_PENALTIES = (0.0, 0.5, 0.8, 1.2, 1.5, 2.0)


def decode(run: str, split: str, beams: int, max_new_tokens: int, out: Path) -> None:
    model, tokenizer, style = load_chat_model(run, "cpu")
    entries = json.loads((Path(run) / f"{split}.json").read_text(encoding="utf-8"))
    options = {"num_beams": beams, "max_new_tokens": max_new_tokens, "eos_ids": style.stop_token_ids(tokenizer),
               "is_done": stop_check(tokenizer, style.stop_strings)}
    answer = lambda tokens: style.extract_response(cut_at_stop(tokenizer.decode(tokens), style.stop_strings))
    start = time.perf_counter()
    for i, entry in enumerate(entries):
        found = beam_search_hypotheses(model, tokenizer.encode(style.format(entry)), **options)
        entry["hypotheses"] = [{"score": s, "len": len(t), "text": answer(t)} for s, t in found]
        entry["model_response"] = entry["hypotheses"][0]["text"]
        print(f"{i + 1}/{len(entries)} {time.perf_counter() - start:.0f} s", flush=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)


def mbr(weighted: bool) -> Callable[[list[dict]], str]:
    def pick(hypotheses: list[dict]) -> str:
        top = max(h["score"] for h in hypotheses)
        weights = [math.exp(h["score"] - top) if weighted else 1.0 for h in hypotheses]

        def gain(i: int) -> float:
            others = [j for j in range(len(hypotheses)) if j != i]
            total = sum(weights[j] for j in others)
            return sum(weights[j] * rouge_l_f1(hypotheses[i]["text"], hypotheses[j]["text"]) for j in others) / total
        if len(hypotheses) == 1:
            return hypotheses[0]["text"]
        # equal gains (to rounding) go to the better-scored hypothesis, not to the summation order
        return hypotheses[max(range(len(hypotheses)), key=lambda i: (round(gain(i), 9), -i))]["text"]
    return pick


def length_rerank(alpha: float) -> Callable[[list[dict]], str]:
    """Re-scored from the held score at length penalty 1.0 (score × length = summed log-prob)."""
    return lambda hypotheses: max(hypotheses, key=lambda h: h["score"] * h["len"] / h["len"] ** alpha)["text"]


RULES: dict[str, Callable[[list[dict]], str]] = {
    "top": lambda hypotheses: hypotheses[0]["text"], "mbr": mbr(False), "mbr-weighted": mbr(True),
    **{f"length-{a}": length_rerank(a) for a in LENGTH_PENALTIES}}


def score(files: dict[str, str], out: str | None) -> None:
    data = {name: json.loads(Path(path).read_text(encoding="utf-8")) for name, path in files.items()}
    scores = {rule: {name: round(100 * sum(rouge_l_f1(pick(e["hypotheses"]), e["output"]) for e in entries)
                                 / len(entries), 2) for name, entries in data.items()}
              for rule, pick in RULES.items()}
    print("| rule | " + " | ".join(data) + " |\n|" + " --- |" * (len(data) + 1))
    for rule, row in scores.items():
        print(f"| {rule} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    if out:
        Path(out).write_text(json.dumps({"rouge_l_f1": scores, "files": files, "hypotheses": {
            name: [e["hypotheses"] for e in entries] for name, entries in data.items()}}, indent=1,
            ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="answer a split with beam search, keeping every held hypothesis")
    d.add_argument("run")
    d.add_argument("--split", default="validation")
    d.add_argument("--beams", type=int, default=4)
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score", help="ROUGE-L F1 of each rule's pick")
    s.add_argument("files", nargs="+", help="NAME=PATH of a `decode` file")
    s.add_argument("--out", help="write the scores and the hypotheses as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "decode":
        decode(args.run, args.split, args.beams, args.max_new_tokens, args.out)
    else:
        score(dict(spec.split("=", 1) for spec in args.files), args.out)


if __name__ == "__main__":
    main()
