"""GPU check for a lent H100/H200: does llmft's fast path work there, and how fast is it?

    python benchmarks/gpu_check.py                 # on the GPU machine: under ~5 minutes
    python benchmarks/gpu_check.py --dry-run       # CPU, tiny model: checks this script runs

Self-contained (torch + llmft only; not part of run.py). In order, each stage printing one
line as it finishes and the whole run ending with a summary:

1. bf16-mixed training through llmft's own loop (`training.loop.train`, precision
   "bf16-mixed") on one repeated batch: the loss must fall and the logits must be bf16.
2. SDPA: which attention kernel a training step uses by default (profiler op names), and a
   forward + backward (GPT-2: multi-head; SmolLM2: grouped-query) and a KV-cached decoding
   step with ONLY the flash backend enabled (`torch.nn.attention.sdpa_kernel`), which raises
   when flash cannot take the call.
3. GPT-2 medium (random weights), full fine-tuning, bf16 autocast, fused AdamW, batch
   16 x 512 tokens: tokens/s eager, with per-block graphs (`DecoderLM.compile_blocks`, what
   generation's --compile does) and with model + loss in one graph (`torch.compile` of the loss
   function, what training's --compile does), and model FLOPs utilisation
       MFU = tokens/s * (6 N + 12 L d T) / peak dense bf16 FLOP/s
   with N the parameter count (the tied embedding once: it is the LM-head matmul), L layers,
   d = emb_dim, T tokens per row (attention scores and weighted sum, forward + backward,
   counted for the full T x T square as in PaLM's appendix B, not halved for causality);
   peak 989e12 (H100 SXM, H200), 756e12 (H100 PCIe), 312e12 (A100) or --peak-tflops.
4. KV-cached greedy generation in bf16 (`generation.generate_tokens`), batch 1 and 8, eager
   and after `compile_blocks()`, with the number of graphs compiled during the timed call
   (0 means the warm-up compiled everything the call needed).

A stage (or a compiled measurement) that would start after --budget-s seconds is skipped,
and the summary says so; the compiled rows are then missing from its line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from llmft.generation import generate_tokens
from llmft.models import build_model, get_config
from llmft.training.loop import TrainConfig, autocast, make_optimizer, train

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
TINY = {"gpt2": {"n_layers": 2, "emb_dim": 64, "n_heads": 4},  # --dry-run models
        "llama": {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}}
SDPA_OPS = ("flash", "cudnn", "efficient", "math")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no compile: checks the script")
    p.add_argument("--model", default="gpt2-medium", help="registry config for stages 3-4 (random weights)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for stage 4")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s, for an unlisted GPU")
    p.add_argument("--budget-s", type=float, default=270, help="skip stages that would start after this")
    p.add_argument("--json", help="also write every number to this file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 2
        args.prompt, args.new_tokens, args.no_compile = 8, 4, True
    return args


# -- helpers -------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def model_config(args: argparse.Namespace, name: str):
    cfg = get_config(name)
    return cfg.with_(name=f"tiny-{name}", **TINY[cfg.architecture]) if args.dry_run else cfg


def new_model(args: argparse.Namespace, name: str, device: torch.device):
    torch.manual_seed(0)
    with device:  # initialise on the device: seconds saved for 355M parameters
        return build_model(model_config(args, name))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def random_ids(model, batch: int, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g).to(device)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())


def past_budget(args: argparse.Namespace) -> bool:
    return time.perf_counter() > args.deadline


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


class LMTask:
    """Next-token loss on fixed batches: the minimum `training.loop.train` needs."""

    seen_unit = "tokens"

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model, batch["input_ids"])

    def count_seen(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def on_epoch_end(self, model, epoch: int) -> dict[str, Any]:
        return {}


# -- stages ----------------------------------------------------------------------------------------

def check_bf16_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = new_model(args, "gpt2-small", device)
    batch = {"input_ids": random_ids(model, 4, 65, device)}
    cfg = TrainConfig(epochs=1, lr=1e-3, eval_freq=10, eval_iter=1, device=str(device), precision="bf16-mixed")
    history = train(model, LMTask(), [batch] * 20, [batch], cfg, show_progress=False)
    with torch.no_grad(), autocast(device, "bf16-mixed"):
        dtype = model(batch["input_ids"]).dtype
    first, last = history.steps[0]["train_loss"], history.steps[-1]["train_loss"]
    ok = last < first and dtype == torch.bfloat16
    return {"ok": ok, "loss_first": round(first, 3), "loss_last": round(last, 3), "logits_dtype": str(dtype),
            "line": f"bf16-mixed training (llmft loop, 20 steps): loss {first:.2f} -> {last:.2f}, logits {dtype}"}


def sdpa_ops_used(model, ids: torch.Tensor, device: torch.device) -> list[str]:
    """Names of the SDPA implementations one forward + backward dispatched to."""
    with torch.profiler.profile() as prof, autocast(device, "bf16-mixed"):
        lm_loss(model, ids).backward()
    names = {e.key.removeprefix("aten::_scaled_dot_product_") for e in prof.key_averages()
             if e.key.startswith("aten::_scaled_dot_product_")}
    return sorted(n for n in names if any(k in n for k in SDPA_OPS))


def check_flash(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    for name in ("gpt2-small", "smollm2-135m"):
        model = new_model(args, name, device)
        ids = random_ids(model, 2, 129, device)
        entry: dict[str, Any] = {"default_ops": sdpa_ops_used(model, ids, device)}
        if device.type != "cuda":
            entry["flash_only"] = "skipped (needs CUDA)"
        else:
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    with autocast(device, "bf16-mixed"):
                        lm_loss(model, ids).backward()
                    model.to(torch.bfloat16).eval()  # generation runs in bf16 weights
                    model.set_kv_cache(2, 130)
                    with torch.no_grad():
                        model(ids[:, :128], cache_pos=0)
                        model(ids[:, 128:], cache_pos=128)  # one decoding step, T=1
                entry["flash_only"] = "ok (bf16-mixed train fwd+bwd; bf16 cached prefill + decode)"
            except RuntimeError as e:
                entry["flash_only"] = f"FAILED: {str(e).splitlines()[0][:200]}"
            finally:
                model.clear_kv_cache()
        out[name] = entry
    ok = all(e["flash_only"].startswith(("ok", "skipped")) for e in out.values())
    line = "SDPA: " + "; ".join(f"{n} default {'+'.join(e['default_ops']) or '?'}, flash-only {e['flash_only']}"
                                for n, e in out.items())
    return {"ok": ok, "models": out, "line": line}


def bench_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = new_model(args, args.model, device).train()
    cfg = model.cfg
    n_params = parameter_count(model)
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.emb_dim * args.seq
    peak = peak_flops(args, device)
    optimizer = make_optimizer(model, TrainConfig(), device)  # fused AdamW on CUDA
    ids = random_ids(model, args.batch, args.seq + 1, device)

    loss_fn = lm_loss

    def step() -> None:
        with autocast(device, "bf16-mixed"):
            loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure(label: str) -> dict[str, Any]:
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        warm = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
        tps = args.batch * args.seq / statistics.median(times)
        mfu = tps * flops_per_token / peak if peak else None
        return {"mode": label, "warmup_s": round(warm, 1), "step_ms": round(statistics.median(times) * 1e3, 1),
                "tokens_per_s": round(tps), "mfu": round(mfu, 4) if mfu else None, "peak_gb": peak_gb(device)}

    runs = [measure("eager")]
    if not args.no_compile and not past_budget(args):
        model.compile_blocks()  # per-block graphs (what generation --compile does)
        runs.append(measure("compile_blocks"))
    if not args.no_compile and not past_budget(args):
        model = new_model(args, args.model, device).train()  # one graph for model + loss: training --compile
        optimizer = make_optimizer(model, TrainConfig(), device)
        loss_fn = torch.compile(lm_loss)
        runs.append(measure("compile_whole"))
    parts = [f"{r['mode']} {r['tokens_per_s']:,} tok/s ({r['step_ms']} ms/step"
             + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "") + f", warm-up {r['warmup_s']} s"
             + (f", peak {r['peak_gb']} GB" if r["peak_gb"] else "") + ")" for r in runs]
    parts += [f"{r['mode']}/eager x{r['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}" for r in runs[1:]]
    return {"ok": True, "parameters": n_params, "flops_per_token": flops_per_token, "peak_flops": peak, "runs": runs,
            "line": f"train {cfg.name} bf16 {args.batch}x{args.seq}, N={n_params / 1e6:.1f}M: " + "; ".join(parts)}


def bench_generation(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    model = new_model(args, args.model, device).to(torch.bfloat16).eval()
    results = []
    for mode in ("eager", "compile_blocks"):
        if mode == "compile_blocks":
            if args.no_compile or past_budget(args):
                break
            model.compile_blocks()
        for batch in sorted(args.gen_batches):
            prompts = random_ids(model, batch, args.prompt, device).tolist()

            def call() -> list[list[int]]:  # no guesses: random weights repeat themselves, which flatters them
                return generate_tokens(model, prompts, max_new_tokens=args.new_tokens, eos_ids=(), draft_tokens=0)

            sync(device)
            start = time.perf_counter()
            call()  # warm-up (compiles this batch size)
            sync(device)
            warm = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            tokens = call()
            sync(device)
            seconds = time.perf_counter() - start
            assert all(len(row) == args.new_tokens for row in tokens)
            results.append({"mode": mode, "batch": batch, "seconds": round(seconds, 3), "warmup_s": round(warm, 1),
                            "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                            "graphs_compiled_in_timed_call": counters["stats"]["unique_graphs"] - graphs})
    by = {(r["mode"], r["batch"]): r for r in results}
    parts = []
    for batch in sorted(args.gen_batches):
        eager = by[("eager", batch)]
        text = f"batch {batch}: eager {eager['tokens_per_s']:,} tok/s"
        if ("compile_blocks", batch) in by:
            c = by[("compile_blocks", batch)]
            text += (f", compiled {c['tokens_per_s']:,} tok/s (x{c['tokens_per_s'] / eager['tokens_per_s']:.2f}, "
                     f"warm-up {c['warmup_s']} s, {c['graphs_compiled_in_timed_call']} graphs compiled while timed)")
        parts.append(text)
    return {"ok": True, "runs": results,
            "line": f"generate {model.cfg.name} bf16, {args.prompt}-token prompts + {args.new_tokens} new (KV cache): "
                    + "; ".join(parts)}


STAGES = (("bf16", check_bf16_training), ("sdpa", check_flash), ("train", bench_training),
          ("generate", bench_generation))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (--dry-run)"
    header = f"gpu_check: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(header, flush=True)
    report: dict[str, Any] = {"header": header}
    args.deadline = start + args.budget_s
    for name, stage in STAGES:
        if past_budget(args):
            report[name] = {"ok": None, "line": f"{name}: skipped (past --budget-s {args.budget_s:g} s)"}
        else:
            t = time.perf_counter()
            try:
                report[name] = stage(args, device)
            except Exception as e:  # noqa: BLE001 (one failing stage must not hide the others)
                report[name] = {"ok": False, "line": f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            report[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {report[name]['line']}", flush=True)
    total = time.perf_counter() - start
    print(f"\n== summary ({total:.0f} s) ==\n{header}")
    for name, _ in STAGES:
        r = report[name]
        status = {True: "ok  ", False: "FAIL", None: "skip"}[r["ok"]]
        print(f"{status} {r['line']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    return 0 if all(report[n]["ok"] is not False for n, _ in STAGES) else 1


if __name__ == "__main__":
    raise SystemExit(main())
