"""A pretrained llmft model as a Hugging Face folder that `transformers` loads whole: weights,
config and tokenizer (the peer suite's shared starting point).

    .venv/bin/python benchmarks/hf_export.py /tmp/smollm2-hf              # SmolLM2-135M-Instruct (offline GGUF)
    .venv/bin/python benchmarks/hf_export.py /tmp/out --model MODEL_SPEC

The weights and config.json are llmft's own `export_hf` (the one `llmft merge --hf` writes);
the tokenizer is llmft's `tokenizer.save` (tokenizer.json + llmft's tokenizer_spec.json, which
`llmft --model FOLDER` reads back). What `AutoTokenizer` / `AutoModelForSequenceClassification`
need beside that is added here: a tokenizer_config.json (a plain `PreTrainedTokenizerFast`, so no
BOS is added that llmft does not add; padding on the right; pad = end-of-text, llmft's padding)
and the special token ids in config.json (sequence classification finds each row's last real
token by the pad id). Printed: the largest difference between llmft's and transformers' logits
on one prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PARITY_PROMPT = "Below is an instruction that describes a task. Write a response that completes the request."


def tokenizer_config(tokenizer, context_length: int) -> dict:
    """tokenizer_config.json for an llmft `HFTokenizer` (tokenizer.json beside it)."""
    if getattr(tokenizer, "kind", None) != "hf":
        raise SystemExit(f"hf_export: needs a tokenizer.json tokenizer, not {type(tokenizer).__name__}")
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.eos_token, "padding_side": "right",
            "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template,
            "model_max_length": context_length, "clean_up_tokenization_spaces": False}


def export_pretrained(model, tokenizer, folder: Path) -> Path:
    """Write `model` (a `DecoderLM`) and `tokenizer` into `folder` for `from_pretrained`."""
    from llmft.rundir import atomic_write_json
    from llmft.weights.huggingface import export_hf

    folder = Path(folder)
    export_hf(model, folder)
    tokenizer.save(folder)
    atomic_write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, model.cfg.context_length))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
                  bos_token_id=getattr(tokenizer, "bos_id", None))
    atomic_write_json(folder / "config.json", config)
    return folder


def logit_difference(model, folder: Path, ids: list[int]) -> float:
    """max |llmft logits - transformers logits| over one prompt (both fp32, eval mode)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return (model.eval()(x) - hf(x).logits).abs().max().item()


def tokenizer_matches(tokenizer, folder: Path, texts: list[str]) -> bool:
    """Whether `AutoTokenizer` on the folder encodes `texts` to llmft's ids."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(folder)
    return all(hf(t, add_special_tokens=False)["input_ids"] == tokenizer.encode(t) for t in texts)


def export_with_check(spec: str, folder: Path) -> dict:
    """Export the model `spec` names; its logit difference and tokenizer agreement."""
    from llmft.weights import load_pretrained

    pretrained = load_pretrained(spec)
    export_pretrained(pretrained.model, pretrained.tokenizer, folder)
    ids = pretrained.tokenizer.encode(PARITY_PROMPT)
    return {"folder": str(folder), "model": spec, "prompt_tokens": len(ids),
            "max_abs_logit_difference": logit_difference(pretrained.model, folder, ids),
            "tokenizer_matches": tokenizer_matches(pretrained.tokenizer, folder, [PARITY_PROMPT, "Hi 123 <|im_end|>"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--model", default="smollm2-135m-instruct", help="llmft model spec (default: the offline GGUF)")
    args = p.parse_args(argv)
    print(json.dumps(export_with_check(args.model, args.folder), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
