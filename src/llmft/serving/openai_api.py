"""OpenAI's API under /v1: models, chat completions, text completions, and /v1/classify for a
classification run (Hugging Face's text-classification shape: every label with its score,
best first).

A streamed answer is server-sent events (`text/event-stream`): `chat.completion.chunk`s (or
`text_completion` chunks) whose pieces join to the answer, a last chunk with the
`finish_reason`, a chunk with `usage` when `stream_options.include_usage` asks for it, then
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from llmft.serving.batcher import ClassifyJob, GenerationJob
from llmft.serving.bridge import context, failure, finished, pulled, served_for, submit, usage
from llmft.serving.errors import error_body
from llmft.serving.schemas import ChatRequest, ClassifyRequest, CompletionRequest, Sampling
from llmft.serving.served import ChatModel, Prompt, ServedModel

router = APIRouter(prefix="/v1")


def model_card(served: ServedModel) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "llmft",
            "task": served.task}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(context(request).served)]}


@router.get("/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    served = context(request).served
    served.check_name(name)
    return model_card(served)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    served = served_for(request, body.model, "instruction")
    text = served.chat_prompt([m.model_dump() for m in body.messages])
    return await _complete(request, body, _prompt(request, served, text, body, True,
                                                 body.max_completion_tokens or body.max_tokens))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    served = served_for(request, body.model, "instruction")
    return await _complete(request, body, _prompt(request, served, body.prompt, body, False, body.max_tokens))


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    served = served_for(request, body.model, "classification")
    job = ClassifyJob(list(body.input))
    submit(request, job)
    await finished(request, job)
    return {"object": "list", "model": served.name, "data": [served.ranked(p) for p in job.probabilities]}


def _prompt(request: Request, served: ChatModel, text: str, body: Sampling, chat: bool,
            max_tokens: int | None) -> Prompt:
    return served.prepare(text, chat=chat, max_tokens=max_tokens, limit=context(request).limits.max_tokens,
                          temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop)


async def _complete(request: Request, body: Sampling, prompt: Prompt) -> Any:
    """Run the prompt and answer in OpenAI's shape (chat when `prompt.chat`), streamed or whole."""
    job = GenerationJob(prompt.ids, prompt.max_new_tokens, prompt.options)
    submit(request, job)
    head = {"id": f"{'chatcmpl' if prompt.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": context(request).served.name}
    if body.stream:
        return StreamingResponse(_events(request, job, prompt, head, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await finished(request, job)
    text = context(request).served.text(prompt, job.tokens)
    choice = {"index": 0, "logprobs": None, "finish_reason": job.finish_reason}
    choice.update({"message": {"role": "assistant", "content": text}} if prompt.chat else {"text": text})
    return {**head, "object": "chat.completion" if prompt.chat else "text_completion", "choices": [choice],
            "usage": usage(job)}


def _chunk_choice(chat: bool, piece: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """A chunk's choice: a piece of text (chat: `delta.content`; None: the assistant's role, first)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if not chat:
        return {**choice, "text": piece or ""}
    delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece} if piece else {}
    return {**choice, "delta": delta}


async def _events(request: Request, job: GenerationJob, prompt: Prompt, head: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer."""
    chat, served = prompt.chat, context(request).served

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": choices}
        return event({**data, **({"usage": None} if include_usage else {}), **extra})

    if chat:
        yield chunk([_chunk_choice(chat, None)])
    async for piece in pulled(request, job, served.pieces(prompt, job.steps())):
        yield chunk([_chunk_choice(chat, piece)])
    error = failure(job)
    if error is not None:
        yield event(error_body(request.url.path, error))
        return
    yield chunk([_chunk_choice(chat, "", job.finish_reason)])
    if include_usage:
        yield chunk([], usage=usage(job))
    yield "data: [DONE]\n\n"
