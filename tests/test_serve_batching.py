"""The serving batcher without HTTP: jobs that join a running batch at step boundaries and
leave it when they end decode exactly what each decodes alone (greedy, and sampled with a
seed); the worker thread's queue limit, cancelling, and surviving a failing batch."""

import threading
import time

import pytest
import torch

from llmft.generation import DecodingState, generate_tokens
from llmft.serving.batcher import Busy, GenerationBatcher, GenerationJob, RunningBatch
from tests.test_generation import PROMPTS, chaotic_model

# (prompt, max new tokens, step at which it joins): the 17-token prompt joins a batch of shorter
# ones (the batch gets padding in front) and leaves first (its slots are dropped at the next join).
SCHEDULE = [(PROMPTS[1], 12, 0), (PROMPTS[2], 20, 0), (PROMPTS[0], 4, 2), (PROMPTS[3], 16, 9),
            ([7, 8], 6, 9), (PROMPTS[0][3:], 10, 13)]


def options(temperature=0.0, seed=None, eos=()):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return {"temperature": temperature, "top_k": None, "top_p": None, "generator": generator,
            "eos_ids": list(eos), "is_done": None}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return chaotic_model(request.param)


def run_schedule(model, jobs_at):
    """Step a RunningBatch, jobs joining at the steps given; the largest batch and slot count seen."""
    first = [job for job, at in jobs_at if at == 0]
    batch, step, widest, slots = RunningBatch(model, first), 1, len(first), 0
    later = [(job, at) for job, at in jobs_at if at > 0]
    with torch.no_grad():
        while batch.jobs or later:
            joining = [job for job, at in later if at <= step]
            later = [(job, at) for job, at in later if at > step]
            batch.step(joining)
            widest, slots, step = max(widest, len(batch.jobs)), max(slots, batch.state.total), step + 1
    batch.close()
    return widest, slots


def test_joining_rows_decode_what_they_decode_alone(model):
    alone = [generate_tokens(model, [p], max_new_tokens=n)[0] for p, n, _ in SCHEDULE]
    jobs = [GenerationJob(list(p), n, options()) for p, n, _ in SCHEDULE]
    widest, slots = run_schedule(model, [(job, at) for job, (_, _, at) in zip(jobs, SCHEDULE)])
    assert [job.tokens for job in jobs] == alone
    assert [job.finish_reason for job in jobs] == ["length"] * len(jobs)
    assert widest >= 3
    assert slots <= 17 + 20 + 16  # slots nobody reads are dropped: far below the 100+ steps' worth


def test_seeded_sampling_and_stop_ids_alone_or_batched(model):
    sampled = generate_tokens(model, [PROMPTS[2]], max_new_tokens=12, temperature=1.0,
                              generator=torch.Generator().manual_seed(5))
    greedy = generate_tokens(model, [PROMPTS[3]], max_new_tokens=12)[0]
    eos = greedy[4]
    jobs = [GenerationJob(list(PROMPTS[2]), 12, options(1.0, seed=5)),
            GenerationJob(list(PROMPTS[3]), 12, options(eos=[eos])),
            GenerationJob(list(PROMPTS[1]), 12, options(1.0, seed=6))]
    run_schedule(model, [(jobs[0], 0), (jobs[1], 0), (jobs[2], 3)])
    assert jobs[0].tokens == sampled[0]
    assert jobs[1].tokens == greedy[:greedy.index(eos)] and jobs[1].finish_reason == "stop"
    assert jobs[2].tokens == generate_tokens(model, [PROMPTS[1]], max_new_tokens=12, temperature=1.0,
                                             generator=torch.Generator().manual_seed(6))[0]


def test_join_keeps_the_cache_rows_in_step(model):
    """A prompt joining a state (longer than it: the state gets padding in front) gives the
    logits a fresh batch of both prompts gives, after the join and after the next step: the
    cache rows, positions and key mask were merged consistently."""
    new = [[5], [6]]
    with torch.no_grad():
        state = DecodingState(model, [PROMPTS[1]], 8, use_cache=True)
        joined = [torch.cat([state.prefill(), state.join([PROMPTS[0]], 8)])]
        joined.append(state.step(new))
        assert state.active == [0, 1] and state.end == len(PROMPTS[0]) + 1
        fresh = DecodingState(model, [PROMPTS[1], PROMPTS[0]], 8, use_cache=True)
        both = [fresh.prefill(), fresh.step(new)]
        model.clear_kv_cache()
    for a, b in zip(joined, both):
        torch.testing.assert_close(a, b)


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_worker_queue_limit_cancel_and_failures(model):
    expected = generate_tokens(model, [PROMPTS[1]], max_new_tokens=6)[0]  # before the worker owns the model
    worker = GenerationBatcher(model, max_batch=2, max_queue=1, prepack=False)
    gate, calls = threading.Event(), []

    def slow_then_fail(module, args):  # every forward pass waits for the gate; the 3rd one fails
        gate.wait(10)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    hook = model.final_norm.register_forward_pre_hook(slow_then_fail)
    worker.start()
    try:
        jobs = [GenerationJob(list(p), 5, options()) for p in PROMPTS[:3]]
        worker.submit(jobs[0])
        wait_for(lambda: not worker._waiting)  # taken: its prefill waits at the gate
        worker.submit(jobs[1])
        worker.submit(jobs[2])
        with pytest.raises(Busy, match="busy: 3 requests"):
            worker.submit(GenerationJob(list(PROMPTS[3]), 5, options()))
        worker.cancel(jobs[2])  # still waiting: it ends at once
        assert jobs[2].finish_reason == "cancelled" and worker.in_flight == 2
        gate.set()
        for job in jobs[:2]:
            job.wait()
        assert [job.finish_reason for job in jobs[:2]] == ["error", "error"]
        assert "boom" in str(jobs[0].error)
        later = GenerationJob(list(PROMPTS[1]), 6, options())
        worker.submit(later)
        later.wait()
        assert later.finish_reason == "length" and later.tokens == expected
        wait_for(lambda: worker.in_flight == 0)
    finally:
        hook.remove()
        gate.set()
        worker.stop()
    assert not worker._thread.is_alive()
