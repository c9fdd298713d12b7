"""Full fine-tuning vs LoRA on the same model and data: trainable parameters, peak memory and
seconds per optimizer step, printed as a markdown table.

    python benchmarks/lora_vs_full.py                       # SmolLM2-360M shape, 4 layers, CPU: a few minutes
    python benchmarks/lora_vs_full.py --layers 32 --device cuda --steps 20
    python benchmarks/lora_vs_full.py --task classification --seq 120   # the book's appendix E shape

Both variants build the same seeded random model (registry config, `--layers` blocks), see the
same batch of random token ids and compute the same loss, AdamW (lr 5e-5, weight decay 0.1,
the loop's `make_optimizer`), fp32. `--task next-token`: cross-entropy over every position
(instruction fine-tuning's computation); `--task classification`: a 2-class head on the last
token, random labels (the spam classifier's computation, through the pipeline's `surgery`).
Full fine-tuning trains every parameter; LoRA freezes them all and trains rank-r adapters on
the `--lora-targets` layers (default every Linear, as the book) plus, for classification, the
new head. Warm-up steps are not timed; s/step is the median timed step.

Peak memory is a per-process high-water mark on CPU (`ru_maxrss`), so each variant runs in its
own fresh process (this script, re-launched with `--variant`), and the table also gives the
memory of that process after imports, before the model exists. With `--rounds` > 1 the
processes run in ABBA order (full, lora, lora, full, ...) and the timings are pooled, so a
drift in the machine's load (a shared machine) biases neither side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULT = "LORA-VS-FULL "
VARIANTS = ("full", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-360m", help="registry config (random weights)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (the registry's count: 0)")
    p.add_argument("--task", choices=("next-token", "classification"), default="next-token")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, in ABBA order")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set for the worker processes
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: build, step, time, read the memory high-water mark."""
    import torch
    import torch.nn.functional as F

    from llmft.models import build_model, get_config
    from llmft.pipelines.classification import ClassifyOptions, surgery
    from llmft.training.freezing import count_parameters
    from llmft.training.heads import SequenceClassifier
    from llmft.training.loop import TrainConfig, make_optimizer
    from llmft.training.lora import LoRAConfig, apply_lora
    from llmft.training.resources import peak_memory_mb

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    after_imports = peak_memory_mb(device)
    cfg = get_config(args.model)
    cfg = cfg.with_(n_layers=args.layers) if args.layers else cfg
    torch.manual_seed(args.seed)
    lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    if args.task == "classification":
        model = SequenceClassifier(build_model(cfg), num_classes=2)
        surgery(model, ClassifyOptions(finetune=args.variant, trainable="all", lora=lora))
        labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
        lengths = torch.full((args.batch,), args.seq, device=device)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(ids[:, :-1], lengths), labels)
    else:
        model = build_model(cfg)
        if args.variant == "lora":
            apply_lora(model, lora)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    model.to(device).train()
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(model, TrainConfig(lr=5e-5, weight_decay=0.1), device)

    def step() -> float:
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    return {"variant": args.variant, "trainable": trainable, "total": total, "seconds": times,
            "peak_mb": peak_memory_mb(device), "after_imports_mb": after_imports, "config": cfg.name,
            "threads": torch.get_num_threads()}


def run_variant(variant: str, argv: list[str]) -> dict:
    """This script in a fresh interpreter, measuring one variant."""
    print(f"[lora_vs_full] {variant} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def pool(runs: list[dict]) -> dict:
    """One variant's processes as one result: every timing, the highest peak."""
    return {**runs[0], "seconds": [t for r in runs for t in r["seconds"]], "peak_mb": max(r["peak_mb"] for r in runs),
            "after_imports_mb": max(r["after_imports_mb"] for r in runs)}


def table(results: list[dict]) -> str:
    full = next(r for r in results if r["variant"] == "full")
    rows = ["| variant | trainable parameters | share of all | peak memory (MB) | after imports (MB) "
            "| s/step: median (min-max) | speed vs full |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = statistics.median(r["seconds"])
        rows.append(f"| {r['variant']} | {r['trainable']:,} | {r['trainable'] / r['total']:.2%} | {r['peak_mb']:,.0f} "
                    f"| {r['after_imports_mb']:,.0f} | {s:.2f} ({min(r['seconds']):.2f}-{max(r['seconds']):.2f}) "
                    f"| {statistics.median(full['seconds']) / s:.2f}× |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(RESULT + json.dumps(measure(args)), flush=True)
        return
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.rounds):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            runs[variant].append(run_variant(variant, argv))
    results = [pool(runs[v]) for v in VARIANTS]
    r = results[0]
    print(f"{args.task}: {r['config']} with {args.layers or 'all'} layers ({r['total']:,} parameters, random init), "
          f"batch {args.batch} x {args.seq} tokens, {args.device}, {r['threads']} torch threads, "
          f"{args.rounds} process(es) per variant x ({args.warmup} warm-up + {args.steps} timed steps); "
          f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}, targets {args.lora_targets}; "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print(table(results))


if __name__ == "__main__":
    main()
