"""What every suite shares: one process per measured variant, same weights for both sides,
the machine description, timing and the markdown table.

Why one process per variant: peak memory (`ru_maxrss` on CPU) is a high-water mark of the
whole process, so two variants measured in one process would share a peak. Each variant runs
in a fresh `worker.py`; the orchestrator (`run.py`) launches them in ABBA order (baseline,
ours, ours, baseline, ...) so that a slow drift in the machine's load biases neither side, and
every speed figure it prints is a ratio of timings taken during that same run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("worker.py")
RESULT_PREFIX = "BENCHMARK-RESULT "
STATUS = Path("/proc/self/status")
PROGRESS_BAR = re.compile(r"\s*[\w ]*:\s+\d+%\|")

# --quick shrinks every model to this (the real vocabulary stays): a smoke test of the
# machinery whose numbers say nothing about the real sizes.
QUICK_OVERRIDES = {
    "gpt2": {"n_layers": 2, "emb_dim": 128, "n_heads": 4, "context_length": 256},
    "llama": {"n_layers": 2, "emb_dim": 128, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256},
}


@dataclass
class Section:
    """One suite's share of the report."""

    title: str
    intro: list[str]
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", *self.intro, "", markdown_table(self.headers, self.rows)]
        if self.notes:
            parts += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(parts)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def worker_env() -> dict[str, str]:
    """Workers never touch the network and find ../shared/data like the tests do."""
    env = dict(os.environ)
    data = ROOT.parent / "shared" / "data"
    if data.is_dir():
        env.setdefault("LLMFT_DATA_DIR", str(data))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant in a fresh interpreter. Its output (progress, the training loop's
    evaluation lines) is echoed to stderr as it comes; the result is its last JSON line."""
    label = spec.get("label", spec["suite"])
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results, tail = [], []
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            results.append(line[len(RESULT_PREFIX):])
        elif line.strip() and not PROGRESS_BAR.match(line):  # tqdm redraws (\r) read as lines; eval lines show progress
            sys.stderr.write(f"  {line}")
            tail = [*tail[-40:], line]
    if proc.wait() or not results:
        raise SystemExit(f"benchmark worker failed ({label}, exit {proc.returncode}):\n{''.join(tail)}")
    return json.loads(results[-1])


def abba(variants: Sequence[str], rounds: int) -> list[str]:
    """Variant order over `rounds` rounds: forwards, backwards, forwards, ..."""
    order: list[str] = []
    for r in range(rounds):
        order += list(variants) if r % 2 == 0 else list(reversed(variants))
    return order


def run_interleaved(variants: Sequence[str], rounds: int,
                    spec_for: Callable[[str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each variant's worker results, launched in ABBA order."""
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for variant in abba(variants, rounds):
        results[variant].append(run_worker(spec_for(variant)))
    return results


def shared_weight_runs(args, suite: str, impls: Sequence[str],
                       spec: Callable[[str], dict[str, Any]]) -> Iterator[tuple[str, dict[str, list[dict[str, Any]]]]]:
    """For each of `args.models`: one seeded random model exported to a safetensors folder,
    every implementation's workers run on that folder (ABBA), and (model, results) yielded."""
    with tempfile.TemporaryDirectory(prefix="llmft-bench-") as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            export_weights(model, args.quick, folder)

            def spec_for(impl: str) -> dict[str, Any]:
                return {"suite": suite, "label": f"{suite} {model} {impl}", "impl": impl, "weights": str(folder),
                        "device": args.device, "seed": 0, **spec(impl)}

            yield model, run_interleaved(impls, args.rounds, spec_for)


def pooled(results: list[dict[str, Any]], key: str) -> list[float]:
    return [x for r in results for x in r[key]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio_cell(value: float, baseline: float, is_baseline: bool) -> str:
    return "1.00 (baseline)" if is_baseline else f"{value / baseline:.2f}×"


def seconds_cell(values: Sequence[float]) -> str:
    """Median, with the spread (min–max) when there were several timings."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{median(values):.3f} ({min(values):.3f}–{max(values):.3f}, n={len(values)})"


# -- the worker side -----------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of one call; CUDA work is waited for on both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_memory(device: str) -> float:
    """MB: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak resident set.

    On Linux that is VmHWM, not `ru_maxrss`: a child started by `subprocess` (vfork + exec)
    inherits its parent's `ru_maxrss` — every worker would report at least the
    orchestrator's peak — while VmHWM belongs to this process image alone and can be reset.
    """
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**10, 1)
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2**20 if sys.platform == "darwin" else rss / 2**10, 1)


def memory_header(device: str) -> str:
    return "peak GPU memory allocated (MB)" if device.startswith("cuda") else "peak RSS (MB)"


def reset_peak_memory(device: str) -> None:
    """Start a new peak from what is resident now (CUDA; Linux via /proc/self/clear_refs).
    Elsewhere the peak cannot be reset, and callers order their runs smallest first."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def bench_config(model: str, quick: bool):
    """The registry config, shrunk for --quick."""
    from llmft.models import get_config

    cfg = get_config(model)
    return cfg.with_(**QUICK_OVERRIDES[cfg.architecture]) if quick else cfg


def export_weights(model: str, quick: bool, folder: Path, seed: int = 0) -> None:
    """A seeded random model of this config, written as a Hugging Face folder both sides load."""
    import torch

    from llmft.models import build_model
    from llmft.weights.huggingface import export_hf

    torch.manual_seed(seed)
    export_hf(build_model(bench_config(model, quick)), folder)


def load_ours(folder: str, device: str):
    """Our DecoderLM with the folder's weights."""
    from llmft.models import build_model
    from llmft.weights.huggingface import load_hf_folder

    cfg, state = load_hf_folder(folder)
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device)


def load_hf(folder: str, device: str):
    """The `transformers` model (GPT2LMHeadModel / LlamaForCausalLM) with the folder's weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device)


# -- the report --------------------------------------------------------------------------------

def spam_classifier():
    """The README main command's classifier (SmolLM2-135M-Instruct from the offline GGUF, the
    default recipe) and its train/validation/test loaders (batch 8, seed 123)."""
    os.environ.setdefault("LLMFT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from llmft.data.classification import label_names, longest
    from llmft.pipelines.classification import ClassifyOptions, build_classifier, load_splits, make_loaders
    from llmft.weights import load_pretrained

    opts = ClassifyOptions(model="smollm2-135m-instruct", data="sms-spam", out=Path("/tmp/unused"))
    splits = load_splits(opts)
    labels = label_names(splits)
    pretrained = load_pretrained(opts.model)
    max_length = min(longest(splits.train, pretrained.tokenizer), pretrained.config.context_length)
    loaders = make_loaders(splits, pretrained.tokenizer, labels, max_length, 8, 123, None)
    model, _ = build_classifier(opts, pretrained, labels)
    return model, loaders


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "os": platform.platform(), "device": device,
        "git": _git_revision(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
