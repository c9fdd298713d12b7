"""Ollama's API under /api: tags (the model list), chat and generate.

Answers stream as newline-delimited JSON objects by default (`"stream": false`: one object):
pieces of the answer with `"done": false`, then a last object with `"done": true`, the
`done_reason` ("stop" or "length") and Ollama's counts and durations (nanoseconds).
`/api/generate` formats its prompt (and `system`) in the prompt style, as a one-message chat,
unless `"raw": true`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from llmft.serving.batcher import GenerationJob
from llmft.serving.bridge import context, failure, finished, pulled, served_for, submit
from llmft.serving.schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaRequest
from llmft.serving.served import ChatModel, Prompt

router = APIRouter(prefix="/api")
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # Ollama's names


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    served = context(request).served
    modified = datetime.datetime.fromtimestamp(served.created, datetime.timezone.utc).isoformat()
    details = {"format": "safetensors", "family": served.config.architecture,
               "families": [served.config.architecture], "parameter_size": f"{served.parameters / 1e6:.1f}M",
               "quantization_level": _DTYPE_NAMES.get(next(served.model.parameters()).dtype, "unknown")}
    return {"models": [{"name": served.name, "model": served.name, "modified_at": modified,
                        "size": served.size_bytes, "digest": hashlib.sha256(served.name.encode()).hexdigest(),
                        "details": details}]}


@router.get("/version")
async def ollama_version() -> dict[str, str]:
    return {"version": version("llmft")}


@router.post("/chat")
async def chat(body: OllamaChatRequest, request: Request) -> Any:
    served = served_for(request, body.model, "instruction")
    text = served.chat_prompt([m.model_dump() for m in body.messages])
    return await _answer(request, body, _prompt(request, served, text, body, chat=True), "message")


@router.post("/generate")
async def generate(body: OllamaGenerateRequest, request: Request) -> Any:
    served = served_for(request, body.model, "instruction")
    messages = [{"role": "system", "content": body.system}] if body.system else []
    text = body.prompt if body.raw else served.chat_prompt([*messages, {"role": "user", "content": body.prompt}])
    return await _answer(request, body, _prompt(request, served, text, body, chat=not body.raw), "response")


def _prompt(request: Request, served: ChatModel, text: str, body: OllamaRequest, chat: bool) -> Prompt:
    o = body.options
    wanted = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None
    return served.prepare(text, chat=chat, max_tokens=wanted or None, limit=context(request).limits.max_tokens,
                          temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, seed=o.seed, stop=o.stop)


def _content(field: str, text: str) -> dict[str, Any]:
    """An answer's text as chat (`message`) or generate (`response`) carries it."""
    return {"message": {"role": "assistant", "content": text}} if field == "message" else {"response": text}


def _final(job: GenerationJob) -> dict[str, Any]:
    """The last object's fields: done, why, and Ollama's counts and durations (ns)."""
    first = job.first_token or job.finished
    return {"done": True, "done_reason": job.finish_reason, "total_duration": _ns(job.finished - job.submitted),
            "load_duration": 0, "prompt_eval_count": len(job.prompt),
            "prompt_eval_duration": _ns(first - job.submitted), "eval_count": len(job.tokens),
            "eval_duration": _ns(job.finished - first)}


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


async def _answer(request: Request, body: OllamaRequest, prompt: Prompt, field: str) -> Any:
    """Run the prompt; the answer as NDJSON pieces, or one object with `"stream": false`."""
    job = GenerationJob(prompt.ids, prompt.max_new_tokens, prompt.options)
    submit(request, job)
    if body.stream:
        return StreamingResponse(_lines(request, job, prompt, field), media_type="application/x-ndjson")
    await finished(request, job)
    text = context(request).served.text(prompt, job.tokens)
    return {"model": context(request).served.name, "created_at": _now(), **_content(field, text), **_final(job)}


async def _lines(request: Request, job: GenerationJob, prompt: Prompt, field: str) -> AsyncIterator[str]:
    served = context(request).served

    def line(data: dict[str, Any]) -> str:
        return json.dumps({"model": served.name, "created_at": _now(), **data}, ensure_ascii=False) + "\n"

    async for piece in pulled(request, job, served.pieces(prompt, job.steps())):
        yield line({**_content(field, piece), "done": False})
    error = failure(job)
    yield line({"error": error.message} if error else {**_content(field, ""), **_final(job)})
