import json
import logging

import pytest
import torch

from llmft.data.instruction import (
    InstructionDataset,
    collate_instruction,
    load_instruction_data,
    split_instruction_data,
)
from llmft.errors import LlmftError
from llmft.prompts import format_input
from llmft.tokenizers import GPT2Tokenizer

from tests.helpers import DATA  # $LLMFT_DATA_DIR or ../shared/data
PAD = 50256


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFT_DATA_DIR", str(DATA))
        return GPT2Tokenizer.default()


@pytest.fixture(scope="module")
def book_data():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFT_DATA_DIR", str(DATA))
        return load_instruction_data("instruction-data")


# -- the book's collate example -------------------------------------------------------------

BOOK_BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]


def test_collate_matches_book_example():
    batch = collate_instruction(BOOK_BATCH, pad_token_id=PAD)
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]))
    assert torch.equal(batch["targets"], torch.tensor(
        [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]))


def test_collate_keeps_end_of_text_ids_inside_the_text_scored():
    """A chat template's end-of-turn tokens equal the pad id: the answer's end is still a target
    (the book's masking by value would keep only the first, inside the prompt)."""
    batch = collate_instruction([[0, PAD, 1, PAD, 2], [3]], pad_token_id=PAD)
    assert torch.equal(batch["targets"], torch.tensor([[PAD, 1, PAD, 2, PAD], [PAD, -100, -100, -100, -100]]))


def test_collate_truncates_to_allowed_max_length():
    batch = collate_instruction(BOOK_BATCH, pad_token_id=PAD, allowed_max_length=3)
    assert torch.equal(batch["input_ids"], torch.tensor([[0, 1, 2], [5, 6, PAD], [7, 8, 9]]))
    assert torch.equal(batch["targets"], torch.tensor([[1, 2, 3], [6, PAD, -100], [8, 9, PAD]]))


def test_collate_mask_prompt_ignores_prompt_targets():
    items = [{"input_ids": [0, 1, 2, 3, 4], "prompt_len": 3},
             {"input_ids": [5, 6], "prompt_len": 1},
             {"input_ids": [7, 8, 9], "prompt_len": 2}]
    batch = collate_instruction(items, pad_token_id=PAD, ignore_index=-1, mask_prompt=True)
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]))
    # positions < prompt_len - 1 predict prompt tokens: ignored (exercise 7.2)
    assert torch.equal(batch["targets"], torch.tensor(
        [[-1, -1, 3, 4, PAD], [6, PAD, -1, -1, -1], [-1, 9, PAD, -1, -1]]))


def test_collate_mask_prompt_needs_prompt_lengths():
    with pytest.raises(ValueError, match="prompt_len"):
        collate_instruction(BOOK_BATCH, pad_token_id=PAD, mask_prompt=True)


# -- loading ----------------------------------------------------------------------------------

def test_load_book_data(book_data):
    assert len(book_data) == 1100
    assert book_data[50] == {"instruction": "Identify the correct spelling of the following word.",
                             "input": "Ocassion", "output": "The correct spelling is 'Occasion.'"}


def test_load_json_and_jsonl_with_renamed_keys(tmp_path):
    rows = [{"q": "Say hi", "a": "hi", "id": 1}, {"q": "Add 1+1", "a": "2", "id": 2}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("d.json", "d.jsonl"):
        entries = load_instruction_data(tmp_path / name, instruction_key="q", input_key=None,
                                        output_key="a")
        assert [(e["instruction"], e["input"], e["output"], e["id"]) for e in entries] == [
            ("Say hi", "", "hi", 1), ("Add 1+1", "", "2", 2)]


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", '[{"instruction": "a",\n  "input": "", "output": }]',
     r"bad.json: invalid JSON at line 2, column 26"),
    ("bad.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": x}\n',
     r"bad.jsonl: invalid JSON at line 2, column 17"),
    ("missing.json", '[{"instruction": "a", "input": "", "output": "b"}, {"input": "a", "output": "b"}]',
     r"missing.json: entry 1: missing key 'instruction'"),
    ("type.json", '[{"instruction": "a", "input": 3, "output": "b"}]',
     r"type.json: entry 0: key 'input' must be a string, got int"),
    ("empty.jsonl", '\n{"instruction": "a", "input": "", "output": "  "}\n',
     r"empty.jsonl: entry 0 \(line 2\): empty 'output'"),
    ("notobj.json", '[["a", "b"]]', r"notobj.json: entry 0: expected an object, got list"),
])
def test_load_errors_name_the_place(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LlmftError, match=message) as e:
        load_instruction_data(tmp_path / name)
    assert "\n" not in str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(LlmftError, match="file not found"):
        load_instruction_data(tmp_path / "nope.json")


