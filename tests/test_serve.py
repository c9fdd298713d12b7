"""`llmft serve` over loopback, with the real client libraries: OpenAI's (chat, streaming,
completions, models), Ollama's (chat, generate, tags), the judge's openai:/ollama: backends,
/v1/classify on a classifier and a LoRA classifier, bad requests, the API key, a full queue,
disconnected clients, and 32 concurrent clients. Greedy answers are compared with `answer`
and `generate` on a separately loaded copy of the same run.

The runs are tiny random-init models trained for a few steps (built once per session, shared
with test_serve_page.py and test_serve_cli.py); each server is uvicorn in a thread on a free
127.0.0.1 port, stopped at the end.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import psutil
import pytest
import uvicorn

from llmft.evaluation.judge import OllamaJudge, OpenAIJudge, judge_prompt
from llmft.generation import _token_options, generate, generate_tokens
from llmft.pipelines.classification import ClassifyOptions, predict, train_classifier
from llmft.pipelines.instruction import InstructOptions, answer, load_chat_model, train_instructions
from llmft.prompts import default_prompt_style
from llmft.serving import create_app, load_served
from llmft.serving.batcher import RunningBatch
from llmft.serving.bridge import Limits
from llmft.serving.served import ChatModel
from llmft.serving.server import listen
from llmft.training.loop import TrainConfig
from llmft.weights import load_pretrained
from tests.helpers import INSTRUCTIONS, SMS

TINY = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 256}
SPAM = "WINNER!! You have won a £1000 prize. Call 09061701461 to claim now"
HAM = "Ok, see you at home later"
# Raw prompts: the tiny run continues each differently, so a mixed-up batch row would show.
RAW = ["Every effort moves you", "The capital of France is", "Hello", "Once upon a time there", "1, 2, 3, 4,",
       "Translate to French: cat", "Sort the list: b, a, c", "Why is the sky blue?"]


@dataclass(frozen=True)
class Runs:
    sft: Path
    spam: Path
    spam_lora: Path


@functools.cache
def train_runs(base: Path) -> Runs:
    """An instruction run (alpaca) and two classifiers (full and LoRA), trained for a few steps."""
    base.mkdir(parents=True, exist_ok=True)
    data, sms = base / "slice.json", base / "sms.tsv"
    data.write_text(json.dumps(json.loads(INSTRUCTIONS.read_text())[:40]))
    sms.write_text("".join(SMS.read_text(encoding="utf-8").splitlines(keepends=True)[:2000]), encoding="utf-8")
    runs = Runs(base / "sft", base / "spam", base / "spam-lora")
    train_instructions(InstructOptions(model="gpt2-small", data=str(data), out=runs.sft, random_init=True,
                                       config_overrides=TINY, max_length=96,
                                       train=TrainConfig(epochs=1, lr=5e-3, eval_freq=50, eval_iter=1, device="cpu")))
    for out, finetune in ((runs.spam, "full"), (runs.spam_lora, "lora")):
        train_classifier(ClassifyOptions(model="gpt2-small", data=str(sms), out=out, random_init=True,
                                         config_overrides=TINY, trainable="all", finetune=finetune,
                                         train=TrainConfig(epochs=1, lr=1e-3, eval_freq=500, device="cpu")))
    return runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return train_runs(tmp_path_factory.getbasetemp() / "serve-runs")


@contextmanager
def serving(app):
    """`app` served by uvicorn in a thread on a free loopback port; its base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def reference(runs):
    """The instruction run loaded again, for answers computed without the server."""
    return load_chat_model(str(runs.sft), "cpu")


@pytest.fixture(scope="module")
def chat(runs):
    app = create_app(load_served(str(runs.sft), device="cpu"), max_batch=8, max_queue=200,
                     limits=Limits(max_tokens=64, max_body=4096))
    with serving(app) as url:
        yield url, app


def expected_tokens(model, tokenizer, style, text, n, chat=True):
    """The new token ids `generate` decides for this text (stopping as a chat answer does)."""
    options = _token_options(model, tokenizer, 0.0, None, None, style.stop_strings if chat else (),
                             style.stop_token_ids(tokenizer) if chat else None, None)
    return generate_tokens(model, [tokenizer.encode(text)], max_new_tokens=n, **options)[0]


