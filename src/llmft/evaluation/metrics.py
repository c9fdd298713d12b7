"""Reference-based scores for generated responses: exact match and ROUGE-L.

Cheap, deterministic companions to the LLM judge (`judge.py`): they need no second model and
show whether a fine-tuned model gets closer to the reference answers at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmft.errors import LlmftError


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed to single spaces, trimmed."""
    return " ".join(text.lower().split())


def exact_match(pred: str, ref: str) -> bool:
    """Equal after `normalize` (case and whitespace do not count)."""
    return normalize(pred) == normalize(ref)


def word_tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits: the tokenizer of Google's `rouge-score` package."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin, 2004): precision LCS/len(pred) and recall LCS/len(ref) over word tokens,
    combined harmonically. 0.0 when either side has no words (as `rouge-score` does)."""
    p, r = word_tokens(pred), word_tokens(ref)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def score_responses(entries: Sequence[Mapping[str, Any]], response_key: str = "model_response",
                    reference_key: str = "output") -> dict[str, float | int]:
    """Mean exact match and ROUGE-L F1 of `entry[response_key]` against `entry[reference_key]`:
    ``{"n": N, "exact_match": ..., "rouge_l_f1": ...}``."""
    if not entries:
        raise LlmftError("no responses to score")
    em = rl = 0.0
    for i, entry in enumerate(entries):
        for key in (response_key, reference_key):
            if not isinstance(entry.get(key), str):
                raise LlmftError(f"entry {i}: missing or non-string {key!r}")
        em += exact_match(entry[response_key], entry[reference_key])
        rl += rouge_l_f1(entry[response_key], entry[reference_key])
    n = len(entries)
    return {"n": n, "exact_match": em / n, "rouge_l_f1": rl / n}
