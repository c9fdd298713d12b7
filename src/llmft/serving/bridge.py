"""Between the event loop and the worker threads: handing a job over, waiting for it and
reading its answer as it comes, none of which blocks the loop. A client that goes away
cancels its job, which then leaves its batch at the next step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from llmft.errors import one_line
from llmft.serving.batcher import Busy, Job, Worker
from llmft.serving.errors import RequestError
from llmft.serving.served import ServedModel

T = TypeVar("T")
_END = object()


@dataclass
class Limits:
    """What a request may ask for."""

    max_tokens: int = 512  # new tokens per request
    max_body: int = 1 << 20  # bytes of a request body


@dataclass
class Context:
    """What every handler needs (on `app.state.llmft`): the model, its worker, the limits, and
    the threads that wait for jobs (one per request in flight)."""

    served: ServedModel
    worker: Worker
    limits: Limits
    threads: anyio.CapacityLimiter


def context(request: Request) -> Context:
    return request.app.state.llmft


def served_for(request: Request, name: str | None, task: str) -> ServedModel:
    """The served model, when `name` means it (a classify request may leave it out) and it does
    `task`; a 404 or 400 naming the problem otherwise."""
    served = context(request).served
    if name is not None or task != "classification":
        served.check_name(name)
    if served.task != task:
        kind, wanted = (("a classifier", "POST /v1/classify") if served.task == "classification"
                        else ("an instruction model", "chat and completions"))
        raise RequestError(400, f"{served.name!r} is {kind}: it answers {wanted} only", param="model")
    return served


def submit(request: Request, job: Job) -> None:
    """Queue the job with the model's worker (503 with Retry-After when the queue is full); it
    is remembered for the request's log line."""
    try:
        context(request).worker.submit(job)
    except Busy as e:
        raise RequestError(503, str(e), code="server_busy", headers={"Retry-After": "1"}) from None
    request.state.job = job


def failure(job: Job) -> RequestError | None:
    """Why a finished job has no answer, as the error to send; None when it has one."""
    if job.finish_reason == "error":
        return RequestError(500, f"the model failed on this request ({one_line(job.error)})")
    if job.finish_reason == "cancelled":
        return RequestError(503, "the request was cancelled (its client went away, or the server is shutting down)",
                            code="server_busy")
    return None


async def finished(request: Request, job: Job) -> None:
    """Wait until the job ends, cancelling it if the client disconnects first; a job without an
    answer raises its `failure`."""
    ctx = context(request)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_cancel_on_disconnect, request, ctx.worker, job)
        await anyio.to_thread.run_sync(job.wait, abandon_on_cancel=True, limiter=ctx.threads)
        tasks.cancel_scope.cancel()
    error = failure(job)
    if error is not None:
        raise error


async def _cancel_on_disconnect(request: Request, worker: Worker, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)


async def pulled(request: Request, job: Job, items: Iterator[T]) -> AsyncIterator[T]:
    """`items` (which block on the job's progress) pulled in a thread one at a time. When the
    stream is left early (the response is cancelled: the client went away) the job is cancelled."""
    ctx = context(request)
    try:
        while (item := await anyio.to_thread.run_sync(next, items, _END, abandon_on_cancel=True,
                                                       limiter=ctx.threads)) is not _END:
            yield item
    finally:
        ctx.worker.cancel(job)  # nothing left to do for a job that has ended


def usage(job: Any) -> dict[str, int]:
    """OpenAI's token counts of a generation job."""
    prompt, new = len(job.prompt), len(job.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}
