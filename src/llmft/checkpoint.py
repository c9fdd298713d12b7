"""Saving a fine-tuned model into its run directory and loading it back.

A run holds `run.json` (`RunMeta`), the weights and `tokenizer/`. Weights are safetensors only:
loading never unpickles anything.

A LoRA run saves `adapter.safetensors` instead of the whole model: the LoRA A/B tensors and the
task's new modules, megabytes rather than gigabytes. Loading rebuilds the base model from
`run.json`'s `model` spec (a registry name, or the absolute path it was trained from), checks
that its weights are the ones the adapter was trained on (`base_fingerprint`) and adds the
adapter. A randomly initialised base cannot be rebuilt that way, so such a run also keeps the
whole model in `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from llmft.errors import LlmftError, one_line
from llmft.models import MODEL_CONFIGS, DecoderLM, ModelConfig, build_model
from llmft.rundir import RunDir, RunMeta
from llmft.tasks import TASKS
from llmft.tokenizers import Tokenizer, load_tokenizer
from llmft.training.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict
from llmft.weights import load_pretrained

log = logging.getLogger("llmft")

# ModelConfig fields that fix parameter shapes: a LoRA run's base must agree on all of them.
SHAPE_FIELDS = ("architecture", "vocab_size", "emb_dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                "head_dim", "qkv_bias", "bias", "tie_embeddings")


def base_spec(spec: str) -> str:
    """A model spec that means the same model from any working directory: registry names stay,
    paths become absolute."""
    if spec in MODEL_CONFIGS or not Path(spec).exists():
        return spec
    return str(Path(spec).resolve())


def weights_fingerprint(model: nn.Module) -> str:
    """A content hash of a model's weights (names, dtypes, shapes and bytes; a tied tensor once)."""
    digest, seen = hashlib.blake2b(digest_size=16), set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_finetuned(run: RunDir, model: nn.Module, tokenizer: Tokenizer, meta: RunMeta) -> None:
    """Write the weights (or the adapter), the tokenizer and run.json."""
    if meta.lora is None or meta.random_init:
        safetensors.torch.save_model(model, str(run.file(RunDir.WEIGHTS)))
    if meta.lora is not None:
        adapter = lora_state_dict(model, TASKS[meta.task].new_modules)
        safetensors.torch.save_file({k: v.contiguous() for k, v in adapter.items()}, str(run.file(RunDir.ADAPTER)))
    tokenizer.save(run.file(RunDir.TOKENIZER))
    run.write_meta(meta)


def build_task_model(meta: RunMeta, backbone: DecoderLM | None = None) -> nn.Module:
    """The module a run trained around `backbone` (default: random weights of the run's config)."""
    if backbone is None:
        backbone = build_model(ModelConfig.from_dict(meta.model_config))
    return TASKS[meta.task].build(backbone, meta)


def load_weights(model: nn.Module, weights: Path) -> nn.Module:
    """Load a run's safetensors file into `model`, built from run.json: a file that is not
    safetensors, or whose tensors do not fit run.json, is a one-line error naming the field."""
    if not weights.is_file():
        raise LlmftError(f"{weights}: weights file not found")
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise LlmftError(f"{weights}: not a readable safetensors file ({one_line(e)})") from None
    for name, tensor in model.state_dict().items():
        if name in shapes and shapes[name] != tuple(tensor.shape):
            field = "labels" if name.endswith("out_head.weight") and hasattr(model, "backbone") else "model_config"
            raise LlmftError(f"{weights}: {name} has shape {shapes[name]}, but {RunDir.META} field {field!r} "
                             f"makes it {tuple(tensor.shape)}")
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise LlmftError(f"{weights}: does not match {RunDir.META} field 'model_config' "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def pretrained_base(meta: RunMeta) -> DecoderLM:
    """The base model a LoRA run adapted, loaded again from its spec: it must have the run's
    shape and, when the run recorded one, the same weights."""
    base = load_pretrained(meta.model)
    saved = ModelConfig.from_dict(meta.model_config)
    for name in SHAPE_FIELDS:
        if getattr(base.config, name) != getattr(saved, name):
            raise LlmftError(f"{meta.model}: {name}={getattr(base.config, name)!r}, but the run's adapter "
                             f"was trained on a base with {name}={getattr(saved, name)!r} ({RunDir.META})")
    if meta.base_fingerprint and weights_fingerprint(base.model) != meta.base_fingerprint:
        raise LlmftError(f"{meta.model}: its weights are not the ones this run's adapter was trained on "
                         f"({RunDir.META} field 'base_fingerprint')")
    return base.model


def load_lora_run(run: RunDir, meta: RunMeta) -> nn.Module:
    """Base model + task modules + LoRA layers, with the run's weights."""
    model = build_task_model(meta, None if meta.random_init else pretrained_base(meta))
    apply_lora(getattr(model, "backbone", model), LoRAConfig(**meta.lora))
    if meta.random_init:
        return load_weights(model, run.file(RunDir.WEIGHTS))
    adapter = run.file(RunDir.ADAPTER)
    try:
        state = safetensors.torch.load_file(str(adapter))
    except (FileNotFoundError, OSError, safetensors.SafetensorError) as e:
        raise LlmftError(f"{adapter}: cannot load ({one_line(e)})") from None
    load_lora_state_dict(model, state, TASKS[meta.task].new_modules, source=str(adapter))
    return model


def load_finetuned(path: Path | str) -> tuple[nn.Module, Tokenizer, RunMeta]:
    """The trained model (eval mode), its tokenizer and its metadata."""
    run = RunDir(path)
    meta = run.read_meta()
    if meta.lora is not None:
        model = load_lora_run(run, meta)
    else:
        model = load_weights(build_task_model(meta), run.file(RunDir.WEIGHTS))
    model.eval()
    log.info("loaded %s model from %s", meta.task, run.path)
    return model, load_tokenizer(run.file(RunDir.TOKENIZER)), meta
