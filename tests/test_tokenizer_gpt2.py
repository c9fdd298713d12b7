import pytest

from llmft.errors import LlmftError
from llmft.tokenizers import GPT2Tokenizer, load_tokenizer


def test_book_ids(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode("Below is an instruction that describes a task.")
    assert ids == [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13]
    assert gpt2_tokenizer.eos_id == 50256
    assert gpt2_tokenizer.encode("<|endoftext|>") == [50256]
    assert gpt2_tokenizer.decode(ids) == "Below is an instruction that describes a task."


def test_save_and_reload(gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "Hello, world! Ünïcödé 🙂  spaces\n"
    assert again.encode(text) == gpt2_tokenizer.encode(text)


def test_hf_file_names(gpt2_tokenizer, tmp_path):
    from tests.helpers import GPT2_BPE

    (tmp_path / "vocab.json").write_bytes((GPT2_BPE / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((GPT2_BPE / "vocab.bpe").read_bytes())
    assert GPT2Tokenizer.from_folder(tmp_path).encode("a test") == gpt2_tokenizer.encode("a test")


def test_missing_files(tmp_path):
    with pytest.raises(LlmftError, match="no GPT-2 tokenizer files"):
        GPT2Tokenizer.from_folder(tmp_path)
