"""The worker threads that own the models: a bounded queue of jobs in, batches out.

Requests never call a model themselves. A handler makes a job and `submit`s it to the model's
`Worker`; the worker's thread takes jobs off the queue in arrival order and runs them in
batches, and the handler waits for its job (or reads its tokens as they come). A full queue
raises `Busy` (the server answers 503 with Retry-After); a job whose client went away is
`cancel`led and leaves its batch at the next step.

`GenerationBatcher` batches continuously: a `RunningBatch` decodes its jobs together, one
`DecodingState` with the model's KV cache; after every step the jobs that finished (end of
text, a stop id or string, their token limit) or were cancelled leave it, and waiting jobs
join it (`DecodingState.join`) up to `max_batch` rows, without waiting for the others to end.
Each row keeps its own settings (token limit, stop ids and strings, temperature, seed), so a
greedy answer is the one `generate` gives for that prompt alone (up to float rounding: a padded
batch multiplies other shapes). `ClassifyBatcher` is dynamic batching: each batch is whatever
texts are waiting, up to `max_batch`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmft.generation import (
    DRAFT_TOKENS, DecodingState, Steps, _take, accept_draft, decoding_session, prompt_lookup_draft,
    sample_next_token,
)

log = logging.getLogger("llmft.serve")


class Busy(Exception):
    """The worker's queue is full (or it is shutting down): try again later."""


class Job:
    """One request's work for a worker: it ends once, with a reason, and can be waited for."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.cancelled = threading.Event()  # set by the handler: the worker drops the job
        self._done = threading.Event()

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()

    @property
    def done(self) -> bool:
        return self._done.is_set()


class GenerationJob(Job):
    """A prompt's generation: its token ids and `stream_tokens`-style settings (`options`:
    temperature, top_k, top_p, generator, eos_ids, is_done) in; its new token ids out, as a list
    (`tokens`) and step by step (`steps`)."""

    def __init__(self, prompt: list[int], max_new_tokens: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.prompt, self.max_new_tokens, self.options = prompt, max_new_tokens, options
        self.eos = set(options["eos_ids"])
        self.tokens: list[int] = []
        self.first_token: float | None = None  # perf_counter() when the first token came
        self.finished: float | None = None
        self._updates: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()

    @property
    def greedy(self) -> bool:
        return self.options["temperature"] == 0.0

    def take(self, tokens: Sequence[int]) -> bool:
        """Add the tokens a step decided for this job (up to its end); whether it goes on."""
        if self.cancelled.is_set():
            self.finish("cancelled")
            return False
        before = len(self.tokens)
        going = _take(self.tokens, tokens, self.eos, self.max_new_tokens, self.options["is_done"])
        if len(self.tokens) > before:
            self.first_token = self.first_token or time.perf_counter()
            self._updates.put(self.tokens[before:])
        if not going:
            at_limit = len(self.tokens) >= self.max_new_tokens
            stopped = self.options["is_done"] is not None and self.options["is_done"](self.tokens)
            self.finish("length" if at_limit and not stopped else "stop")
        return going

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finished = time.perf_counter()
        super().finish(reason, error)
        self._updates.put(None)

    def steps(self) -> Steps:
        """The new token ids as they are decided, in `stream_tokens`' form ({0: ids} per step),
        until the job ends (blocking; then `finish_reason` says how)."""
        while (ids := self._updates.get()) is not None:
            yield {0: ids}


class ClassifyJob(Job):
    """Texts to classify; `probabilities` (one list per text, in label order) once done."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = texts
        self.probabilities: list[list[float]] = []


class Worker:
    """A thread that owns one model and serves the jobs `submit`ted to it, in order.

    At most `capacity` jobs are accepted at a time (running or waiting); one more raises `Busy`.
    Subclasses implement `_serve`, which runs until `stopping`, takes jobs with `_take` and
    counts them out with `_finished`. An exception while serving fails the jobs taken and not
    finished, never the thread.
    """

    def __init__(self, name: str, capacity: int) -> None:
        self.name, self.capacity = name, capacity
        self.stopping = False
        self._waiting: deque[Job] = deque()
        self._accepted: set[Job] = set()  # running or waiting
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not yet finished."""
        return len(self._accepted)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel those left and wait for the thread."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self._accepted) >= self.capacity:
                raise Busy(f"the server is busy: {len(self._accepted)} requests are running or waiting; "
                           "retry shortly")
            self._accepted.add(job)
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client is gone: at once while it waits, else at the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finished(job, "cancelled")

    def _take(self, limit: int, wait: bool, size: Callable[[Job], int] = lambda job: 1) -> list[Job]:
        """Waiting jobs in order while their `size`s add up to at most `limit` (always one when
        there is one); with `wait`, first block until a job comes or the worker stops."""
        with self._cond:
            while wait and not self._waiting and not self.stopping:
                self._cond.wait()
            jobs: list[Job] = []
            while self._waiting and limit > 0 and (not jobs or size(self._waiting[0]) <= limit):
                limit -= size(self._waiting[0])
                jobs.append(self._waiting.popleft())
            return jobs

    def _finished(self, job: Job, reason: str = "cancelled", error: BaseException | None = None) -> None:
        """Count a job out, ending it with `reason` unless it has ended."""
        if not job.done:
            job.finish(reason, error)
        with self._cond:
            self._accepted.discard(job)

    def _main(self) -> None:
        while not self.stopping:
            try:
                self._serve()
            except Exception as e:  # a bug or out of memory: fail the jobs taken, keep serving
                log.exception("%s: the batch failed", self.name)
                self._reset()
                with self._cond:
                    taken = [job for job in self._accepted if job not in self._waiting]
                for job in taken:
                    self._finished(job, "error", e)
        self._reset()
        with self._cond:
            left = list(self._accepted)
        for job in left:
            self._finished(job, "cancelled")

    def _serve(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop the batch at hand (after a failure, or when stopping)."""


