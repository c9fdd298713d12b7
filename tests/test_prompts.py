from types import SimpleNamespace

import pytest

from llmft.errors import LlmftError
from llmft.prompts import (
    PROMPT_STYLES,
    Alpaca,
    ChatTemplate,
    default_prompt_style,
    format_input,
    get_prompt_style,
)

WITH_INPUT = {"instruction": "Convert to passive voice.", "input": "The cat chased the mouse.",
              "output": "The mouse was chased by the cat."}
NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}

# SmolLM2-Instruct's template (ChatML with a default system turn), as in its tokenizer_config.json.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# Llama-3 style: special tokens from the tokenizer, an end-of-turn without newline.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chat_tokenizer(template, bos="<|begin_of_text|>", eos="<|im_end|>"):
    return SimpleNamespace(chat_template=template, bos_token=bos, eos_token=eos)


def test_alpaca_is_the_book_text():
    assert format_input(WITH_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nConvert to passive voice."
        "\n\n### Input:\nThe cat chased the mouse.")
    style = get_prompt_style("alpaca")
    assert style.format(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a primary color.\n\n### Response:\n")
    assert style.format(WITH_INPUT) + style.response_text(WITH_INPUT) == (
        format_input(WITH_INPUT) + f"\n\n### Response:\n{WITH_INPUT['output']}")


def test_phi3_is_exercise_7_1():
    style = get_prompt_style("phi3")
    assert style.format(WITH_INPUT) == (
        "<|user|>\nConvert to passive voice.\nThe cat chased the mouse.\n<|assistant|>:\n")
    assert style.format(NO_INPUT) == "<|user|>\nName a primary color.\n<|assistant|>:\n"
    assert style.response_text(NO_INPUT) == "Red."


def test_chatml():
    style = get_prompt_style("chatml")
    assert style.format(WITH_INPUT) == (
        "<|im_start|>user\nConvert to passive voice.\n\nThe cat chased the mouse.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert style.response_text(NO_INPUT) == "Red.<|im_end|>"
    assert "<|im_end|>" in style.stop_strings


def test_chat_template_renders_like_transformers():
    tok = chat_tokenizer(SMOLLM2_TEMPLATE)
    style = get_prompt_style("chat-template", tok)
    prompt = style.format(WITH_INPUT)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nConvert to passive voice.\n\nThe cat chased the mouse."
        "<|im_end|>\n<|im_start|>assistant\n")
    assert style.response_text(WITH_INPUT) == "The mouse was chased by the cat.<|im_end|>"
    assert style.stop_strings == ("<|im_end|>",)

    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")),
        chat_template=SMOLLM2_TEMPLATE)
    messages = [{"role": "user", "content": "Convert to passive voice.\n\nThe cat chased the mouse."}]
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_uses_special_tokens_and_finds_end_of_turn():
    style = get_prompt_style("chat-template", chat_tokenizer(LLAMA3_TEMPLATE, eos="<|eot_id|>"))
    assert style.format(NO_INPUT) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a primary color.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert style.response_text(NO_INPUT) == "Red.<|eot_id|>"
    assert style.stop_strings == ("<|eot_id|>",)


def test_chat_template_errors():
    with pytest.raises(LlmftError, match="no chat template"):
        get_prompt_style("chat-template", chat_tokenizer(None))
    with pytest.raises(LlmftError, match="does not parse"):
        get_prompt_style("chat-template", chat_tokenizer("{% for %}"))
    bad = "{{ raise_exception('only system and user roles') }}"
    with pytest.raises(LlmftError, match="fails to render: only system and user roles"):
        get_prompt_style("chat-template", chat_tokenizer(bad))
    sneaky = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(LlmftError, match="fails to render"):
        get_prompt_style("chat-template", chat_tokenizer(sneaky))


def test_registry_and_default():
    assert set(PROMPT_STYLES) == {"alpaca", "phi3", "chatml", "chat-template"}
    with pytest.raises(LlmftError, match="unknown prompt style 'vicuna'; expected one of alpaca, phi3"):
        get_prompt_style("vicuna")
    assert isinstance(default_prompt_style(chat_tokenizer(None)), Alpaca)
    assert isinstance(default_prompt_style(chat_tokenizer(SMOLLM2_TEMPLATE)), ChatTemplate)


@pytest.mark.parametrize("name,generated,expected", [
    # the book: the model repeats the header, which is stripped
    ("alpaca", "\n\n### Response:\nThe mouse was chased.<|endoftext|>", "The mouse was chased.<|endoftext|>"),
    ("alpaca", " The mouse was chased. \n\n### Instruction:\nMore", "The mouse was chased."),
    ("phi3", "<|assistant|>:\nRed.<|user|>\nnext", "Red."),
    ("chatml", "Red.<|im_end|>\n<|im_start|>user", "Red."),
])
def test_extract_response(name, generated, expected):
    assert get_prompt_style(name).extract_response(generated) == expected


def test_extract_response_strips_the_prompt():
    style = get_prompt_style("alpaca")
    prompt = format_input(NO_INPUT)  # the book prompts without the header; the model writes it
    generated = prompt + "\n\n### Response:\nRed.\n\n### Instruction:\nName another."
    assert style.extract_response(generated, prompt=prompt) == "Red."
    assert style.extract_response(style.format(NO_INPUT) + " Red. ", prompt=style.format(NO_INPUT)) == "Red."


def test_stop_token_ids():
    class Tok:
        eos_id = 0

        def encode(self, text):
            return [7] if text == "<|im_end|>" else [1, 2, 3]

    assert get_prompt_style("chatml").stop_token_ids(Tok()) == [0, 7]
    assert get_prompt_style("alpaca").stop_token_ids(Tok()) == [0]
