"""Suite `serve`: `llmft serve` under concurrent clients, against serving the same requests one
at a time.

Generation: SmolLM2-135M-Instruct (the offline GGUF) behind `llmft serve --model ... --max-batch
32`; `--serve-requests` chat requests (the first test-split instructions of the book's data,
greedy, at most `--serve-tokens` new tokens, streamed with `stream_options.include_usage`) sent
by 1, 8 and 32 concurrent clients over loopback. Concurrency 1 is the baseline: the same
requests one at a time. Per level: requests/s and new tokens/s over the whole set (first
request sent to last answer done), p50/p95 latency (request to last chunk) and time to first
token (request to the first chunk with text), the server's peak RSS, and how many answers equal
the baseline's. Each level gets a fresh server process, warmed up by one untimed request.

Classification: a SmolLM2-135M-Instruct classifier whose two-label head has random weights
(`SequenceClassifier`, saved as a run: the speed does not depend on the head's values), served
with --max-batch 32; `--serve-requests` × 4 SMS texts, one text per request, sent one at a time
(batch 1) and by 32 concurrent clients (the server batches what is waiting, up to 32 texts).

The clients (httpx, asyncio) run in the orchestrating process, on the same CPU as the server.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import ROOT, Section, worker_env

MODEL = "smollm2-135m-instruct"
LEVELS = (1, 8, 32)
LLMFT = [sys.executable, "-c", "import sys; from llmft.cli import main; sys.exit(main())"]


def _start_server(source: list[str], max_tokens: int) -> tuple[subprocess.Popen, str]:
    """`llmft serve` in a subprocess on a free port; (process, base URL) once it listens."""
    print(f"[bench] serve {' '.join(source)} ...", file=sys.stderr, flush=True)
    process = subprocess.Popen([*LLMFT, "serve", *source, "--port", "0", "--max-batch", "32", "--max-queue", "200",
                                "--max-tokens", str(max_tokens)], cwd=ROOT, env=worker_env(),
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe drained
            return process, found.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit(f"llmft serve did not start ({' '.join(source)})")


def _stop_server(process: subprocess.Popen) -> float:
    """Its peak RSS in MB (VmHWM), then SIGINT and wait."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    process.send_signal(2)
    process.wait(60)
    return peak


