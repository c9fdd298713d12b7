import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llmft.errors import LlmftError
from llmft.evaluation.judge import (
    LocalJudge,
    OllamaJudge,
    OpenAIJudge,
    judge_prompt,
    judge_responses,
    parse_judge_spec,
    parse_score,
)
from llmft.models import build_model, get_config
from llmft.prompts import get_prompt_style
from llmft.tokenizers import GPT2Tokenizer

from tests.helpers import DATA  # $LLMFT_DATA_DIR or ../shared/data
ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
    {"instruction": "What type of cloud is typically associated with thunderstorms?", "input": "",
     "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
     "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud."},
    {"instruction": "Name the author of 'Pride and Prejudice'.", "input": "",
     "output": "Jane Austen.", "model_response": "The author of 'Pride and Prejudice' is Jane Austen."},
]


class Server:
    """A real HTTP server on 127.0.0.1 that answers POSTs with `reply(path, body)`:
    (status, list of byte chunks written one by one, as a streaming server does)."""

    def __init__(self, reply):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                status, chunks = reply(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(reply):
        servers.append(Server(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def ollama_stream(text):
    """Ollama's /api/chat stream: one JSON object per line, a final one with done=true."""
    lines = [{"model": "llama3", "message": {"role": "assistant", "content": piece}, "done": False}
             for piece in (text[:1], text[1:])]
    lines.append({"model": "llama3", "message": {"role": "assistant", "content": ""}, "done": True})
    return 200, [json.dumps(x).encode() + b"\n" for x in lines]


def openai_reply(text):
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}
    return 200, [json.dumps(body).encode()]


def test_judge_prompt_is_the_books():
    assert judge_prompt(ENTRIES[1]) == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nWhat type of cloud is typically "
        "associated with thunderstorms?` and correct output `The type of cloud typically associated "
        "with thunderstorms is cumulonimbus.`, score the model response `The type of cloud associated "
        "with thunderstorms is a cumulus cloud.` on a scale from 0 to 100, where 100 is the best "
        "score. Respond with the integer number only.")
    assert "\n\n### Input:\nThe car is very fast.` and correct output" in judge_prompt(ENTRIES[0])


@pytest.mark.parametrize("text,score", [
    ("85", 85), ("Score: 85/100", 85), ("I'd give it 90.", 90), ("100", 100), ("0", 0),
    ("On a scale from 0 to 100, I would rate it 73.", 73), ("73 out of 100", 73),
    ("Between 0 and 100: 12", 12), ("87.6", 88), ("2024 was a year; 42", 42),
    ("garbage", None), ("", None), ("-5", None),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_ollama_judge_speaks_the_book_protocol(serve, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # local servers bypass proxies
    server = serve(lambda path, body: ollama_stream("85"))
    assert OllamaJudge("llama3", server.url).score("hello") == "85"
    assert server.requests[0]["path"] == "/api/chat"
    assert server.requests[0]["body"] == {
        "model": "llama3", "messages": [{"role": "user", "content": "hello"}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}


def test_openai_judge(serve):
    server = serve(lambda path, body: openai_reply("Score: 91"))
    judge = OpenAIJudge("gpt-4o-mini", server.url + "/v1/", api_key="sk-test")
    assert judge.score("hello") == "Score: 91"
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
                               "temperature": 0, "seed": 123}
    assert request["headers"]["Authorization"] == "Bearer sk-test"


def test_judge_responses_scores_saves_and_summarises(serve, tmp_path):
    replies = iter(["85", "I'd give it 40.", "no idea"])
    server = serve(lambda path, body: ollama_stream(next(replies)))
    out = tmp_path / "sub" / "scores.json"
    report = judge_responses(ENTRIES, OllamaJudge("llama3", server.url), out)
    assert report.scores == [85, 40, None]
    assert (report.n_scored, report.n_total, report.average) == (2, 3, 62.5)
    assert report.summary() == "Number of scores: 2 of 3\nAverage score: 62.50"
    saved = json.loads(out.read_text())
    assert saved["judge"] == "ollama:llama3" and saved["n_entries"] == 3
    assert [(r["index"], r["score"], r["reply"]) for r in saved["entries"]] == [
        (0, 85, "85"), (1, 40, "I'd give it 40."), (2, None, "no idea")]
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == [judge_prompt(e) for e in ENTRIES]


def test_failure_keeps_scores_and_resume_skips_them(serve, tmp_path):
    out = tmp_path / "scores.json"
    flaky = serve(lambda path, body: ollama_stream("70") if len(flaky.requests) < 3
                  else (500, [b'{"error": "out of memory"}']))
    with pytest.raises(LlmftError) as e:
        judge_responses(ENTRIES + [dict(ENTRIES[0], model_response="x")], OllamaJudge("m", flaky.url),
                        out, progress=False)
    assert str(e.value).endswith("HTTP 500 (out of memory) (2 of 4 scores saved in "
                                 f"{out}; run the same command to continue)")
    assert len(json.loads(out.read_text())["entries"]) == 2

    good = serve(lambda path, body: ollama_stream("90"))
    report = judge_responses(ENTRIES + [dict(ENTRIES[0], model_response="x")], OllamaJudge("m", good.url),
                             out, progress=False)
    assert report.scores == [70, 70, 90, 90]
    assert len(good.requests) == 2
    # another judge does not reuse these scores
    other = serve(lambda path, body: ollama_stream("10"))
    assert judge_responses(ENTRIES, OllamaJudge("other", other.url), out, progress=False).scores == [10] * 3


def test_down_server(serve, tmp_path):
    server = serve(lambda path, body: ollama_stream("1"))
    server.close()
    with pytest.raises(LlmftError, match=r"cannot reach the judge at http://127.0.0.1:\d+/api/chat .*"
                                         r"is the server running\? \(no score saved\)$") as e:
        judge_responses(ENTRIES, OllamaJudge("llama3", server.url), tmp_path / "s.json", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("judge_cls,reply,message", [
    (OllamaJudge, (200, [b"<html>proxy error</html>\n"]), "unexpected reply '<html>proxy error</html>'"),
    (OllamaJudge, (404, [b'{"error":"model \\"llama3\\" not found, try pulling it first"}']),
     'HTTP 404 \\(model "llama3" not found, try pulling it first\\)'),
    (OllamaJudge, (200, [b'{"error":"something broke"}\n']), "api/chat: something broke"),
    (OpenAIJudge, (200, [b'{"choices": []}']), "unexpected reply"),
    (OpenAIJudge, (401, [b'{"error": {"message": "Incorrect API key"}}']), "HTTP 401 \\(Incorrect API key\\)"),
])
def test_garbage_replies(serve, judge_cls, reply, message):
    server = serve(lambda path, body: reply)
    with pytest.raises(LlmftError, match=message) as e:
        judge_cls("m", server.url).score("hello")
    assert "\n" not in str(e.value)


def test_broken_scores_file(tmp_path):
    out = tmp_path / "s.json"
    out.write_text("[1, 2]")
    with pytest.raises(LlmftError, match="not a judge scores file"):
        judge_responses(ENTRIES, OllamaJudge(), out, progress=False)
    with pytest.raises(LlmftError, match="entry 0: missing or non-string 'model_response'"):
        judge_responses([{"instruction": "a", "output": "b"}], OllamaJudge(), out, progress=False)


def test_parse_judge_spec():
    judge = parse_judge_spec("ollama:llama3")
    assert isinstance(judge, OllamaJudge) and judge.endpoint == "http://localhost:11434/api/chat"
    judge = parse_judge_spec("openai:gpt-4o-mini", url="http://127.0.0.1:8000/v1")
    assert isinstance(judge, OpenAIJudge) and judge.endpoint == "http://127.0.0.1:8000/v1/chat/completions"
    assert parse_judge_spec("openai:gpt-4o-mini").endpoint == "https://api.openai.com/v1/chat/completions"
    for bad, message in [("llama3", "expected ollama:MODEL"), ("gemini:pro", "unknown kind 'gemini'"),
                         ("local:/x", "not available")]:
        with pytest.raises(LlmftError, match=message):
            parse_judge_spec(bad)
    loaded = []
    style = get_prompt_style("phi3")
    judge = parse_judge_spec("local:/runs/a", load_local=lambda p: loaded.append(p) or ("m", "t", style))
    assert loaded == ["/runs/a"] and isinstance(judge, LocalJudge) and judge.name == "local:/runs/a"
    assert judge.style is style


def test_local_judge_generates_greedily():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFT_DATA_DIR", str(DATA))
        tokenizer = GPT2Tokenizer.default()
    torch.manual_seed(0)
    model = build_model(get_config("gpt2-small").with_(n_layers=1, emb_dim=32, n_heads=2, context_length=64))
    judge = LocalJudge(model, tokenizer, max_new_tokens=4)
    prompt = judge_prompt(ENTRIES[0])
    assert judge.style.name == "alpaca"
    reply = judge.score(prompt)
    assert isinstance(reply, str) and reply == judge.score(prompt)