def test_openai_chat_models_and_usage(chat, reference):
    url, _ = chat
    model, tokenizer, style = reference
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["sft"]
    assert client.models.retrieve("sft").id == "sft"
    for instruction in ("Name a primary color.", "Identify the climax in 'Romeo and Juliet'."):
        entry = {"instruction": instruction, "input": ""}
        reply = client.chat.completions.create(model="sft", messages=[{"role": "user", "content": instruction}],
                                               max_tokens=24)
        assert reply.object == "chat.completion" and reply.model == "sft"
        assert reply.choices[0].message.content == answer(model, tokenizer, style, [entry], max_new_tokens=24)[0]
        tokens = expected_tokens(model, tokenizer, style, style.format(entry), 24)
        assert reply.usage.prompt_tokens == len(tokenizer.encode(style.format(entry)))
        assert reply.usage.completion_tokens == len(tokens)
        assert reply.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    system = client.chat.completions.create(model="sft", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert system.usage.prompt_tokens == len(tokenizer.encode(style.format(
        {"instruction": "Be brief.\n\nHi", "input": ""})))


def test_openai_streams_join_to_the_answer(chat, reference):
    url, _ = chat
    model, tokenizer, style = reference
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Identify the climax in 'Romeo and Juliet'."}]
    whole = client.chat.completions.create(model="sft", messages=messages, max_tokens=30)
    chunks = list(client.chat.completions.create(model="sft", messages=messages, max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for prompt in RAW[:3]:
        full = generate(model, tokenizer, [prompt], max_new_tokens=20)[0]
        done = client.completions.create(model="sft", prompt=prompt, max_tokens=20)
        assert done.object == "text_completion" and done.choices[0].text == full
        assert done.usage.completion_tokens == 20 and done.choices[0].finish_reason == "length"
        pieces = [c.choices[0].text for c in client.completions.create(model="sft", prompt=prompt, max_tokens=20,
                                                                      stream=True)]
        assert len(pieces) > 2 and "".join(pieces) == full
    stop = full[3:6]
    cut = client.completions.create(model="sft", prompt=RAW[2], max_tokens=20, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_sse_is_event_stream(chat):
    url, _ = chat
    body = {"model": "sft", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_ollama_client(chat, reference):
    url, _ = chat
    model, tokenizer, style = reference
    client = ollama.Client(host=url, timeout=30)
    assert [m.model for m in client.list().models] == ["sft"]
    entry = {"instruction": "Identify the climax in 'Romeo and Juliet'.", "input": ""}
    messages = [{"role": "user", "content": entry["instruction"]}]
    reply = client.chat(model="sft", messages=messages, options={"num_predict": 16})
    assert reply.done and reply.message.content == answer(model, tokenizer, style, [entry], max_new_tokens=16)[0]
    assert reply.prompt_eval_count == len(tokenizer.encode(style.format(entry)))
    assert reply.eval_count == len(expected_tokens(model, tokenizer, style, style.format(entry), 16))
    assert reply.done_reason in ("stop", "length") and reply.total_duration > 0
    parts = list(client.chat(model="sft:latest", messages=messages, options={"num_predict": 16}, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == reply.eval_count
    raw = client.generate(model="sft", prompt=RAW[0], raw=True, options={"num_predict": 12})
    assert raw.response == generate(model, tokenizer, [RAW[0]], max_new_tokens=12)[0] and raw.done_reason == "length"
    streamed = client.generate(model="sft", prompt=RAW[0], raw=True, options={"num_predict": 12}, stream=True)
    assert "".join(p.response for p in streamed) == raw.response
    styled = client.generate(model="sft", prompt=entry["instruction"], options={"num_predict": 16})
    assert styled.response == reply.message.content


def test_judge_backends_against_our_server(chat, reference):
    url, _ = chat
    model, tokenizer, style = reference
    entry = {"instruction": "Name a color.", "input": "", "output": "Red.", "model_response": "Blue."}
    prompt = judge_prompt(entry)
    room = min(64, TINY["context_length"] - len(tokenizer.encode(style.format({"instruction": prompt, "input": ""}))))
    expected = answer(model, tokenizer, style, [{"instruction": prompt, "input": ""}], max_new_tokens=room)[0]
    assert OpenAIJudge("sft", url, api_key="").score(prompt) == expected
    assert OllamaJudge("sft", url).score(prompt) == expected


@pytest.fixture(scope="module", params=["spam", "spam_lora"])
def classifier(request, runs):
    run = getattr(runs, request.param)
    with serving(create_app(load_served(str(run), device="cpu"), max_batch=8)) as url:
        yield url, run


def test_classify(classifier):
    url, run = classifier
    texts = [SPAM, HAM]
    reply = httpx.post(url + "/v1/classify", json={"input": texts}, timeout=30)
    assert reply.status_code == 200
    body = reply.json()
    assert body["model"] == run.name and len(body["data"]) == 2
    for ranked, (label, probability) in zip(body["data"], predict(run, texts, device="cpu")):
        assert [r["label"] for r in ranked] in (["ham", "spam"], ["spam", "ham"])
        assert ranked[0]["score"] >= ranked[1]["score"] and sum(r["score"] for r in ranked) == pytest.approx(1)
        assert ranked[0]["label"] == label and ranked[0]["score"] == pytest.approx(probability, abs=1e-6)
    one = httpx.post(url + "/v1/classify", json={"input": SPAM, "model": run.name}, timeout=30).json()["data"]
    assert len(one) == 1 and [r["label"] for r in one[0]] == [r["label"] for r in body["data"][0]]
    assert [r["score"] for r in one[0]] == pytest.approx([r["score"] for r in body["data"][0]], abs=1e-6)


BAD_REQUESTS = [  # path, body (bytes: sent as is), status, phrase
    ("/v1/chat/completions", b'{"model": "sft", "messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/chat/completions", b"", 400, "must be a JSON object"),
    ("/v1/chat/completions", {"model": "sft"}, 400, "messages: Field required"),
    ("/v1/chat/completions", {"model": "sft", "messages": "hi"}, 400, "messages: Input should be a valid list"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role: Input should be"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
     400, "max_tokens: Input should be a valid integer"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65},
     400, "above this server's limit of 64"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
     400, "temperature: Input should be greater than or equal to 0"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400,
     "n: Input should be less than or equal to 1"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "stop": 5}, 400,
     "stop: must be a string or a list of them"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "only text content parts"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "system", "content": "x"}]}, 400,
     "no user message"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model 'gpt-4' not found; this server serves 'sft'"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "word " * 300}]}, 400,
     "exceeds the model's context of 256 tokens"),
    ("/v1/completions", {"model": "sft", "prompt": "a " * 200, "max_tokens": 60}, 400,
     "with 60 new tokens it exceeds the model's context"),
    ("/v1/completions", {"model": "sft", "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"model": "sft", "prompt": ""}, 400, "the prompt is empty"),
    ("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "x" * 5000}]}, 413,
     "larger than this server's limit of 4096 bytes"),
    ("/v1/classify", {"input": ["spam?"]}, 400, "'sft' is an instruction model"),
    ("/v1/nothing", {}, 404, "no route POST /v1/nothing"),
    ("/api/chat", {"model": "sft", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "x"}},
     400, "options.num_predict: Input should be a valid integer"),
    ("/api/generate", {"model": "llama3", "prompt": "x"}, 404, "model 'llama3' not found"),
    ("/api/generate", {"model": "sft"}, 400, "prompt: Field required"),
]


@pytest.mark.parametrize("path, body, status, phrase", BAD_REQUESTS)
def test_bad_requests_get_json_errors(chat, path, body, status, phrase):
    url, _ = chat
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(url + path, content=content, timeout=30)
    assert reply.status_code == status
    error = reply.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and phrase in error
    else:
        assert phrase in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_server_survives_and_reads_no_files(chat):
    url, _ = chat
    assert httpx.get(url + "/v1/chat/completions", timeout=10).status_code == 405
    for path in ("/../pyproject.toml", "/static/../../pyproject.toml", "/%2e%2e/%2e%2e/pyproject.toml",
                 "/static/index.html", "/api/../../etc/passwd", "//etc/passwd"):
        reply = httpx.get(url + path, timeout=10)
        assert reply.status_code == 404 and "[project]" not in reply.text and "root:" not in reply.text
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and "<title>llmft serve</title>" in page.text
    assert not re.search(r"(src|href)=|@import|https?:", page.text)  # no CDN: nothing loaded from elsewhere
    body = {"model": "sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_api_key(runs):
    app = create_app(load_served(str(runs.sft), device="cpu"), api_key="s3cret")
    with serving(app) as url:
        assert httpx.get(url + "/", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/api/tags", timeout=10).json() == {
            "error": "missing or wrong API key (send the header Authorization: Bearer KEY)"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["sft"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_503_and_disconnects_stop_generation(runs):
    served = load_served(str(runs.sft), device="cpu")
    hook = served.model.final_norm.register_forward_hook(lambda *_: time.sleep(0.05))  # 200 tokens: 2.5+ s
    app = create_app(served, max_batch=1, max_queue=1, limits=Limits(max_tokens=200))
    worker, jobs = app.state.llmft.worker, []
    submit = worker.submit
    worker.submit = lambda job: (submit(job), jobs.append(job))
    body = {"model": "sft", "prompt": "Hello", "max_tokens": 200, "stream": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as first, \
                client.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == second.status_code == 200
            next(first.iter_lines())  # the first is generating, the second waits
            busy = client.post("/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy: 2 requests are running or waiting" in busy.json()["error"]["message"]
            ollama_busy = client.post("/api/generate", json={"model": "sft", "prompt": "x"})
            assert ollama_busy.status_code == 503 and "busy" in ollama_busy.json()["error"]
        deadline = time.monotonic() + 10  # both clients are gone: their jobs end at the next step
        while worker.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.in_flight == 0
        assert [job.finish_reason for job in jobs] == ["cancelled", "cancelled"]
        assert len(jobs[0].tokens) < 100 and jobs[1].tokens == []
        # a client that stops waiting for a whole (non-streamed) answer cancels it too
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={**body, "stream": False}, timeout=0.5)
        deadline = time.monotonic() + 10
        while worker.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs[2].finish_reason == "cancelled" and len(jobs[2].tokens) < 150
    hook.remove()


async def clients_answer(url: str, requests: list[tuple[str, dict]], clients: int) -> list[tuple[int, str]]:
    """Send the requests from `clients` concurrent clients (each sends its share in turn)."""
    async def client(share):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            out = []
            for path, body in share:
                reply = await http.post(path, json=body)
                data = reply.json()
                text = data["choices"][0]["text"] if "choices" in data else data.get("response")
                out.append((reply.status_code, text))
            return out

    shares = await asyncio.gather(*(client(requests[i::clients]) for i in range(clients)))
    return [shares[i % clients][i // clients] for i in range(len(requests))]


def test_32_concurrent_clients(chat, reference, monkeypatch):
    url, app = chat
    model, tokenizer, _ = reference
    prompts = [f"{RAW[i % len(RAW)]} {i // len(RAW)}" for i in range(32)]
    expected = {p: generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts}
    requests = [("/v1/completions", {"model": "sft", "prompt": p, "max_tokens": 12}) if i % 2 else
                ("/api/generate", {"model": "sft", "prompt": p, "raw": True, "stream": False,
                                   "options": {"num_predict": 12}}) for i, p in enumerate(prompts * 4)]
    widths, step = [], RunningBatch.step
    monkeypatch.setattr(RunningBatch, "step",
                        lambda self, joining: widths.append(len(self.jobs)) or step(self, joining))
    rss = psutil.Process().memory_info().rss
    began = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(clients_answer(url, requests, 32), timeout=120))
    assert time.monotonic() - began < 120
    assert [status for status, _ in answers] == [200] * 128
    assert [text for _, text in answers] == [expected[body.get("prompt")] for _, body in requests]
    assert max(widths) == 8  # batched up to --max-batch
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20
    assert app.state.llmft.worker.in_flight == 0


@pytest.fixture(scope="module")
def template_chat():
    """A tiny random model with SmolLM2-Instruct's tokenizer and chat template, served as is,
    and a copy of it for reference answers."""
    pretrained = load_pretrained("smollm2-135m-instruct", random_init=True, overrides={
        "n_layers": 2, "emb_dim": 64, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96, "head_dim": 0})
    model, tokenizer = pretrained.model.eval(), pretrained.tokenizer
    style = default_prompt_style(tokenizer)
    served = ChatModel(name="tiny-chat", task="instruction", model=copy.deepcopy(model), tokenizer=tokenizer,
                       config=pretrained.config, created=0, style=style)
    with serving(create_app(served)) as url:
        yield url, (model, tokenizer, style)


def test_chat_template_renders_every_turn(template_chat):
    url, (model, tokenizer, style) = template_chat
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    prompt = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
              "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n")
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12)
    text = generate(model, tokenizer, [prompt], max_new_tokens=12, stop_strings=style.stop_strings,
                    eos_id=style.stop_token_ids(tokenizer))[0]
    assert reply.choices[0].message.content == style.extract_response(text)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    entry = {"instruction": "Name a primary color.", "input": ""}
    one = client.chat.completions.create(model="tiny-chat", max_tokens=12,
                                         messages=[{"role": "user", "content": entry["instruction"]}])
    assert one.choices[0].message.content == answer(model, tokenizer, style, [entry], max_new_tokens=12)[0]


@pytest.mark.slow
def test_serves_smollm2_instruct():
    """The real offline model (`llmft serve --model smollm2-135m-instruct`): concurrent greedy
    answers equal `answer` one at a time."""
    served = load_served("smollm2-135m-instruct", device="cpu")
    model, tokenizer, style = copy.deepcopy(served.model), served.tokenizer, served.style  # loaded once
    entries = [{"instruction": i, "input": ""} for i in
               ("Name a primary color.", "What is the capital of France?")]
    expected = [answer(model, tokenizer, style, [e], max_new_tokens=16)[0] for e in entries]
    with serving(create_app(served, max_batch=4)) as url:
        requests = [("/v1/chat/completions", {"model": "smollm2-135m-instruct", "max_tokens": 16,
                                              "messages": [{"role": "user", "content": e["instruction"]}]})
                    for e in entries]
        replies = asyncio.run(asyncio.wait_for(chat_answers(url, requests), timeout=120))
    assert replies == expected and all(expected)


async def chat_answers(url: str, requests: list[tuple[str, dict]]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        replies = await asyncio.gather(*(http.post(path, json=body) for path, body in requests))
    return [r.json()["choices"][0]["message"]["content"] for r in replies]