async def _chat(client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: its text, new tokens, latency and time to first token."""
    import json

    began, first, pieces, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                first = first or time.perf_counter()
                pieces.append(piece)
    end = time.perf_counter()
    return {"text": "".join(pieces), "tokens": usage["completion_tokens"], "latency": end - began,
            "ttft": (first or end) - began}


async def _classify(client, body: dict[str, Any]) -> dict[str, Any]:
    began = time.perf_counter()
    response = await client.post("/v1/classify", json=body)
    response.raise_for_status()
    return {"latency": time.perf_counter() - began}


async def _load(url: str, send, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, list[dict]]:
    """Send every body with at most `concurrency` requests in flight; (seconds, results in order)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await send(client, bodies[0])  # warm-up, untimed

        async def one(body):
            async with gate:
                return await send(client, body)

        began = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - began, list(results)


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _spread(values: list[float], digits: int) -> str:
    """p50 / p95."""
    return f"{_percentile(values, 50):.{digits}f} / {_percentile(values, 95):.{digits}f}"


def _row(task: str, level: int, count: int, seconds: float, baseline: float, results: list[dict],
         peak: float, same: str = "–") -> list[str]:
    """A table row; `results` hold latencies, and for generation new tokens and ttft."""
    tokens = sum(r.get("tokens", 0) for r in results)
    generated = "tokens" in results[0]
    return [task if level == 1 else "", str(level), str(count), f"{seconds:.1f}", f"{count / seconds:.2f}",
            "1.00 (baseline)" if level == 1 else f"{baseline / seconds:.2f}×",
            f"{tokens / seconds:.1f}" if generated else "–",
            _spread([r["latency"] for r in results], 2 if generated else 3),
            _spread([r["ttft"] for r in results], 2) if generated else "–", f"{peak:,.0f}",
            same]


def _chat_bodies(count: int, max_tokens: int) -> list[dict[str, Any]]:
    from llmft.data.instruction import load_instruction_data, split_instruction_data
    from llmft.prompts import user_message

    _, test, _ = split_instruction_data(load_instruction_data("instruction-data"))
    return [{"model": MODEL, "messages": [{"role": "user", "content": user_message(e)}], "max_tokens": max_tokens,
             "stream": True, "stream_options": {"include_usage": True}} for e in test[:count]]


def _classifier_run(folder: Path) -> Path:
    """SmolLM2-135M-Instruct with a random two-label head, saved as a classification run."""
    import torch

    from llmft.checkpoint import save_finetuned
    from llmft.rundir import RunDir, RunMeta
    from llmft.training.heads import SequenceClassifier
    from llmft.weights import load_pretrained

    torch.manual_seed(0)
    pretrained = load_pretrained(MODEL)
    model = SequenceClassifier(pretrained.model, 2, "last")
    folder.mkdir(parents=True)
    save_finetuned(RunDir(folder), model, pretrained.tokenizer,
                   RunMeta(task="classification", model=MODEL, model_config=pretrained.config.to_dict(),
                           max_length=128, labels=["ham", "spam"], class_token="last"))
    return folder


def _generation_rows(args) -> tuple[list[list[str]], list[dict]]:
    bodies = _chat_bodies(args.serve_requests, args.serve_tokens)
    rows, raw = [], []
    for level in LEVELS:
        process, url = _start_server(["--model", MODEL], args.serve_tokens)
        seconds, results = asyncio.run(_load(url, _chat, bodies, level))
        peak = _stop_server(process)
        raw.append({"level": level, "seconds": seconds, "results": results, "peak_rss_mb": peak})
        same = sum(r["text"] == b["text"] for r, b in zip(results, raw[0]["results"]))
        rows.append(_row("chat (generation)", level, len(bodies), seconds, raw[0]["seconds"], results, peak,
                         "reference" if level == 1 else f"{same}/{len(results)}"))
    return rows, raw


def _classification_rows(args) -> tuple[list[list[str]], list[dict]]:
    from llmft.data.sources import read_labelled_texts, resolve_data

    texts = [t for t, _ in read_labelled_texts(resolve_data("sms-spam"))[:args.serve_requests * 4]]
    bodies = [{"model": "classifier", "input": t} for t in texts]
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="llmft-bench-") as tmp:
        run = _classifier_run(Path(tmp) / "classifier")
        for level in (1, 32):
            process, url = _start_server([str(run)], 1)
            seconds, results = asyncio.run(_load(url, _classify, bodies, level))
            peak = _stop_server(process)
            raw.append({"level": level, "seconds": seconds, "results": results, "peak_rss_mb": peak})
            rows.append(_row("classify (1 text each)", level, len(bodies), seconds, raw[0]["seconds"], results, peak))
    return rows, raw


def run(args) -> Section:
    generation, generation_raw = _generation_rows(args)
    classification, classification_raw = _classification_rows(args)
    return Section(
        title="Serving: `llmft serve` under concurrent clients",
        intro=[f"{MODEL} (offline GGUF, fp32) behind `llmft serve --model {MODEL} --max-batch 32`: "
               f"{args.serve_requests} chat requests (the first test-split instructions of the book's data, greedy, "
               f"at most {args.serve_tokens} new tokens, streamed), sent by 1, 8 and 32 concurrent clients over "
               "loopback; concurrency 1 (the same requests one at a time) is the baseline of each speed figure. "
               f"Classification: {MODEL} with a random two-label head (`SequenceClassifier`; the speed does not "
               "depend on its values) saved as a run and served with --max-batch 32: "
               f"{len(classification_raw[0]['results'])} SMS texts, one per request, one at a time (batch 1) and "
               "from 32 concurrent clients (the server runs the texts waiting, up to 32, as one batch). Each line: "
               "a fresh server process and one "
               "untimed warm-up request; the clients (httpx, asyncio) share the CPU with the server."],
        headers=["requests", "clients", "count", "seconds", "requests/s", "vs one at a time", "new tokens/s",
                 "latency p50 / p95 (s)", "time to first token p50 / p95 (s)", "server peak RSS (MB)",
                 "answers equal to one at a time"],
        rows=generation + classification,
        notes=["seconds: from the first request sent to the last answer received; latency: request to its last "
               "byte; time to first token: request to the first chunk with text; peak RSS: the server process's "
               "VmHWM (model, prepacked weights, KV caches)."],
        raw=[{"generation": generation_raw, "classification": classification_raw}],
    )