class RunningBatch:
    """Jobs decoded together: the rows of one `DecodingState` (`jobs`, in row order) and the
    logits their next tokens come from."""

    def __init__(self, model: Any, jobs: list[GenerationJob]) -> None:
        self.model = model
        self._start(jobs)

    def _start(self, jobs: list[GenerationJob]) -> None:
        """Prefill `jobs` as a batch of their own."""
        self.jobs, self.draft = list(jobs), []
        self.state = DecodingState(self.model, [j.prompt for j in jobs], max(j.max_new_tokens for j in jobs),
                                   use_cache=True)
        self.logits = self.state.prefill()

    def close(self) -> None:
        self.model.clear_kv_cache()

    def step(self, joining: list[GenerationJob]) -> list[GenerationJob]:
        """Decide every row's next tokens and hand them to its job; the jobs that ended (or
        were cancelled) leave, `joining` join; the rest run one position. Returns who left."""
        keep, new, ended = [], [], []
        for j, (job, choices) in enumerate(zip(self.jobs, self._choices())):
            tokens = accept_draft(self.draft, choices)
            if job.take(tokens):
                keep.append(j)
                new.append(tokens)
            else:
                ended.append(job)
        self.jobs = [self.jobs[j] for j in keep]
        self.draft = self._guesses(joining)
        if self.jobs:
            self.state.evict(keep)
            self.logits = self.state.step(new, self.draft)
        if joining:
            self._join(joining)
        return ended

    def _choices(self) -> list[list[int]]:
        """Each row's choices: a greedy row's argmax after the last token and after each guess,
        a sampled row's one token drawn at the last position with its settings and generator."""
        choices = self.logits.argmax(dim=-1).tolist()  # (B, K): the one host sync of a greedy batch
        for j, job in enumerate(self.jobs):
            if not job.greedy:
                o = job.options
                choices[j] = sample_next_token(self.logits[j:j + 1, -1], o["temperature"], o["top_k"], o["top_p"],
                                               o["generator"]).tolist()
        return choices

    def _guesses(self, joining: list[GenerationJob]) -> list[int]:
        """Prompt-lookup guesses for a single greedy row with nobody joining (as in
        `stream_tokens`: one pass verifies them); none otherwise."""
        if len(self.jobs) != 1 or joining or not self.jobs[0].greedy:
            return []
        job = self.jobs[0]
        return prompt_lookup_draft(job.prompt + job.tokens, min(DRAFT_TOKENS, job.max_new_tokens - len(job.tokens) - 1))

    def _join(self, joining: list[GenerationJob]) -> None:
        """Prefill the joining jobs into the batch (a new batch when every row has left)."""
        if not self.jobs:
            self.close()
            self._start(joining)
            return
        most = max(j.max_new_tokens for j in joining)
        self.logits = torch.cat([self.logits, self.state.join([j.prompt for j in joining], most)])
        self.jobs += joining


class GenerationBatcher(Worker):
    """Continuous batching of generation jobs on one model (see the module docstring): up to
    `max_batch` rows decode together, `max_queue` more jobs may wait. The model stays in one
    `decoding_session` (weights prepacked once, with `prepack`) while the server runs."""

    def __init__(self, model: Any, max_batch: int, max_queue: int, prepack: bool = True) -> None:
        super().__init__("llmft-generate", max_batch + max_queue)
        self.model, self.max_batch, self.prepack = model, max_batch, prepack
        self.batch: RunningBatch | None = None

    def _serve(self) -> None:
        with torch.no_grad(), decoding_session(self.model, self.prepack):
            while not self.stopping:
                running = len(self.batch.jobs) if self.batch else 0
                joining = self._take(self.max_batch - running, wait=not running)
                if self.batch is None:
                    self.batch = RunningBatch(self.model, joining) if joining else None
                    continue
                for job in self.batch.step(joining):
                    self._finished(job)
                if not self.batch.jobs:
                    self._reset()

    def _reset(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self.batch = None


class ClassifyBatcher(Worker):
    """Dynamic batching of classification jobs: each forward pass takes the texts waiting, up
    to `max_batch` of them (a job's texts stay together), through `probabilities(texts)`."""

    def __init__(self, probabilities: Callable[[list[str]], list[list[float]]], max_batch: int,
                 max_queue: int) -> None:
        super().__init__("llmft-classify", max_batch + max_queue)
        self.probabilities, self.max_batch = probabilities, max_batch

    def _serve(self) -> None:
        while not self.stopping:
            jobs = self._take(self.max_batch, wait=True, size=lambda job: len(job.texts))
            wanted = [j for j in jobs if not j.cancelled.is_set()]
            probabilities = self.probabilities([t for j in wanted for t in j.texts]) if wanted else []
            for job in wanted:
                job.probabilities, probabilities = probabilities[:len(job.texts)], probabilities[len(job.texts):]
                job.finish("stop")
            for job in jobs:
                self._finished(job)
