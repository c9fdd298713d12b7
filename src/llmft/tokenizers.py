"""Tokenizers behind one small interface.

Every tokenizer can `encode`/`decode`, names its end-of-text id (also used for padding, as in
the book) and can `save` itself into a run directory so `predict`/`generate` reload exactly the
same vocabulary without the network. `load_tokenizer(folder)` reads such a folder back.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Protocol

import tiktoken
import tokenizers
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from llmft.errors import LlmftError
from llmft.download import download
from llmft.paths import find_local

GPT2_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"

TOKENIZER_SPEC = "tokenizer_spec.json"


class Tokenizer(Protocol):
    kind: str
    eos_id: int
    vocab_size: int
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: Path) -> None: ...


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken, built from `encoder.json` + `vocab.bpe`
    (HF checkpoints call the same files `vocab.json` + `merges.txt`)."""

    kind = "gpt2-bpe"
    chat_template = None
    FILES = ("encoder.json", "vocab.bpe")

    def __init__(self, encoder_json: Path, vocab_bpe: Path) -> None:
        self.files = (Path(encoder_json), Path(vocab_bpe))
        for f in self.files:
            if not f.is_file():
                raise LlmftError(f"{f}: GPT-2 tokenizer file not found")
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise LlmftError(f"{vocab_bpe}: not a GPT-2 BPE vocabulary ({e})") from None
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": len(ranks)},
        )
        self.eos_id = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab

    @classmethod
    def from_folder(cls, folder: Path) -> GPT2Tokenizer:
        for names in (cls.FILES, ("vocab.json", "merges.txt")):
            if all((folder / n).is_file() for n in names):
                return cls(folder / names[0], folder / names[1])
        raise LlmftError(f"{folder}: no GPT-2 tokenizer files (encoder.json + vocab.bpe)")

    @classmethod
    @functools.cache
    def default(cls) -> GPT2Tokenizer:
        """The local copy of OpenAI's files if one exists, else a cached download of them.
        Built once per process (the BPE ranks take ~0.4 s); tokenizers are never mutated."""
        files = [find_local(f"gpt2-tokenizer/{n}") or download(GPT2_BPE_URL + n, f"gpt2-tokenizer/{n}")
                 for n in cls.FILES]
        return cls(*files)


    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for src, name in zip(self.files, self.FILES):
            shutil.copyfile(src, folder / name)
        (folder / TOKENIZER_SPEC).write_text(json.dumps({"kind": self.kind}))


class HFTokenizer:
    """A `tokenizers` (Hugging Face) tokenizer: what `tokenizer.json` holds, plus the special
    tokens and chat template that live beside it in `tokenizer_config.json`.

    Raw text is encoded without added special tokens; prompt styles and chat templates add
    them explicitly, so what is trained on is exactly what is written. The one exception is
    `add_bos` (``add_bos_token``, Gemma's vocabularies): every text then starts with the BOS
    token, added unless the text itself begins with it (a chat template that writes it).
    """

    kind = "hf"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str, bos_token: str | None = None,
                 chat_template: str | None = None, add_bos: bool = False) -> None:
        self._tok = tokenizer
        self.eos_token, self.bos_token, self.chat_template = eos_token, bos_token, chat_template
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise LlmftError(f"tokenizer: end-of-text token {eos_token!r} is not in the vocabulary")
        self.eos_id = eos_id
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: Path) -> HFTokenizer:
        """Read `tokenizer.json` and, when present, our spec or HF's `tokenizer_config.json`."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LlmftError(f"{folder}: no tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise LlmftError(f"{path}: unreadable tokenizer ({e})") from None
        meta: dict = {}
        for name in (TOKENIZER_SPEC, "tokenizer_config.json"):
            if (folder / name).is_file():
                meta = json.loads((folder / name).read_text(encoding="utf-8"))
                break

        def token(key: str) -> str | None:
            value = meta.get(key)
            return value.get("content") if isinstance(value, dict) else value

        eos = token("eos_token")
        if eos is None:
            raise LlmftError(f"{folder}: no eos_token in tokenizer_config.json")
        return cls(tok, eos, token("bos_token"), meta.get("chat_template"), bool(meta.get("add_bos_token")))

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and ids[:1] != [self.bos_id] else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        spec = {"kind": self.kind, "eos_token": self.eos_token, "bos_token": self.bos_token,
                "chat_template": self.chat_template, "add_bos_token": self.add_bos}
        (folder / TOKENIZER_SPEC).write_text(json.dumps(spec, indent=2), encoding="utf-8")


TOKENIZER_KINDS: dict[str, type] = {GPT2Tokenizer.kind: GPT2Tokenizer, HFTokenizer.kind: HFTokenizer}


def load_tokenizer(folder: Path) -> Tokenizer:
    """Reload a tokenizer saved with `save` (its spec file names the kind)."""
    spec_file = folder / TOKENIZER_SPEC
    try:
        kind = json.loads(spec_file.read_text())["kind"]
    except (OSError, ValueError, KeyError):
        raise LlmftError(f"{spec_file}: missing or unreadable tokenizer spec") from None
    if kind not in TOKENIZER_KINDS:
        raise LlmftError(f"{spec_file}: unknown tokenizer kind {kind!r}")
    return TOKENIZER_KINDS[kind].from_folder(folder)