# -- splitting --------------------------------------------------------------------------------

def test_split_reproduces_book_without_shuffle(book_data):
    train, val, test = split_instruction_data(book_data, shuffle=False)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train == book_data[:935] and test == book_data[935:1045] and val == book_data[1045:]


def test_split_shuffle_is_seeded(book_data):
    a = split_instruction_data(book_data, seed=1)
    b = split_instruction_data(book_data, seed=1)
    c = split_instruction_data(book_data, seed=2)
    assert a == b and a != c
    assert [len(part) for part in a] == [935, 55, 110]
    assert sorted(map(json.dumps, sum(a, []))) == sorted(map(json.dumps, book_data))


def test_split_rejects_bad_fractions():
    with pytest.raises(LlmftError, match="summing to 1"):
        split_instruction_data([{}] * 10, fractions=(0.8, 0.3, 0.1))


# -- tokenizing real entries ------------------------------------------------------------------

def test_alpaca_prompt_token_ids(tokenizer):
    assert tokenizer.encode("Below is an instruction that describes a task.") == [
        21106, 318, 281, 12064, 326, 8477, 257, 4876, 13]


def test_dataset_matches_book_tokenization(tokenizer, book_data):
    entries = book_data[:3]
    ds = InstructionDataset(entries, tokenizer)
    for i, entry in enumerate(entries):
        book_text = format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        assert ds[i]["input_ids"] == tokenizer.encode(book_text)
        prompt_ids = tokenizer.encode(format_input(entry) + "\n\n### Response:\n")
        assert ds[i]["prompt_len"] == len(prompt_ids)
        assert ds[i]["input_ids"][:len(prompt_ids)] == prompt_ids
    assert ds[0]["input_ids"][:9] == [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13]

    batch = collate_instruction([ds[i] for i in range(3)], pad_token_id=PAD, mask_prompt=True)
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    width = max(lengths) + 1 - 1
    assert batch["input_ids"].shape == batch["targets"].shape == (3, width)
    for row, (n, p) in enumerate(zip(lengths, ds.prompt_lengths)):
        ids = ds[row]["input_ids"]
        assert batch["input_ids"][row].tolist() == ids + [PAD] * (width - n)
        expected = [-100] * (p - 1) + ids[p:] + [PAD] + [-100] * (width - n)
        assert batch["targets"][row].tolist() == expected


def test_dataset_counts_long_examples_and_warns_once(tokenizer, book_data, caplog):
    entries = book_data[:20]
    full = InstructionDataset(entries, tokenizer)
    limit = sorted(len(ids) for ids in full.encoded_texts)[15]
    n_long = sum(len(ids) > limit for ids in full.encoded_texts)
    with caplog.at_level(logging.WARNING, logger="llmft.data.instruction"):
        ds = InstructionDataset(entries, tokenizer, allowed_max_length=limit)
    assert ds.n_truncated == n_long > 0
    assert ds.encoded_texts == full.encoded_texts  # cut once, in the collate
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{n_long} of 20" in warnings[0].getMessage()


def test_an_over_long_example_is_cut_after_its_end_of_text_like_the_book(tokenizer, book_data):
    """The book's collate appends end-of-text, then cuts to allowed_max_length: the cut example's
    last target is its next real token, not an end-of-text it would learn to emit at the cut."""
    entries = book_data[:2]
    lengths = [len(ids) for ids in InstructionDataset(entries, tokenizer).encoded_texts]
    limit = max(lengths) - 5
    ds = InstructionDataset(entries, tokenizer, allowed_max_length=limit)
    batch = collate_instruction([ds[0], ds[1]], pad_token_id=PAD, allowed_max_length=limit, mask_prompt=True)
    long_row = lengths.index(max(lengths))
    ids = ds.encoded_texts[long_row]
    assert batch["input_ids"][long_row].tolist() == ids[:limit]
    prompt = ds.prompt_lengths[long_row]
    assert batch["targets"][long_row].tolist() == [-100] * (prompt - 1) + ids[prompt:limit + 1]
    assert PAD not in batch["targets"][long_row].tolist()


def test_dataset_with_chatml_style(tokenizer, book_data):
    ds = InstructionDataset(book_data[:1], tokenizer, prompt_style="chatml")
    text = tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("<|im_start|>user\n" + book_data[0]["instruction"] + "\n\n")
    assert text.endswith(book_data[0]["output"] + "<|im_end|>")
    assert tokenizer.decode(ds[0]["input_ids"][:ds[0]["prompt_len"]]).endswith(
        "<|im_start|>assistant\n")
