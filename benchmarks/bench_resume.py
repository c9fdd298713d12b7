"""Checkpoint figures for docs/benchmarks.md (issue 12).

    python benchmarks/bench_resume.py sizes    # SmolLM2-135M: checkpoint size and write time, full vs LoRA
    python benchmarks/bench_resume.py recipe   # the README's spam recipe killed (SIGKILL) and resumed

`sizes` takes one optimizer step of instruction fine-tuning (8 x 128 tokens of the book's data)
so the optimizer holds its moments, then times `Checkpoints.save` (min of 3) and one training
step: the overhead of `--checkpoint-every 50` is one save per 50 steps, a ratio of two timings
of this run. `recipe` runs `llmft classify train --model smollm2-135m-instruct --data sms-spam
--checkpoint-every 50` in a subprocess, kills it with SIGKILL once a checkpoint past step 300
exists, resumes it with `--resume`, and reports the final accuracies and the time spent writing
checkpoints (from the run's log).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one_step_model(finetune: str):
    """SmolLM2-135M-Instruct after one AdamW step on 8 x 128 tokens (full or LoRA)."""
    from llmft.data.instruction import InstructionDataset, collate_instruction, load_instruction_data
    from llmft.prompts import get_prompt_style
    from llmft.training.lora import LoRAConfig, apply_lora
    from llmft.training.loop import TrainConfig, make_optimizer
    from llmft.weights import load_pretrained

    pretrained = load_pretrained("smollm2-135m-instruct")
    model = pretrained.model.train()
    if finetune == "lora":
        apply_lora(model, LoRAConfig())
    entries = load_instruction_data("instruction-data")[:8]
    data = InstructionDataset(entries, pretrained.tokenizer, get_prompt_style("alpaca", pretrained.tokenizer), 128)
    batch = collate_instruction([data[i] for i in range(8)], pretrained.tokenizer.eos_id, allowed_max_length=128)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))

    def step() -> float:
        start = time.perf_counter()
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    return model, optimizer, step


def sizes() -> dict:
    from llmft.training.resume import Checkpoints, LoopState, optimizer_state, rng_state

    out = {}
    for finetune in ("full", "lora"):
        model, optimizer, step = one_step_model(finetune)
        step_seconds = min(step() for _ in range(3))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optim, groups = optimizer_state(optimizer)
        rngs, extra = rng_state()
        state = LoopState(0, 1, 0, 0, {"steps": [], "epochs": []}, {**optim, **rngs}, {"param_groups": groups, **extra})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = Checkpoints(Path(tmp), 50, 1, {})
            times = []
            for _ in range(3):
                start = time.perf_counter()
                saved = checkpoints.save(trainable, state)
                times.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in saved.iterdir())
        out[finetune] = {"trainable_parameters": sum(p.numel() for p in trainable.values()),
                         "checkpoint_mb": round(size / 2**20, 1), "write_seconds": round(min(times), 3),
                         "step_seconds": round(step_seconds, 3),
                         "overhead_every_50": round(min(times) / (50 * step_seconds), 4)}
        print(finetune, out[finetune], flush=True)
    return out


RECIPE = ["-m", "llmft", "classify", "train", "--model", "smollm2-135m-instruct", "--data", "sms-spam",
          "--checkpoint-every", "50"]


def recipe() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spam"
        cmd = [sys.executable, *RECIPE, "--out", str(out)]
        start = time.perf_counter()
        killed = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        checkpoints = Path(tmp) / ".spam.staging" / "checkpoints"
        while not any(p.name >= "step-000300" and not p.name.endswith(".tmp") for p in checkpoints.glob("step-*")):
            if killed.poll() is not None:
                raise SystemExit(f"the run ended before step 300:\n{killed.stdout.read()}")
            time.sleep(0.5)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        killed_after = time.perf_counter() - start
        start = time.perf_counter()
        resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
        resume_seconds = time.perf_counter() - start
        if resumed.returncode:
            raise SystemExit(resumed.stdout + resumed.stderr)
        log = resumed.stdout + resumed.stderr
        results = json.loads((out / "results.json").read_text())
    saves = [float(line.split(" saved in ")[1].split(" s ")[0]) for line in log.splitlines()
             if "checkpoint at step" in line]
    return {"killed_after_seconds": round(killed_after, 1), "resumed_from": next(
        (line for line in log.splitlines() if "resuming from" in line), None), "resume_seconds": round(resume_seconds, 1),
        "checkpoints_written_on_resume": len(saves), "checkpoint_seconds_on_resume": round(sum(saves), 2),
        **{k: results[k] for k in ("train_accuracy", "validation_accuracy", "test_accuracy", "train_seconds")},
        "printed": [line for line in log.splitlines() if "accuracy:" in line]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["sizes", "recipe"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("LLMFT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    print(json.dumps(sizes() if args.part == "sizes" else recipe(), indent=2))
