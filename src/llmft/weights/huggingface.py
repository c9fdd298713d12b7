"""Hugging Face checkpoints (config.json + safetensors) to and from our models.

Each supported HF architecture is described once, by a `Layout`: which HF module holds which
of our modules. Loading and exporting walk the same table in opposite directions, so a name
can never be right one way and wrong the other. GPT-2 needs two extra facts: HF stores its
linear layers as `Conv1D` (weight shape (in, out), the transpose of `nn.Linear`) and fuses
query/key/value into one `c_attn`; a rule with several of our modules is such a fusion
(concatenated along the output dimension).

Only safetensors are read: a pickle checkpoint (`pytorch_model.bin`) can run arbitrary code
when unpickled, so it is refused rather than `torch.load`ed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmft.errors import LlmftError, one_line
from llmft.models import DecoderLM, ModelConfig, RopeScaling, parameter_shapes
from llmft.paths import replaced_atomically
from llmft.rundir import atomic_write_json, read_json

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_CHECKPOINTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# -- the name tables -------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """Our module(s) <-> one HF module; ``{i}`` stands for the block index.

    Several of our modules mean HF concatenates them along the output dimension (GPT-2's
    ``c_attn``). ``conv1d``: HF stores the weight transposed, shape (in, out).
    ``top_level``: the HF module sits outside the base-model prefix (``lm_head``).
    """

    ours: tuple[str, ...]
    hf: str
    conv1d: bool = False
    top_level: bool = False


@dataclass(frozen=True)
class Layout:
    prefix: str  # the base model inside the *ForCausalLM / *LMHeadModel wrapper
    rules: tuple[Rule, ...]
    ignored: re.Pattern[str]  # stored buffers that are not parameters (e.g. GPT-2's causal mask)

    def expand(self, n_layers: int) -> Iterator[Rule]:
        """Concrete rules with the block index filled in and the full HF name."""
        for rule in self.rules:
            for i in range(n_layers) if "{i}" in rule.hf else [None]:
                hf = rule.hf.format(i=i)
                yield Rule(tuple(m.format(i=i) for m in rule.ours),
                           hf if rule.top_level else self.prefix + hf, rule.conv1d, rule.top_level)


OUT_HEAD = Rule(("out_head",), "lm_head", top_level=True)

GPT2_LAYOUT = Layout("transformer.", (
    Rule(("tok_emb",), "wte"),
    Rule(("pos_emb",), "wpe"),
    Rule(("blocks.{i}.norm1",), "h.{i}.ln_1"),
    Rule(("blocks.{i}.attn.query", "blocks.{i}.attn.key", "blocks.{i}.attn.value"),
         "h.{i}.attn.c_attn", conv1d=True),
    Rule(("blocks.{i}.attn.proj",), "h.{i}.attn.c_proj", conv1d=True),
    Rule(("blocks.{i}.norm2",), "h.{i}.ln_2"),
    Rule(("blocks.{i}.mlp.fc",), "h.{i}.mlp.c_fc", conv1d=True),
    Rule(("blocks.{i}.mlp.proj",), "h.{i}.mlp.c_proj", conv1d=True),
    Rule(("final_norm",), "ln_f"),
    OUT_HEAD,
), ignored=re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"))

# Llama's embedding, input norm, projections and final norm; Gemma 3 names them the same.
LLAMA_SHARED = (
    Rule(("tok_emb",), "embed_tokens"),
    Rule(("blocks.{i}.norm1",), "layers.{i}.input_layernorm"),
    Rule(("blocks.{i}.attn.query",), "layers.{i}.self_attn.q_proj"),
    Rule(("blocks.{i}.attn.key",), "layers.{i}.self_attn.k_proj"),
    Rule(("blocks.{i}.attn.value",), "layers.{i}.self_attn.v_proj"),
    Rule(("blocks.{i}.attn.proj",), "layers.{i}.self_attn.o_proj"),
    Rule(("blocks.{i}.mlp.gate",), "layers.{i}.mlp.gate_proj"),
    Rule(("blocks.{i}.mlp.up",), "layers.{i}.mlp.up_proj"),
    Rule(("blocks.{i}.mlp.down",), "layers.{i}.mlp.down_proj"),
    Rule(("final_norm",), "norm"),
    OUT_HEAD,
)
ROTARY_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

LLAMA_LAYOUT = Layout("model.", (
    *LLAMA_SHARED,
    Rule(("blocks.{i}.norm2",), "layers.{i}.post_attention_layernorm"),
), ignored=ROTARY_BUFFERS)

GEMMA3_LAYOUT = Layout("model.", (
    *LLAMA_SHARED,
    Rule(("blocks.{i}.attn.q_norm",), "layers.{i}.self_attn.q_norm"),
    Rule(("blocks.{i}.attn.k_norm",), "layers.{i}.self_attn.k_norm"),
    # Llama's name for the norm before the MLP is, in Gemma, the one after attention.
    Rule(("blocks.{i}.post_attn_norm",), "layers.{i}.post_attention_layernorm"),
    Rule(("blocks.{i}.norm2",), "layers.{i}.pre_feedforward_layernorm"),
    Rule(("blocks.{i}.post_mlp_norm",), "layers.{i}.post_feedforward_layernorm"),
), ignored=ROTARY_BUFFERS)

LAYOUTS: dict[str, Layout] = {"gpt2": GPT2_LAYOUT, "llama": LLAMA_LAYOUT, "gemma3": GEMMA3_LAYOUT}
SUFFIXES = ("weight", "bias")


def _layout(cfg: ModelConfig) -> Layout:
    try:
        return LAYOUTS[cfg.architecture]
    except KeyError:
        raise LlmftError(f"model {cfg.name!r}: no Hugging Face layout for architecture "
                         f"{cfg.architecture!r}") from None


def _skip(rule: Rule, cfg: ModelConfig) -> bool:
    """A tied output head is the embedding: HF omits it (or keeps a copy nobody reads)."""
    return cfg.tie_embeddings and rule.ours == OUT_HEAD.ours


# -- config.json -----------------------------------------------------------------------------

class _Fields:
    """Read an HF config dict; every complaint names the file and the field."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def need(self, *keys: str) -> Any:
        for key in keys:
            if self.hf.get(key) is not None:
                return self.hf[key]
        raise LlmftError(f"{self.source}: missing field {' or '.join(keys)}")

    def get(self, key: str, default: Any) -> Any:
        value = self.hf.get(key)
        return default if value is None else value

    def expect(self, key: str, default: Any, allowed: tuple[Any, ...]) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise LlmftError(f"{self.source}: {key}={value!r} is not supported; "
                             f"expected {' or '.join(map(repr, allowed))}")
        return value

    def fail(self, key: str, why: str) -> LlmftError:
        return LlmftError(f"{self.source}: {key}={self.hf.get(key)!r} {why}")


