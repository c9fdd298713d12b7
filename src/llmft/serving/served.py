"""What a server serves: one model, loaded from a run directory or a model spec, under a name;
how a request becomes its input, and its output the answer.

An instruction run (or a model spec) is a `ChatModel`. Chat messages become one prompt: with
the tokenizer's chat template when that is the run's prompt style (every turn, as the template
renders them); otherwise, in the run's style (alpaca, phi3, chatml), the last user message as
the instruction, preceded by the system message if there is one: those runs were trained on
single instructions, so earlier turns are left out. The answer is what `answer` would give: the
generated text cut at the style's stop strings, with the response extracted. A raw completion
(`/v1/completions`, Ollama's `raw`) is the prompt as it is and the text as generated.

A classification run is a `ClassifierModel`: every label's probability for each text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from llmft.errors import LlmftError
from llmft.generation import Steps, _token_options, cut_at_stop, text_pieces
from llmft.models import ModelConfig
from llmft.pipelines.classification import label_probabilities, load_classifier
from llmft.pipelines.instruction import load_chat_model, response_pieces
from llmft.prompts import ChatTemplate, PromptStyle
from llmft.rundir import RunDir
from llmft.serving.errors import RequestError
from llmft.tokenizers import Tokenizer
from llmft.training.loop import resolve_device


# Texts per classifier forward pass, sorted by length (`predict` takes 8 too). On this 2-core CPU,
# 32 waiting SMS texts went fastest in passes of 4-8 (tried 1, 2, 4, 8, 16; docs/benchmarks.md,
# "Serving"): the work grows with the padded length more than it shrinks with the batch.
FORWARD_BATCH = 8


@dataclass
class Prompt:
    """A generation request made ready: prompt ids, token limit, `stream_tokens`-style options,
    the stop strings, and whether the answer is extracted with the prompt style (chat)."""

    ids: list[int]
    max_new_tokens: int
    options: dict[str, Any]
    stop_strings: tuple[str, ...]
    chat: bool


@dataclass
class ServedModel:
    """The model behind the server: `name` (what clients call it; `aliases` work too), its task
    ("instruction" or "classification"), the module, tokenizer and base config."""

    name: str
    task: str
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    created: int  # when the run (or model file) was made, for /v1/models
    aliases: set[str] = field(default_factory=set)

    def matches(self, name: str | None) -> bool:
        """Whether a request's model name means this model (Ollama's ":latest" tag allowed)."""
        return name is not None and name.removesuffix(":latest") in {self.name, *self.aliases}

    def check_name(self, name: str | None) -> None:
        if not self.matches(name):
            raise RequestError(404, f"model {name!r} not found; this server serves {self.name!r}", param="model",
                               code="model_not_found")

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def size_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


@dataclass
class ChatModel(ServedModel):
    style: PromptStyle | None = None

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for chat messages ({"role", "content"}), see the module docstring."""
        if isinstance(self.style, ChatTemplate):  # the template's own rendering of every turn
            try:
                return self.style._render(list(messages), add_generation_prompt=True)
            except LlmftError as e:
                raise RequestError(400, f"messages: {e}", param="messages") from None
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise RequestError(400, "messages: no user message to answer", param="messages")
        system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"])
        return self.style.format({"instruction": f"{system}\n\n{users[-1]}" if system else users[-1], "input": ""})

    def prepare(self, text: str, *, chat: bool, max_tokens: int | None, limit: int, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int | None = None, seed: int | None = None,
                stop: Sequence[str] = ()) -> Prompt:
        """A request's prompt text and settings checked against the model and the server's
        `limit` of new tokens (default: as many as fit, up to `limit`)."""
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError(400, "the prompt is empty", param="prompt")
        stops = (*self.style.stop_strings, *stop) if chat else tuple(stop)
        eos = self.style.stop_token_ids(self.tokenizer) if chat else None
        options = _token_options(self.model, self.tokenizer, temperature, top_k, top_p if top_p < 1 else None,
                                 stops, eos, seed)
        return Prompt(ids, self._new_tokens(len(ids), max_tokens, limit), options, stops, chat)

    def _new_tokens(self, prompt_tokens: int, max_tokens: int | None, limit: int) -> int:
        context = self.config.context_length
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(400, f"max_tokens is {max_tokens}, above this server's limit of {limit} "
                               "(llmft serve --max-tokens)", param="max_tokens")
        wanted = min(limit, context - prompt_tokens) if max_tokens is None else max_tokens
        if wanted < 1 or prompt_tokens + wanted > context:
            raise RequestError(400, f"the prompt is {prompt_tokens} tokens; with {max(wanted, 1)} new tokens it "
                               f"exceeds the model's context of {context} tokens", code="context_length_exceeded")
        return wanted

    def text(self, prompt: Prompt, tokens: list[int]) -> str:
        """The answer in new tokens: cut at a stop string, and for chat the response extracted."""
        text = cut_at_stop(self.tokenizer.decode(tokens), prompt.stop_strings)
        return self.style.extract_response(text) if prompt.chat else text

    def pieces(self, prompt: Prompt, steps: Steps) -> Iterator[str]:
        """`text` in pieces as the steps come: they join to it."""
        pieces = text_pieces(self.tokenizer, steps, prompt.stop_strings)
        return response_pieces(self.style, pieces) if prompt.chat else pieces


@dataclass
class ClassifierModel(ServedModel):
    labels: list[str] = field(default_factory=list)
    max_length: int = 0  # tokens per text the run was trained on (longer texts are cut)
    truncate: str = "head"  # which end of a longer text the run keeps (RunMeta.truncate)

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        """Every label's probability for each text (in order), computed `FORWARD_BATCH` texts of
        similar length at a time: a CPU's work grows with the padded length, not the batch."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        by_length = label_probabilities(self.model, self.tokenizer, [texts[i] for i in order], self.max_length,
                                        FORWARD_BATCH, self.truncate)
        out: list[list[float]] = [[] for _ in texts]
        for i, probabilities in zip(order, by_length):
            out[i] = probabilities
        return out

    def ranked(self, probabilities: list[float]) -> list[dict[str, Any]]:
        """Hugging Face's text-classification shape: every label with its score, best first."""
        pairs = sorted(zip(self.labels, probabilities), key=lambda pair: -pair[1])
        return [{"label": label, "score": score} for label, score in pairs]


def load_served(source: str, name: str | None = None, device: str = "auto") -> ServedModel:
    """A run directory (instruction or classification) or a model spec, ready to serve as
    `name` (default: the run's folder name, or the spec)."""
    path = Path(source)
    names = {"name": name or (path.name if path.exists() else source), "aliases": {source, str(path.resolve())},
             "created": int(path.stat().st_mtime if path.exists() else time.time())}
    run = RunDir(source)
    if run.is_run() and run.read_meta().task == "classification":
        model, tokenizer, meta = load_classifier(source, "llmft serve")
        model.to(resolve_device(device)).eval()
        return ClassifierModel(task="classification", model=model, tokenizer=tokenizer,
                               config=model.backbone.cfg, labels=list(meta.labels), max_length=meta.max_length,
                               truncate=meta.truncate, **names)
    model, tokenizer, style = load_chat_model(source, device)
    return ChatModel(task="instruction", model=model, tokenizer=tokenizer, config=model.cfg, style=style, **names)
