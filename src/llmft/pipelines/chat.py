"""Multi-turn chat with an instruction run or a model (`llmft chat`): the conversation so far
becomes one prompt in the run's prompt style (or the model's chat template), kept within the
model's context, and each answer streams as its tokens are decided."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llmft.pipelines.instruction import check_answer_settings, load_chat_model, stream_response
from llmft.prompts import ChatTemplate, PromptStyle
from llmft.tokenizers import Tokenizer


@dataclass
class Chat:
    """A conversation: the turns so far, and how answers are generated (`sampling`: the keyword
    arguments of `llmft.generation.stream_text`: temperature, top_k, top_p, seed, prepack)."""

    model: nn.Module
    tokenizer: Tokenizer
    style: PromptStyle
    max_new_tokens: int = 256
    sampling: dict[str, Any] = field(default_factory=dict)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user message, answer)

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt that asks for the answer to `message`: the latest turns that leave room for
        `max_new_tokens` in the context (the oldest go first), then the message itself."""
        context, turns = self.model.cfg.context_length, self.turns
        while True:
            ids = self._encode(turns, message)
            if not turns or len(ids) + self.max_new_tokens <= context:
                return ids
            turns = turns[1:]

    def _encode(self, turns: list[tuple[str, str]], message: str) -> list[int]:
        """A chat template renders every turn itself; another style writes each earlier turn as
        it trains on one (prompt, answer, end of text), then the prompt for `message`."""
        if isinstance(self.style, ChatTemplate):
            messages = [m for question, answer in turns for m in ({"role": "user", "content": question},
                                                                   {"role": "assistant", "content": answer})]
            return self.tokenizer.encode(self.style.format_messages([*messages, {"role": "user", "content": message}]))
        ids: list[int] = []
        for question, answer in turns:
            entry = {"instruction": question, "input": "", "output": answer}
            ids += self.tokenizer.encode(self.style.format(entry) + self.style.response_text(entry))
            ids.append(self.tokenizer.eos_id)
        return ids + self.tokenizer.encode(self.style.format({"instruction": message, "input": ""}))

    def reply(self, message: str) -> Iterator[str]:
        """The answer to `message`, in pieces as they are decided; once it is complete, the turn
        joins the conversation."""
        pieces = []
        for piece in stream_response(self.model, self.tokenizer, self.style, self.prompt_ids(message),
                                     max_new_tokens=self.max_new_tokens, **self.sampling):
            pieces.append(piece)
            yield piece
        self.turns.append((message, "".join(pieces)))

    def reset(self) -> None:
        """Forget the conversation."""
        self.turns.clear()


def open_chat(run_or_model: str, *, device: str = "auto", max_new_tokens: int = 256, compile: bool = False,
              **sampling: Any) -> Chat:
    """A new conversation with an instruction run or a model spec (see `load_chat_model`)."""
    check_answer_settings(max_new_tokens, batch_size=1)
    model, tokenizer, style = load_chat_model(run_or_model, device, compile)
    return Chat(model, tokenizer, style, max_new_tokens, sampling)
