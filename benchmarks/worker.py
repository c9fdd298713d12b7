"""Measure one benchmark variant in this (fresh) process and print its result as one JSON line.

Launched by `run.py` (see common.run_worker), never by hand: ``worker.py '<json spec>'``.
The spec's "suite" names the module whose `measure(spec)` does the work.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch  # noqa: F401  (imported before the memory floor is read, like every worker)
import transformers  # noqa: F401

import llmft.models  # noqa: F401

from common import RESULT_PREFIX, peak_memory

SUITES = {"recipe": "bench_recipe", "train": "bench_train", "generate": "bench_generate", "answer": "bench_answer",
          "peers": "bench_peers"}


def main() -> None:
    spec = json.loads(sys.argv[1])
    floor = peak_memory("cpu")  # the interpreter with torch + transformers + llmft imported
    result = importlib.import_module(SUITES[spec["suite"]]).measure(spec)
    print(RESULT_PREFIX + json.dumps({**result, "import_rss_mb": floor}), flush=True)


if __name__ == "__main__":
    main()
