"""Prompt styles: how an instruction entry becomes the text a model is trained on and prompted with.

An entry is a dict with ``instruction``, ``input`` (may be empty) and ``output``. A style splits
the training text in two, so that generation can be prompted with exactly the first part:

- ``format(entry)``: the prompt, up to and including the response header;
- ``response_text(entry)``: what follows it in training (the output, plus the style's end marker).

``extract_response`` undoes this on generated text, and ``stop_strings`` are the markers at which
generation stops. ``alpaca`` and ``phi3`` are the formats of the book (chapter 7 and exercise
7.1); ``chatml`` and ``chat-template`` serve chat models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmft.errors import LlmftError

Entry = Mapping[str, Any]


def format_input(entry: Entry) -> str:
    """The book's `format_input`: the Alpaca instruction (and input, when there is one), without
    the response header. The judge prompt quotes exactly this text."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def user_message(entry: Entry, separator: str = "\n\n") -> str:
    """The instruction, followed by the input when there is one: a chat model's user turn."""
    return entry["instruction"] + (separator + entry["input"] if entry.get("input") else "")


class PromptStyle:
    """Base class. Subclasses set `name`, `response_header`, `stop_strings` and `format`."""

    name: ClassVar[str]
    # What precedes the answer; stripped when a generation repeats it (the book's
    # `.replace("### Response:", "")`).
    response_header: str = ""
    stop_strings: tuple[str, ...] = ()

    def format(self, entry: Entry) -> str:
        raise NotImplementedError

    def response_text(self, entry: Entry) -> str:
        return entry["output"]

    def extract_response(self, generated_text: str, prompt: str | None = None) -> str:
        """The answer in `generated_text`: without the prompt (when the text starts with it) and a
        leading response header, cut at the first stop string, stripped of whitespace."""
        text = generated_text
        if prompt and text.startswith(prompt):
            text = text[len(prompt):]
        header = self.response_header.strip()
        if header and text.lstrip().startswith(header):
            text = text.lstrip()[len(header):]
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """End-of-text plus every stop string that is a single token (a chat model's
        end-of-turn), for `generate(..., eos_id=...)`: stopping on ids needs no decoding."""
        ids = [tokenizer.eos_id]
        for stop in self.stop_strings:
            encoded = tokenizer.encode(stop)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids


class Alpaca(PromptStyle):
    """The book's format (Taori et al., 2023): instruction, optional input, response header."""

    name = "alpaca"
    response_header = "\n\n### Response:\n"
    stop_strings = ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:")

    def format(self, entry: Entry) -> str:
        return format_input(entry) + self.response_header


class Phi3(PromptStyle):
    """The book's exercise 7.1: Phi-3's user/assistant markers as plain text."""

    name = "phi3"
    response_header = "\n<|assistant|>:\n"
    stop_strings = ("<|user|>",)

    def format(self, entry: Entry) -> str:
        return "<|user|>\n" + user_message(entry, separator="\n") + self.response_header


class ChatML(PromptStyle):
    """OpenAI's ChatML turns; the answer ends with `<|im_end|>`, which stops generation."""

    name = "chatml"
    response_header = "<|im_start|>assistant\n"
    end_of_turn = "<|im_end|>"
    stop_strings = ("<|im_end|>", "<|im_start|>")

    def format(self, entry: Entry) -> str:
        return f"<|im_start|>user\n{user_message(entry)}{self.end_of_turn}\n" + self.response_header

    def response_text(self, entry: Entry) -> str:
        return entry["output"] + self.end_of_turn


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate(PromptStyle):
    """The tokenizer's own Jinja chat template (Hugging Face's `tokenizer_config.json`),
    rendered in a sandbox the way `transformers`' `apply_chat_template` does.

    The end-of-turn marker is read off the template itself: the text it puts after an assistant
    answer (e.g. ``<|im_end|>\\n``) becomes the end of `response_text` and the stop string.
    """

    name = "chat-template"
    _SENTINEL = "\x00llmft-response\x00"

    def __init__(self, tokenizer: Any) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise LlmftError("prompt style 'chat-template': the tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise LlmftError(f"chat template does not parse: {e}") from None
        self._special = {"bos_token": getattr(tokenizer, "bos_token", None) or "",
                         "eos_token": getattr(tokenizer, "eos_token", None) or ""}
        probe = {"instruction": "?", "input": "", "output": self._SENTINEL}
        after_answer = self._render_answer(probe).rsplit(self._SENTINEL, 1)[-1]
        self.end_of_turn = after_answer.strip() or self._special["eos_token"]
        self.stop_strings = (self.end_of_turn,) if self.end_of_turn else ()

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateError as e:
            raise LlmftError(f"chat template fails to render: {e}") from None

    def _render_answer(self, entry: Entry) -> str:
        messages = [{"role": "user", "content": user_message(entry)},
                    {"role": "assistant", "content": entry["output"]}]
        return self._render(messages, add_generation_prompt=False)

    def format(self, entry: Entry) -> str:
        return self._render([{"role": "user", "content": user_message(entry)}],
                            add_generation_prompt=True)

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a whole conversation ({"role", "content"} messages), up to the
        assistant's next turn."""
        return self._render(messages, add_generation_prompt=True)

    def response_text(self, entry: Entry) -> str:
        # Whatever the template writes after the prompt for this answer, so training text and
        # prompt agree token for token; templates that rewrite the history (rare) fall back to
        # output + end-of-turn.
        prompt, full = self.format(entry), self._render_answer(entry)
        if full.startswith(prompt) and entry["output"] in full[len(prompt):]:
            return full[len(prompt):].rstrip("\n")
        return entry["output"] + self.end_of_turn


PROMPT_STYLES: dict[str, type[PromptStyle]] = {
    cls.name: cls for cls in (Alpaca, Phi3, ChatML, ChatTemplate)
}


def get_prompt_style(name: str, tokenizer: Any = None) -> PromptStyle:
    """The style called `name`; `chat-template` reads its template from `tokenizer`."""
    if name not in PROMPT_STYLES:
        raise LlmftError(f"unknown prompt style {name!r}; expected one of {', '.join(PROMPT_STYLES)}")
    if name == ChatTemplate.name:
        return ChatTemplate(tokenizer)
    return PROMPT_STYLES[name]()


def default_prompt_style(tokenizer: Any) -> PromptStyle:
    """The tokenizer's chat template when it has one (instruct checkpoints), else Alpaca."""
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate(tokenizer)
    return Alpaca()
