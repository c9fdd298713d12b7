"""LLM-as-a-judge scoring of generated responses (book section 7.8).

A larger model reads the instruction, the reference output and the fine-tuned model's response,
and answers with a score from 0 to 100. Judges share one method, ``score(prompt) -> str``:
`OllamaJudge` (the book's setup, a local Ollama server), `OpenAIJudge` (any OpenAI-compatible
chat completions server) and `LocalJudge` (an llmft model). `judge_responses` scores a list of
entries, saving after every entry so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


from llmft.errors import Interrupted, LlmftError
from llmft.generation import generate
from llmft.progress import progress_bar
from llmft.prompts import PromptStyle, default_prompt_style, format_input
from llmft.rundir import atomic_write_json, read_json

OLLAMA_URL = "http://localhost:11434"
OPENAI_URL = "https://api.openai.com"
# The book's options: a fixed seed and temperature 0, so a score can be reproduced.
SEED = 123


def judge_prompt(entry: Mapping[str, Any], response_key: str = "model_response") -> str:
    """The book's judge prompt, word for word."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[response_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


class Judge(Protocol):
    name: str  # e.g. "ollama:llama3"; recorded with the scores

    def score(self, prompt: str) -> str:
        """The judge model's raw reply to `prompt`."""
        ...


@contextmanager
def _post_json(url: str, payload: dict, timeout: float,
               headers: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An open HTTP response to a JSON POST; every failure becomes a one-line LlmftError.

    Requests to this machine bypass any configured proxy: a local Ollama server is never
    behind the proxy that reaches the internet.
    """
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    local = urlparse(url).hostname in ("localhost", "127.0.0.1", "::1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else \
        urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout) as response:
            yield response
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace")
        try:
            error = json.loads(detail)["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
        except (ValueError, KeyError, TypeError):
            pass
        raise LlmftError(f"judge at {url}: HTTP {e.code} ({' '.join(str(detail).split())})") from None
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        reason = getattr(e, "reason", e)
        raise LlmftError(f"cannot reach the judge at {url} ({reason}); is the server running?") from None


def _garbage(url: str, reply: Any) -> LlmftError:
    return LlmftError(f"judge at {url}: unexpected reply {' '.join(str(reply)[:200].split())!r}")


class OllamaJudge:
    """An Ollama server's /api/chat, read as the stream of JSON lines it sends (the book's
    `query_model`)."""

    def __init__(self, model: str = "llama3", url: str = OLLAMA_URL, timeout: float = 300.0) -> None:
        self.model, self.timeout = model, timeout
        self.endpoint = url.rstrip("/") + "/api/chat"
        self.name = f"ollama:{model}"

    def score(self, prompt: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "options": {"seed": SEED, "temperature": 0, "num_ctx": 2048}}
        reply = ""
        with _post_json(self.endpoint, payload, self.timeout) as response:
            for line in response:
                if not line.strip():
                    continue
                try:
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise LlmftError(f"judge at {self.endpoint}: {chunk['error']}")
                    reply += chunk["message"]["content"]
                except (ValueError, KeyError, TypeError):
                    raise _garbage(self.endpoint, line.decode("utf-8", "replace")) from None
        return reply


class OpenAIJudge:
    """An OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM, llama.cpp server...).
    The API key comes from `api_key` or $OPENAI_API_KEY; local servers need none."""

    def __init__(self, model: str, url: str = OPENAI_URL, api_key: str | None = None,
                 timeout: float = 300.0) -> None:
        self.model, self.timeout = model, timeout
        base = url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.name = f"openai:{model}"

    def score(self, prompt: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": 0, "seed": SEED}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with _post_json(self.endpoint, payload, self.timeout, headers) as response:
            body = response.read()
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _garbage(self.endpoint, body.decode("utf-8", "replace")) from None
        if not isinstance(content, str):
            raise _garbage(self.endpoint, content)
        return content


class LocalJudge:
    """An llmft model as the judge: the prompt as a one-turn instruction in the model's prompt
    style (default: its chat template, else Alpaca), answered greedily."""

    def __init__(self, model: Any, tokenizer: Any, prompt_style: PromptStyle | None = None,
                 max_new_tokens: int = 16, name: str = "local") -> None:
        self.model, self.tokenizer, self.max_new_tokens, self.name = model, tokenizer, max_new_tokens, name
        self.style = prompt_style or default_prompt_style(tokenizer)

    def score(self, prompt: str) -> str:
        text = generate(self.model, self.tokenizer, [self.style.format({"instruction": prompt, "input": ""})],
                        max_new_tokens=self.max_new_tokens, stop_strings=self.style.stop_strings,
                        eos_id=self.style.stop_token_ids(self.tokenizer))[0]
        return self.style.extract_response(text)


# "0 to 100", "between 0 and 100", "/100", "out of 100": the scale, not the score.
_SCALE = re.compile(r"\b0\s*(?:-|–|to|and)\s*100\b|(?:/|\bout of|\bof)\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")


def parse_score(text: str) -> int | None:
    """The first number from 0 to 100 in a judge's reply, ignoring mentions of the scale
    ("Score: 85/100" -> 85, "I'd give it 90." -> 90, "87.6" -> 88); None if there is none."""
    for match in _NUMBER.finditer(_SCALE.sub(" ", text)):
        value = float(match.group())
        if 0 <= value <= 100:
            return round(value)
    return None


@dataclass
class JudgeReport:
    """Scores per entry (None where the judge's reply held no score) and their summary."""

    scores: list[int | None]
    path: Path

    @property
    def valid(self) -> list[int]:
        return [s for s in self.scores if s is not None]

    @property
    def n_scored(self) -> int:
        return len(self.valid)

    @property
    def n_total(self) -> int:
        return len(self.scores)

    @property
    def average(self) -> float | None:
        return sum(self.valid) / self.n_scored if self.valid else None

    def summary(self) -> str:
        """The book's two lines: how many scores were obtained, and their mean."""
        average = "n/a" if self.average is None else f"{self.average:.2f}"
        return f"Number of scores: {self.n_scored} of {self.n_total}\nAverage score: {average}"


def _fingerprint(judge_name: str, prompt: str) -> str:
    return hashlib.sha256(f"{judge_name}\n{prompt}".encode("utf-8")).hexdigest()[:16]


def _load_previous(out_path: Path) -> dict[str, dict]:
    if not out_path.exists():
        return {}
    data = read_json(out_path)
    try:
        return {r["fingerprint"]: r for r in data["entries"]}
    except (TypeError, KeyError):
        raise LlmftError(f"{out_path}: not a judge scores file; delete it or choose another path") from None


def judge_responses(entries: Sequence[Mapping[str, Any]], judge: Judge, out_path: str | Path,
                    progress: bool = True, response_key: str = "model_response") -> JudgeReport:
    """Score every entry's `response_key` with `judge`, saving to `out_path` (JSON) after each;
    `report.summary()` gives the book's "Number of scores: N of M" and average lines.

    Entries already scored in `out_path` by the same judge (same prompt) are not asked again,
    so an interrupted run resumes. When the judge fails (server down, garbage reply), the
    scores so far stay saved and the LlmftError says so.
    """
    out_path = Path(out_path)
    for i, entry in enumerate(entries):
        missing = [k for k in ("instruction", "output", response_key) if not isinstance(entry.get(k), str)]
        if missing:
            raise LlmftError(f"entry {i}: missing or non-string {missing[0]!r}")
    previous = _load_previous(out_path)
    records: list[dict | None] = []
    for entry in entries:
        prompt = judge_prompt(entry, response_key)
        records.append(previous.get(_fingerprint(judge.name, prompt)))

    def save() -> None:
        done = [r for r in records if r is not None]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, {"judge": judge.name, "n_entries": len(entries), "entries": done})

    todo = [i for i, r in enumerate(records) if r is None]
    bar = progress_bar(total=len(entries), initial=len(entries) - len(todo), desc=f"judge {judge.name}",
               disable=not progress)
    for i in todo:
        prompt = judge_prompt(entries[i], response_key)
        try:
            reply = judge.score(prompt)
        except (LlmftError, KeyboardInterrupt) as e:
            bar.close()
            n_saved = sum(r is not None for r in records)
            saved = (f"{n_saved} of {len(entries)} scores saved in {out_path}; run the same command to continue"
                     if n_saved else "no score saved")
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted ({saved})") from None
            raise LlmftError(f"{e} ({saved})") from None
        records[i] = {"index": i, "fingerprint": _fingerprint(judge.name, prompt),
                      "score": parse_score(reply), "reply": reply}
        save()
        bar.update(1)
    bar.close()
    return JudgeReport([r["score"] for r in records], out_path)


def parse_judge_spec(spec: str, url: str | None = None,
                     load_local: Callable[[str], tuple[Any, Any, PromptStyle]] | None = None) -> Judge:
    """A judge from ``ollama:MODEL``, ``openai:MODEL`` or ``local:RUN_OR_MODEL``.

    `url` overrides the server address. ``local:`` needs `load_local(target) -> (model,
    tokenizer, prompt_style)`, the caller's way of loading a run directory or a model.
    """
    kind, _, target = spec.partition(":")
    if not target:
        raise LlmftError(f"judge {spec!r}: expected ollama:MODEL, openai:MODEL or local:PATH")
    if kind == "ollama":
        return OllamaJudge(target, url or OLLAMA_URL)
    if kind == "openai":
        return OpenAIJudge(target, url or OPENAI_URL)
    if kind == "local":
        if load_local is None:
            raise LlmftError(f"judge {spec!r}: local judges are not available here")
        model, tokenizer, style = load_local(target)
        return LocalJudge(model, tokenizer, style, name=f"local:{target}")
    raise LlmftError(f"judge {spec!r}: unknown kind {kind!r}; expected ollama:MODEL, openai:MODEL "
                     f"or local:PATH")
