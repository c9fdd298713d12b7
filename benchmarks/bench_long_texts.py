"""Issue 18's long-text figure: the activation cache pass at the default --max-length (the
longest training text, at most 512 tokens) against --max-length longest, on long documents.

The documents are the instruction data's outputs concatenated (a seeded random number of
outputs each, so their lengths spread from about a hundred to a few thousand tokens), labelled
a/b alternately (the figure is about time, not accuracy). For each setting, `llmft classify
train` runs until its activation cache is filled; the script prints the length statistics, the
printed estimate and the measured pass from its log, then stops it.

    python benchmarks/bench_long_texts.py --docs 60 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LLMFT_DATA_DIR", "").split(os.pathsep)[0] or ROOT.parent / "shared" / "data")
DATA = DATA_DIR / "instruction-data" / "instruction-data.json"


def write_documents(path: Path, docs: int, seed: int = 0) -> None:
    outputs = [entry["output"] for entry in json.loads(DATA.read_text(encoding="utf-8"))]
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(docs):
            writer.writerow(["\n\n".join(rng.choices(outputs, k=rng.randint(8, 250))), "ab"[i % 2]])


def cache_pass(data: Path, model: str, max_length: str | None, threads: int | None, timeout: float) -> list[str]:
    """The log lines of `llmft classify train` up to its filled activation cache."""
    out = Path(tempfile.mkdtemp(prefix="llmft-long-")) / "run"
    cmd = [sys.executable, "-m", "llmft", "classify", "train", "--model", model, "--data", str(data), "--out", str(out),
           "--epochs", "1"]
    cmd += ["--max-length", max_length] if max_length else []
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    kept = []
    try:
        for line in proc.stderr:
            if line.startswith(("text lengths", "estimate:", "activation cache:", "data:")):
                kept.append(line.strip())
            if line.startswith("activation cache: filled"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=timeout)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="llmft-long-")) / "long-documents.csv"
    write_documents(data, args.docs)
    for max_length in (None, "longest"):
        print(f"## --max-length {max_length or 'default'}")
        for line in cache_pass(data, args.model, max_length, args.threads, args.timeout):
            print(line)


if __name__ == "__main__":
    main()
