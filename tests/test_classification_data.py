from collections import Counter

import pytest
import torch

from llmft.data.classification import (
    ClassificationDataset, Splits, balance, collate_classification, label_names, split,
)
from llmft.data.sources import read_labelled_texts, resolve_data
from llmft.errors import LlmftError
from tests.helpers import SMS


def test_sms_reads_every_line_without_csv_quoting():
    pairs = read_labelled_texts(SMS)
    assert len(pairs) == 5574
    assert Counter(label for _, label in pairs) == {"ham": 4827, "spam": 747}
    assert any('"' in text for text, _ in pairs)  # quotes kept, rows not merged


def test_named_dataset_resolves_to_local_copy():
    assert resolve_data("sms-spam").read_bytes() == SMS.read_bytes()


def test_book_sizes_after_balancing():
    splits = split(balance(read_labelled_texts(SMS), seed=123), (0.7, 0.1), seed=123)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1045, 149, 300)
    assert Counter(label for _, label in balance(read_labelled_texts(SMS), 123)) == {"ham": 747, "spam": 747}
    again = split(balance(read_labelled_texts(SMS), seed=123), (0.7, 0.1), seed=123)
    assert again.test == splits.test  # seeded


def test_exact_batch_tensors(gpt2_tokenizer):
    examples = [("Hi there", "ham"), ("WIN a prize now", "spam"), ("ok", "ham")]
    ds = ClassificationDataset(examples, gpt2_tokenizer, ["ham", "spam"], max_length=3)
    assert ds.token_ids == [[17250, 612], [37620, 257, 11596], [482]]  # truncated to 3
    batch = collate_classification([ds[0], ds[1], ds[2]], pad_id=50256)
    assert torch.equal(batch["input_ids"], torch.tensor(
        [[17250, 612, 50256], [37620, 257, 11596], [482, 50256, 50256]]))
    assert batch["lengths"].tolist() == [2, 3, 1]
    assert batch["labels"].tolist() == [0, 1, 0]
    fixed = collate_classification([ds[0]], pad_id=50256, pad_to=5)
    assert fixed["input_ids"].tolist() == [[17250, 612, 50256, 50256, 50256]]


@pytest.mark.parametrize("content, suffix, message", [
    ("text,label\nhello,\n", ".csv", "line 2: empty label"),
    ("msg,label\nhello,ham\n", ".csv", "missing column"),
    ('{"text": "a"}\n', ".jsonl", "entry 0 \\(line 1\\): expected an object with keys"),
    ("ham\t \n", ".tsv", "line 1: empty text"),
    ("no tab here\n", ".txt", "line 1: expected 'label<TAB>text'"),
])
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(LlmftError, match=message):
        read_labelled_texts(path)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"ham\tfine\nspam\t\xff\xfe broken\n")
    with pytest.raises(LlmftError, match="line 2: not valid UTF-8"):
        read_labelled_texts(path)


def test_custom_columns_and_many_classes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('body,topic\n"a, b",x\nc,y\nd,z\n')
    pairs = read_labelled_texts(path, "body", "topic")
    assert pairs == [("a, b", "x"), ("c", "y"), ("d", "z")]


def test_label_checks():
    with pytest.raises(LlmftError, match="only one class"):
        label_names(Splits([("a", "x")], [], []))
    with pytest.raises(LlmftError, match="test data has label.*'z'.*never seen"):
        label_names(Splits([("a", "x"), ("b", "y")], [], [("c", "z")]))
