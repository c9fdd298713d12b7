"""llmft benchmarks: one entry point for every suite; prints (and optionally writes) a markdown report.

    python benchmarks/run.py --suite all                  # everything, full size (~1 h on 2 busy cores, --threads 1)
    python benchmarks/run.py --quick                      # smoke test of every suite (1-2 minutes)
    python benchmarks/run.py --suite recipe --epochs 1    # shorter recipe, both sides equally
    python benchmarks/run.py --suite train generate --write-docs docs/benchmarks.md

Suites (see README.md and each bench_*.py): `recipe` (the book's chapter-6 classifier end to
end, --book-compat vs our default path), `train` (full fine-tuning tokens/s, llmft vs
transformers), `generate` (greedy tokens/s, llmft with/without KV cache vs transformers),
`answer` (SmolLM2-135M-Instruct answering the book's test instructions, vs transformers), `serve`
(`llmft serve` with SmolLM2-135M-Instruct under 1, 8 and 32 concurrent clients), and, only when
named (hours, not part of `all`), `peers` (llmft vs transformers Trainer, TRL SFTTrainer and
PEFT on the same weights, data and hyperparameters; `--limit N` for a smoke test). Every
speed figure is a ratio of timings taken in this run; every variant runs in its own process
and reports its own peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import bench_answer
import bench_generate
import bench_peers
import bench_recipe
import bench_serve
import bench_train
from common import ROOT, Section, load_average, machine_info, worker_env

SUITES = {"recipe": bench_recipe, "train": bench_train, "generate": bench_generate, "answer": bench_answer,
          "serve": bench_serve}
OPT_IN = {"peers": bench_peers}  # run only when named: `all` leaves them out

# Defaults that differ between a full run and --quick (an explicit option always wins).
FULL = {"epochs": 5, "rounds": 2, "seq": 128, "steps": 3, "warmup": 1, "prompt_tokens": 64, "new_tokens": 32,
        "warmup_tokens": 4, "repeats": 2, "answer_prompts": 16, "answer_tokens": 128, "serve_requests": 32,
        "serve_tokens": 64, "limit": None}
QUICK = {"epochs": 1, "rounds": 1, "seq": 32, "steps": 2, "warmup": 1, "prompt_tokens": 16, "new_tokens": 8,
         "warmup_tokens": 2, "repeats": 1, "answer_prompts": 2, "answer_tokens": 8, "serve_requests": 4,
         "serve_tokens": 8, "limit": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", choices=[*SUITES, *OPT_IN, "all"], default=["all"],
                   help="all: every suite but the opt-in ones (peers)")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: checks the machinery in ~1 minute")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's own, one per "
                   "core); on a machine shared with other work 1 avoids threads waiting for each other")
    p.add_argument("--models", nargs="+", default=["gpt2-small", "smollm2-135m"],
                   help="registry configs for the train and generate suites (random weights)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, help="epochs for both sides (book: 5; --quick: 1)")
    g.add_argument("--max-length", type=int, help="tokens per text (default: the longest training text; "
                   "the book's split gives 120)")
    g.add_argument("--recipe-rounds", type=int, default=1, help="runs per side, in ABBA order")
    g = p.add_argument_group("train")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--seq", type=int, help="tokens per row (default 128; --quick: 32)")
    g.add_argument("--warmup", type=int, help="untimed steps per process")
    g.add_argument("--steps", type=int, help="timed steps per process")
    g = p.add_argument_group("generate")
    g.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    g.add_argument("--prompt-tokens", type=int)
    g.add_argument("--new-tokens", type=int)
    g.add_argument("--warmup-tokens", type=int, help="new tokens of the untimed warm-up call")
    g.add_argument("--repeats", type=int, help="timed calls per batch size and process")
    g = p.add_argument_group("answer")
    g.add_argument("--answer-prompts", type=int, help="test-split instructions answered (default 16; --quick: 2)")
    g.add_argument("--answer-tokens", type=int, help="most new tokens per answer (default 128; --quick: 8)")
    g = p.add_argument_group("serve")
    g.add_argument("--serve-requests", type=int, help="chat requests per concurrency level (default 32; --quick: 4); "
                   "4 times as many classification texts")
    g.add_argument("--serve-tokens", type=int, help="most new tokens per chat answer (default 64; --quick: 8)")
    bench_peers.add_arguments(p.add_argument_group("peers"))
    p.add_argument("--rounds", type=int, help="processes per side for train/generate/peers, in ABBA order")
    p.add_argument("--write-docs", type=Path, metavar="PATH", help="also write the report there (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every raw measurement there")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    for key in ("epochs", "recipe_rounds", "batch", "seq", "steps", "rounds", "prompt_tokens", "new_tokens",
                "warmup_tokens", "repeats", "answer_prompts", "answer_tokens", "serve_requests", "serve_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("max_length", "limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if min(args.gen_batches) < 1 or args.warmup < 0:
        p.error("--gen-batches must be at least 1 and --warmup at least 0")
    named = [s for s in dict.fromkeys(args.suite) if s != "all"]
    args.suites = list(dict.fromkeys([*SUITES, *named])) if "all" in args.suite else named
    return args


def command_line(argv: list[str]) -> str:
    script = Path(__file__).resolve().relative_to(ROOT)
    return shlex.join(["python", str(script), *argv])


def report(args: argparse.Namespace, argv: list[str], sections: list[Section], load_before: str,
           started: datetime.datetime) -> str:
    info = machine_info(args.device)
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    head = [
        "# llmft benchmarks",
        "",
        f"Generated by `{command_line(argv)}` (from the repository root) on {started:%Y-%m-%d %H:%M} UTC, "
        f"commit {info['git']}; rerun that command to refresh this page.",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, {info['os']}{gpu}",
        f"- Software: Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}; device `{info['device']}`",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_average()} — other work on the machine "
        "slows every variant; ABBA ordering spreads it over both sides, ratios are more stable than times.",
        "- Every speed figure is a ratio of timings taken in this run (never against a time from another "
        "day); absolute times are shown beside it. Every variant runs in its own process; its peak memory is "
        "that process's peak resident set (CPU: VmHWM on Linux — `ru_maxrss` would include the launching "
        "process's peak, which a child inherits through vfork/exec — else `ru_maxrss`) or "
        "`torch.cuda.max_memory_allocated` (CUDA). Train and generate reset it after loading the model "
        "(/proc/self/clear_refs), so their peaks are the model plus what training or generating adds.",
    ]
    if args.quick:
        head.append("- **--quick**: shrunken models and few steps — a smoke test of the benchmark code; "
                    "the numbers below are not measurements of llmft.")
    floors = [r.get("import_rss_mb") for s in sections for item in s.raw for r in _worker_results(item)]
    floors = [f for f in floors if f]
    if floors:
        head.append(f"- A worker's RSS after importing torch, transformers and llmft, before any model exists: "
                    f"{min(floors):,.0f}–{max(floors):,.0f} MB (included in every CPU peak).")
    return "\n".join([*head, "", *(s.markdown() + "\n" for s in sections)])


def _worker_results(item: dict) -> list[dict]:
    runs = item.get("runs") or [r for rs in item.get("results", {}).values() for r in rs]
    return list(runs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:  # read by torch at import, in this process and in every worker
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.update(worker_env())  # the orchestrator resolves data and exports weights offline too
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    sections = [{**SUITES, **OPT_IN}[name].run(args) for name in args.suites]
    text = report(args, argv, sections, load_before, started)
    print(text)
    if args.write_docs:
        from llmft.rundir import atomic_write_text

        args.write_docs.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.write_docs, text)
    if args.json:
        from llmft.rundir import atomic_write_json

        atomic_write_json(args.json, {"command": command_line(argv), "machine": machine_info(args.device),
                                      "suites": {s.title: s.raw for s in sections}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
