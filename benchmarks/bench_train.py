"""Suite `train`: full fine-tuning throughput, our DecoderLM against `transformers`.

Both sides load the same safetensors folder (our seeded random model exported with
`export_hf`, so `transformers` builds GPT2LMHeadModel / LlamaForCausalLM from the identical
config), see the same batch of random token ids (B x T inputs, next-token targets), compute
the same loss (cross-entropy over every position, outside the model) and step the same
optimizer (AdamW, lr 5e-5, weight decay 0.1, every parameter trainable), in fp32. Warm-up
steps are not timed; tokens/s is B*T over the median timed step.
"""

from __future__ import annotations

from typing import Any

from common import (
    Section, bench_config, load_hf, load_ours, median, memory_header, peak_memory, pooled, ratio_cell,
    reset_peak_memory, seconds_cell, shared_weight_runs, timed,
)

IMPLS = {"hf": "transformers", "ours": "llmft"}  # baseline first


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    device, B, T = spec["device"], spec["batch"], spec["seq"]
    if spec["impl"] == "hf":
        model = load_hf(spec["weights"], device)
        vocab = model.config.vocab_size

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return model(ids).logits
    else:
        model = load_ours(spec["weights"], device)
        vocab = model.cfg.vocab_size
        logits = model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(spec["seed"])).to(device)
    reset_peak_memory(device)  # the peak of training, not of loading the checkpoint

    def step() -> float:
        loss = F.cross_entropy(logits(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    runs = [timed(step, device) for _ in range(spec["warmup"] + spec["steps"])]
    return {"step_seconds": [s for s, _ in runs[spec["warmup"]:]], "losses": [loss for _, loss in runs],
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "peak_memory_mb": peak_memory(device)}


def run(args) -> Section:
    B, T = args.batch, args.seq
    rows, raw = [], []

    def spec(impl: str) -> dict[str, Any]:
        return {"batch": B, "seq": T, "warmup": args.warmup, "steps": args.steps}

    for model, results in shared_weight_runs(args, "train", list(IMPLS), spec):
        times = {impl: pooled(rs, "step_seconds") for impl, rs in results.items()}
        tps = {impl: B * T / median(ts) for impl, ts in times.items()}
        first_loss = {impl: rs[0]["losses"][0] for impl, rs in results.items()}
        same = abs(first_loss["ours"] - first_loss["hf"]) <= 1e-4 * abs(first_loss["hf"])
        cfg = bench_config(model, args.quick)
        for impl, rs in results.items():
            rows.append([model if impl == "hf" else "", f"{rs[0]['parameters'] / 1e6:.1f}M", IMPLS[impl],
                         seconds_cell(times[impl]), f"{tps[impl]:,.0f}",
                         ratio_cell(tps[impl], tps["hf"], impl == "hf"),
                         f"{max(r['peak_memory_mb'] for r in rs):,.0f}",
                         f"{first_loss[impl]:.4f}" + ("" if impl == "hf" else (" (same)" if same else " (DIFFERS)"))])
        raw.append({"model": model, "config": cfg.to_dict(), "results": results})
    return Section(
        title="Full fine-tuning throughput: llmft vs transformers",
        intro=[f"Every parameter trainable, AdamW (lr 5e-5, weight decay 0.1), fp32 on `{args.device}`, "
               f"batch {B} × {T} tokens of random ids, loss = cross-entropy over every position. "
               f"{args.warmup} warm-up steps per process are not timed; {args.steps} timed steps per process × "
               f"{args.rounds} processes per side, launched in ABBA order; tokens/s = {B}·{T} / median step. "
               "Both sides load the same safetensors folder (a seeded random model exported with "
               "`export_hf`; transformers builds GPT2LMHeadModel / LlamaForCausalLM from its config.json, "
               "`attn_implementation=\"sdpa\"`)."],
        headers=["model", "params", "implementation", "step time, s: median (min–max)", "tokens/s",
                 "speed vs transformers", memory_header(args.device), "loss at step 1"],
        rows=rows,
        notes=["\"loss at step 1\" must agree: same weights, same batch, same loss — a check that both sides "
               "compute the same network, not only the same amount of work."],
        raw=raw,
    )