def _gpt2_config(f: _Fields, name: str) -> ModelConfig:
    f.expect("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"))
    f.expect("scale_attn_by_inverse_layer_idx", False, (False,))
    emb_dim = f.need("n_embd")
    return ModelConfig(
        name=name, architecture="gpt2", vocab_size=f.need("vocab_size"),
        context_length=f.need("n_positions", "n_ctx"), emb_dim=emb_dim,
        n_layers=f.need("n_layer"), n_heads=f.need("n_head"),
        hidden_dim=f.get("n_inner", 4 * emb_dim), qkv_bias=True, bias=True,
        norm_eps=f.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=f.get("tie_word_embeddings", True),
    )


def _rope(f: _Fields) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, from the classic keys or transformers 5's `rope_parameters`."""
    params = f.get("rope_parameters", {})
    theta = f.get("rope_theta", params.get("rope_theta", 10000.0))
    key = "rope_scaling" if f.hf.get("rope_scaling") is not None else "rope_parameters"
    scaling = f.get(key, {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise f.fail(key, "is not supported; expected rope_type 'llama3' or none")
    try:
        return theta, RopeScaling(
            factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_context_length=scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise LlmftError(f"{f.source}: {key} lacks {e.args[0]!r}") from None


def _llama_config(f: _Fields, name: str) -> ModelConfig:
    """Llama, Mistral and Qwen2 share one decoder; they differ in biases and sliding windows."""
    model_type = f.hf["model_type"]
    f.expect("hidden_act", "silu", ("silu",))
    if model_type == "qwen2":
        qkv_bias, bias = True, False
        window = f.get("sliding_window", None) if f.get("use_sliding_window", False) else None
    elif model_type == "mistral":
        qkv_bias = bias = False
        window = f.get("sliding_window", None)
    else:
        qkv_bias = bias = f.get("attention_bias", False)
        if f.get("mlp_bias", False) != bias:
            raise f.fail("mlp_bias", f"differs from attention_bias={bias!r}; both must agree")
        window = None
    # A window at least as long as the context is no window: cap the context at it.
    context_length = f.need("max_position_embeddings")
    if window:
        context_length = min(context_length, window)
    n_heads = f.need("num_attention_heads")
    theta, scaling = _rope(f)
    return ModelConfig(
        name=name, architecture="llama", vocab_size=f.need("vocab_size"),
        context_length=context_length, emb_dim=f.need("hidden_size"),
        n_layers=f.need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=f.get("num_key_value_heads", n_heads), hidden_dim=f.need("intermediate_size"),
        head_dim=f.get("head_dim", 0), qkv_bias=qkv_bias, bias=bias,
        norm_eps=f.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=f.get("tie_word_embeddings", False),
    )


def _gemma3_rope(f: _Fields) -> tuple[float, float]:
    """The RoPE bases of the global and the local layers, from the classic rope_theta and
    rope_local_base_freq or transformers 5's `rope_parameters` per layer type; no scaling
    (Gemma 3 4B and larger scale the global layers' positions)."""
    params = f.get("rope_parameters", {})
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    for key, rope in (("rope_scaling", f.get("rope_scaling", {})), ("rope_parameters", full),
                      ("rope_parameters", local)):
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise f.fail(key, "is not supported; expected no RoPE scaling")
    return (f.get("rope_theta", full.get("rope_theta", 1000000.0)),
            f.get("rope_local_base_freq", local.get("rope_theta", 10000.0)))


def _layer_types(cfg: ModelConfig) -> list[str]:
    """Gemma 3's `layer_types`: which blocks attend within the sliding window."""
    return ["full_attention" if cfg.attention_window(i) is None else "sliding_attention"
            for i in range(cfg.n_layers)]


def _gemma3_config(f: _Fields, name: str) -> ModelConfig:
    """Gemma 3's text decoder (`gemma3_text`: the 270M and 1B checkpoints), HF's defaults included."""
    f.expect("hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",))
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        f.expect(key, None, (None,))
    f.expect("attention_bias", False, (False,))
    f.expect("use_bidirectional_attention", False, (False,))
    types = f.get("layer_types", None)
    if types is None:  # older configs: the pattern alone
        pattern = f.get("sliding_window_pattern", 6)
    else:  # every n-th layer global (checked below)
        pattern = types.index("full_attention") + 1 if "full_attention" in types else 0
    n_heads = f.need("num_attention_heads")
    theta, local_theta = _gemma3_rope(f)
    cfg = ModelConfig(
        name=name, architecture="gemma3", vocab_size=f.need("vocab_size"),
        context_length=f.need("max_position_embeddings"), emb_dim=f.need("hidden_size"),
        n_layers=f.need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=f.get("num_key_value_heads", n_heads), hidden_dim=f.need("intermediate_size"),
        head_dim=f.get("head_dim", 256), query_pre_attn_scalar=f.get("query_pre_attn_scalar", 256),
        norm_eps=f.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_local_theta=local_theta,
        sliding_window=f.get("sliding_window", 4096), sliding_window_pattern=pattern,
        tie_embeddings=f.get("tie_word_embeddings", True),
    )
    if types is not None and list(types) != _layer_types(cfg):
        raise f.fail("layer_types", "is not supported; expected every n-th layer full_attention "
                     "and the others sliding_attention")
    return cfg


CONFIG_READERS = {"gpt2": _gpt2_config, "llama": _llama_config, "mistral": _llama_config,
                  "qwen2": _llama_config, "gemma3_text": _gemma3_config}


def config_from_hf(hf_config: dict[str, Any], name: str, *, source: str = CONFIG) -> ModelConfig:
    """Our `ModelConfig` for an HF `config.json` dict; `source` names the file in errors."""
    model_type = hf_config.get("model_type")
    reader = CONFIG_READERS.get(model_type)  # type: ignore[arg-type]
    if reader is None:
        raise LlmftError(f"{source}: model_type {model_type!r} is not supported; expected one of "
                         f"{', '.join(CONFIG_READERS)}")
    return reader(_Fields(hf_config, source), name)


def _gpt2_hf(cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    if not (cfg.qkv_bias and cfg.bias) or cfg.head_dim * cfg.n_heads != cfg.emb_dim:
        raise LlmftError(f"model {cfg.name!r}: HF GPT-2 needs biases everywhere and "
                         "head_dim * n_heads == emb_dim")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
            "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.drop_rate,
            "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate}


def _rotary_decoder_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The fields Llama's and Gemma's config.json name alike."""
    return {"hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_dropout": cfg.drop_rate}


def _gemma3_hf(cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    if cfg.qkv_bias or cfg.bias:
        raise LlmftError(f"model {cfg.name!r}: HF Gemma 3 has no biases")
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
            **_rotary_decoder_hf(cfg), "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "sliding_window": cfg.sliding_window or None,
            "layer_types": _layer_types(cfg), "rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta,
            "attention_bias": False, "final_logit_softcapping": None, "attn_logit_softcapping": None}


def _llama_hf(cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    if cfg.bias and not cfg.qkv_bias:
        raise LlmftError(f"model {cfg.name!r}: bias=True without qkv_bias has no HF equivalent")
    if cfg.sliding_window or cfg.query_pre_attn_scalar != cfg.head_dim:
        raise LlmftError(f"model {cfg.name!r}: HF Llama has no sliding window and scales attention "
                         "by 1/sqrt(head_dim)")
    qwen2 = cfg.qkv_bias and not cfg.bias
    hf = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
          "model_type": "qwen2" if qwen2 else "llama", **common, **_rotary_decoder_hf(cfg),
          "hidden_act": "silu"}
    if qwen2:
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = hf["mlp_bias"] = cfg.bias
    if (s := cfg.rope_scaling) is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_context_length}
    return hf


CONFIG_WRITERS = {"gpt2": _gpt2_hf, "llama": _llama_hf, "gemma3": _gemma3_hf}


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF `config.json` that makes `transformers` build the same network as `cfg`."""
    _layout(cfg)  # an architecture without a layout fails here
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    return CONFIG_WRITERS[cfg.architecture](cfg, common)


# -- tensors ---------------------------------------------------------------------------------

def hf_to_ours(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint",
               where: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename, un-transpose and split HF tensors into our state dict (tied head included).

    Errors name `source` (the checkpoint) or, through `where`, the file a tensor came from.
    Keys may lack the base-model prefix (GPT-2 hub files store ``h.0...`` rather than
    ``transformer.h.0...``).
    """
    layout, where = _layout(cfg), where or {}
    top = {r.hf for r in layout.rules if r.top_level}
    found: dict[str, str] = {}  # canonical HF name -> name as stored
    for stored in tensors:
        canonical = stored
        if not stored.startswith(layout.prefix) and stored.split(".")[0] not in top:
            canonical = layout.prefix + stored
        found[canonical] = stored
    expected = parameter_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in layout.expand(cfg.n_layers):
        if _skip(rule, cfg):
            used.add(f"{rule.hf}.weight")
            continue
        for suffix in SUFFIXES:
            ours = [f"{m}.{suffix}" for m in rule.ours]
            if ours[0] not in expected:
                continue  # e.g. no biases in this config
            name = f"{rule.hf}.{suffix}"
            if name not in found:
                raise LlmftError(f"{source}: missing tensor {name} (needed for {ours[0]})")
            used.add(name)
            stored = found[name]
            t = tensors[stored]
            sizes = [expected[k][0] for k in ours]
            want = (sum(sizes), *expected[ours[0]][1:])
            if rule.conv1d and suffix == "weight":
                want = want[::-1]
            if tuple(t.shape) != want:
                raise LlmftError(f"{where.get(stored, source)}: tensor {stored} has shape "
                                 f"{tuple(t.shape)}, expected {want} for this config.json")
            if rule.conv1d and suffix == "weight":
                t = t.t()
            fused = len(ours) > 1
            for key, piece in zip(ours, t.split(sizes)):
                # A fusion's pieces get memory of their own: the model's parameters become these
                # very tensors, and safetensors refuses to save slices of one tensor.
                out[key] = piece.clone(memory_format=torch.contiguous_format) if fused else piece.contiguous()
    for name in sorted(set(found) - used):
        if not layout.ignored.fullmatch(name):
            stored = found[name]
            raise LlmftError(f"{where.get(stored, source)}: unexpected tensor {stored} "
                             "(not part of the model config.json describes)")
    if cfg.tie_embeddings:
        out["out_head.weight"] = out["tok_emb.weight"]
    return out


def ours_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict as HF names and layouts; a tied head is omitted (HF re-ties it)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in _layout(cfg).expand(cfg.n_layers):
        if _skip(rule, cfg):
            used.add("out_head.weight")
            continue
        for suffix in SUFFIXES:
            ours = [f"{m}.{suffix}" for m in rule.ours]
            if ours[0] not in state:
                continue
            used.update(ours)
            t = torch.cat([state[k] for k in ours]) if len(ours) > 1 else state[ours[0]]
            if rule.conv1d and suffix == "weight":
                t = t.t()
            # contiguous() copies transposed views; clone() the rest so no storage is shared.
            out[f"{rule.hf}.{suffix}"] = t.detach().cpu().contiguous().clone()
    extra = sorted(set(state) - used)
    if extra:
        raise LlmftError(f"model {cfg.name!r}: parameter {extra[0]} has no Hugging Face "
                         "equivalent (merge adapters or drop task heads before exporting)")
    return out


# -- folders ---------------------------------------------------------------------------------

def _read_safetensors(path: Path, out: dict[str, torch.Tensor], where: dict[str, str]) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = f.get_tensor(name)
                where[name] = str(path)
    except (SafetensorError, OSError) as e:
        raise LlmftError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def read_hf_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Every tensor of the folder's safetensors checkpoint (single file or sharded), the file
    each came from, and the checkpoint's name (the file, or the shard index)."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    if (folder / SAFETENSORS).is_file():
        _read_safetensors(folder / SAFETENSORS, tensors, where)
        return tensors, where, str(folder / SAFETENSORS)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LlmftError(f"{index}: missing field weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise LlmftError(f"{index}: shard {shard} not found in {folder}")
            _read_safetensors(folder / shard, tensors, where)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LlmftError(f"{index}: tensor {missing[0]} is not in shard {weight_map[missing[0]]}")
        return tensors, where, str(index)
    pickles = [n for n in PICKLE_CHECKPOINTS if (folder / n).is_file()]
    if pickles:
        raise LlmftError(f"{folder / pickles[0]}: pickle checkpoints are refused (loading one can "
                         "run arbitrary code); convert it to safetensors")
    raise LlmftError(f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")


def read_hf_config(folder: Path, name: str | None = None) -> ModelConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise LlmftError(f"{folder}: no {CONFIG} (not a Hugging Face model folder)")
    return config_from_hf(read_json(path), name or Path(folder).name, source=str(path))


def load_hf_folder(folder: Path | str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and our state dict from an HF model folder (config.json + safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlmftError(f"{folder}: not a folder")
    cfg = read_hf_config(folder)
    tensors, where, source = read_hf_tensors(folder)
    return cfg, hf_to_ours(tensors, cfg, source, where)


def export_hf(model: DecoderLM, folder: Path | str) -> None:
    """Write config.json + model.safetensors that `transformers` `from_pretrained` loads.

    Each file is written under a temporary name and renamed, so a crash never leaves a
    truncated checkpoint behind.
    """
    folder = Path(folder)
    cfg = model.cfg
    dtype = model.tok_emb.weight.dtype
    hf_config = config_to_hf(cfg, dtype)
    tensors = ours_to_hf(model.state_dict(), cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(folder / SAFETENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG, hf_config)
