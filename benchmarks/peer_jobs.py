"""The jobs of the peer suite (`bench_peers.py`), one per side and task, run in a worker process.

Each job returns (its figures, a function measuring the rest): the job itself is what a user's
run does (load the model, train, evaluate) and is timed whole; the returned function runs
after the job's wall time and peak memory are read, and computes the figures both sides must
compute the same way (the validation loss below) or checks that both saw the same inputs.

Validation loss, the same for both sides: the validation split's entries in the Alpaca format,
tokenized by llmft (`InstructionDataset`, end-of-text appended by `collate_instruction`), batches
of 8 in split order; the summed token cross-entropy over every counted target divided by their
number (a token mean over the whole split, not a mean of batch means). "all" counts every target
up to and including the end-of-text; "response" only the targets after the prompt (what
`--mask-prompt` and TRL's completion-only loss train on). Both from one forward pass of the
trained model: the final hidden states at the counted positions through the output head.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SEED = 123
HP = {"classify": {"epochs": 5, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.1},
      "instruct": {"epochs": 1, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.1}}
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0}
# LoRA on every linear layer of the blocks, the output head left out on both sides: PEFT's
# `all-linear` leaves it out and TRL refuses an adapter on `lm_head`; llmft's `all-linear` would wrap it.
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLMFT_LORA_TARGETS = "attn,mlp"  # the same seven projections in llmft's names
NO_PERIODIC_EVAL = 1_000_000  # llmft's --eval-freq: only the loop's evaluation before the first step
EVAL_BATCH = 8
CE_ROWS = 512  # output-head rows per cross-entropy chunk (the logits of 512 positions at once)

Figures = dict[str, Any]
Job = tuple[Figures, Callable[[], Figures]]


# -- shared -------------------------------------------------------------------------------------

def timed_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@contextlib.contextmanager
def timed_attribute(module: Any, name: str) -> Iterator[list[float]]:
    """Time every call of `module.name` while inside (llmft's training loop, as its pipeline calls it)."""
    original, seconds = getattr(module, name), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)
    try:
        yield seconds
    finally:
        setattr(module, name, original)


def classify_options(data: dict[str, Any]):
    from llmft.pipelines.classification import ClassifyOptions
    from llmft.training.loop import TrainConfig

    return ClassifyOptions(out=Path("/nonexistent/peers"), data=data["data"], validation_data=data["validation_data"],
                           test_data=data["test_data"], balance=data["balance"], train=TrainConfig(seed=SEED))


def classify_splits(data: dict[str, Any]):
    """llmft's own split of the data (`load_splits`, llmft's seed): what both sides train on."""
    from llmft.pipelines.classification import load_splits

    return load_splits(classify_options(data))


def instruct_splits(data: dict[str, Any]):
    from llmft.pipelines.instruction import InstructOptions, load_splits
    from llmft.training.loop import TrainConfig

    return load_splits(InstructOptions(out=Path("/nonexistent/peers"), data=data["data"], train=TrainConfig(seed=SEED)))


def alpaca():
    from llmft.prompts import get_prompt_style

    return get_prompt_style("alpaca")


def row_cross_entropy(hidden, head, targets):
    """Per-row cross-entropy of head(hidden), CE_ROWS rows of logits at a time."""
    import torch

    return torch.cat([torch.nn.functional.cross_entropy(head(h).float(), t, reduction="none")
                      for h, t in zip(hidden.split(CE_ROWS), targets.split(CE_ROWS))])


def validation_losses(hidden_fn: Callable, head, entries: list[dict], tokenizer) -> Figures:
    """The validation loss both sides report (module docstring): token means over all and over
    the response targets of `entries`; `hidden_fn(input_ids)` gives the final (normed) hidden states."""
    import torch

    from llmft.data.instruction import InstructionDataset, collate_instruction

    dataset = InstructionDataset(entries, tokenizer, alpaca())
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, len(dataset), EVAL_BATCH):
            items = [dataset[i] for i in range(start, min(start + EVAL_BATCH, len(dataset)))]
            full = collate_instruction(items, tokenizer.eos_id)
            masked = collate_instruction(items, tokenizer.eos_id, mask_prompt=True)
            counted = full["targets"] != -100
            ce = row_cross_entropy(hidden_fn(full["input_ids"])[counted], head, full["targets"][counted])
            response = (masked["targets"] != -100)[counted]
            sums += torch.stack([ce.sum(), ce[response].sum()]).double()
            counts += torch.stack([counted.sum(), response.sum()])
    return {"val_loss_all": (sums[0] / counts[0]).item(), "val_loss_response": (sums[1] / counts[1]).item(),
            "val_targets_all": int(counts[0]), "val_targets_response": int(counts[1]), "val_entries": len(dataset)}


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the peers: transformers Trainer, TRL SFTTrainer, PEFT ------------------------------------

def hyperparameters(spec: dict[str, Any]) -> dict[str, Any]:
    """The pair's task's `HP`, with the suite's `--peer-epochs` (spec `epochs`) where given."""
    return {**HP[spec["task"]], **({"epochs": spec["epochs"]} if spec.get("epochs") else {})}


def trainer_arguments(cls, hp: dict[str, Any], out: Path, **extra: Any):
    """llmft's recipe in `TrainingArguments` terms: AdamW (fused, like llmft's), constant lr, no
    warm-up, no gradient clipping (llmft clips only when asked), fp32, no gradient checkpointing
    (TRL's default is on, llmft's off), the last partial training batch dropped (llmft's loaders
    drop it), no evaluation or checkpoint while training."""
    return cls(output_dir=str(out), num_train_epochs=hp["epochs"], per_device_train_batch_size=hp["batch_size"],
               per_device_eval_batch_size=EVAL_BATCH, learning_rate=hp["lr"], weight_decay=hp["weight_decay"],
               lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch_fused",
               seed=SEED, data_seed=SEED, use_cpu=True, bf16=False, fp16=False, dataloader_drop_last=True,
               eval_strategy="no", save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True,
               **checkpointing_off(cls), **extra)


def checkpointing_off(cls) -> dict[str, bool]:
    """transformers 5.x calls it `activation_checkpointing` (`gradient_checkpointing` is its
    deprecated alias, which TRL sets to True by default)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def keep_last_batch(trainer) -> None:
    """After training: evaluate every example (`dataloader_drop_last` is for training only here)."""
    trainer.args.dataloader_drop_last = False


def lora_config(task_type: str, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, target_modules=targets, **LORA)


def start_like_llmft(model) -> Any:
    """PEFT's LoRA A started as llmft (and the book) starts it: Kaiming-uniform with a = √5 over
    A's (in, rank) layout, i.e. uniform in ±1/√rank. PEFT's default counts the fan-in over the
    input width instead (±1/√in, 6-10× narrower here), and its validation loss then ended 15 %
    higher than llmft's (session 7): with the same start, the two sides' losses compare."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                bound = 1 / math.sqrt(module.weight.shape[0])  # PEFT's A weight: (rank, in)
                module.weight.uniform_(-bound, bound)
    return model


def train_last_block(model) -> None:
    """transformers' LlamaForSequenceClassification with llmft's `--trainable last-block`."""
    model.requires_grad_(False)
    for module in (model.model.layers[-1], model.model.norm, model.score):
        module.requires_grad_(True)


def hf_classification_data(examples, labels: list[str], tokenizer, max_length: int):
    import datasets

    enc = tokenizer([t for t, _ in examples], add_special_tokens=False, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": [labels.index(label) for _, label in examples]})


def hf_classifier(spec: dict[str, Any], n_labels: int):
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec["weights"], num_labels=n_labels, attn_implementation="sdpa")
    if spec["lora"]:
        from peft import get_peft_model

        return start_like_llmft(get_peft_model(model, lora_config("SEQ_CLS", LLAMA_LINEARS)))  # head: fully trained
    train_last_block(model)
    return model


def hf_classify(spec: dict[str, Any], tmp: Path) -> Job:
    """transformers `Trainer` + `AutoModelForSequenceClassification` on llmft's split: train,
    then the test split's accuracy (`Trainer.predict`)."""
    import transformers

    from llmft.data.classification import label_names

    splits = classify_splits(spec["data"])
    labels = label_names(splits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["weights"])
    longest = max(len(ids) for ids in tokenizer([t for t, _ in splits.train], add_special_tokens=False)["input_ids"])
    max_length = min(longest, 512, tokenizer.model_max_length)  # llmft's default --max-length rule
    data = {name: hf_classification_data(getattr(splits, name), labels, tokenizer, max_length)
            for name in ("train", "test")}
    model = hf_classifier(spec, len(labels))
    trainer = transformers.Trainer(model=model, args=trainer_arguments(transformers.TrainingArguments, hyperparameters(spec),
                                                                       tmp / "hf"),
                                   train_dataset=data["train"],
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer))
    train_seconds, _ = timed_call(trainer.train)
    keep_last_batch(trainer)
    predicted = trainer.predict(data["test"])
    logits = predicted.predictions[0] if isinstance(predicted.predictions, tuple) else predicted.predictions
    accuracy = float((logits.argmax(-1) == predicted.label_ids).mean())
    figures = {"train_seconds": train_seconds, "test_accuracy": accuracy, "steps": trainer.state.global_step,
               "trainable_parameters": count_trainable(model), "max_length": max_length,
               "train_examples": len(splits.train), "test_examples": len(splits.test)}
    return figures, lambda: {"same_token_ids": classification_ids_agree(splits.train, tokenizer, spec["weights"],
                                                                        max_length)}


def classification_ids_agree(examples, hf_tokenizer, folder: str, max_length: int) -> str:
    """How many training texts transformers' tokenizer encodes (and cuts) to llmft's ids."""
    from llmft.tokenizers import load_tokenizer

    ours = load_tokenizer(Path(folder))
    texts = [t for t, _ in examples]
    theirs = hf_tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    same = sum(ids == ours.encode(t)[:max_length] for ids, t in zip(theirs, texts))
    return f"{same}/{len(texts)}"


def sft_rows(entries: list[dict], masked: bool) -> list[dict[str, str]]:
    """The Alpaca text of each entry, as TRL's language-modeling ("text") or prompt-completion
    dataset (completion-only loss); TRL appends the end-of-text to both."""
    style = alpaca()
    if masked:
        return [{"prompt": style.format(e), "completion": style.response_text(e)} for e in entries]
    return [{"text": style.format(e) + style.response_text(e)} for e in entries]


def sft_trainer(spec: dict[str, Any], splits, tmp: Path):
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    masked = spec["mask"]
    config = trainer_arguments(SFTConfig, hyperparameters(spec), tmp / "trl", max_length=None, packing=False,
                               completion_only_loss=masked)
    return SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(spec["weights"], attn_implementation="sdpa"),
        args=config, processing_class=transformers.AutoTokenizer.from_pretrained(spec["weights"]),
        train_dataset=datasets.Dataset.from_list(sft_rows(splits.train, masked)),
        eval_dataset=datasets.Dataset.from_list(sft_rows(splits.validation, masked)),
        peft_config=lora_config("CAUSAL_LM", LLAMA_LINEARS) if spec["lora"] else None)


def trl_sft(spec: dict[str, Any], tmp: Path) -> Job:
    """TRL `SFTTrainer` on llmft's split in the Alpaca format: one epoch, then its own
    evaluation of the validation split (`trainer.evaluate`)."""
    splits = instruct_splits(spec["data"])
    trainer = sft_trainer(spec, splits, tmp)
    if spec["lora"]:
        start_like_llmft(trainer.model)
    train_seconds, _ = timed_call(trainer.train)
    keep_last_batch(trainer)
    own = trainer.evaluate()["eval_loss"]
    figures = {"train_seconds": train_seconds, "own_val_loss": own, "steps": trainer.state.global_step,
               "trainable_parameters": count_trainable(trainer.model), "train_examples": len(splits.train)}

    def after() -> Figures:
        from llmft.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(Path(spec["weights"]))
        base = trainer.model.get_base_model() if spec["lora"] else trainer.model
        base.eval()
        losses = validation_losses(lambda ids: base.model(input_ids=ids).last_hidden_state, base.lm_head,
                                   splits.validation, tokenizer)
        return {**losses, "same_token_ids": sft_ids_agree(trainer.train_dataset, splits.train, tokenizer, spec["mask"])}

    return figures, after


def sft_ids_agree(prepared, entries: list[dict], tokenizer, masked: bool) -> str:
    """How many of TRL's prepared training rows hold llmft's token ids (its text + end-of-text)
    and, with the prompt masked, llmft's prompt length (the first counted label)."""
    from llmft.data.instruction import InstructionDataset

    ours = InstructionDataset(entries, tokenizer, alpaca())
    same = 0
    for i, row in enumerate(prepared):
        ids_equal = row["input_ids"] == [*ours.encoded_texts[i], tokenizer.eos_id]
        first = next(j for j, label in enumerate(row["labels"]) if label != -100)
        same += ids_equal and (not masked or first == ours.prompt_lengths[i])
    return f"{same}/{len(entries)}" + ("" if len(prepared) == len(entries) else f" ({len(prepared)} rows)")


# -- llmft: the command line, in this process -------------------------------------------------

def hp_flags(hp: dict[str, Any]) -> list[str]:
    return ["--epochs", str(hp["epochs"]), "--batch-size", str(hp["batch_size"]), "--lr", str(hp["lr"]),
            "--weight-decay", str(hp["weight_decay"]), "--seed", str(SEED)]


def data_flags(task: str, data: dict[str, Any]) -> list[str]:
    flags = ["--data", data["data"]]
    if task == "classify" and data["validation_data"]:
        flags += ["--validation-data", data["validation_data"], "--test-data", data["test_data"]]
    if task == "classify" and not data["balance"]:
        flags.append("--no-balance")
    return flags


def llmft_argv(spec: dict[str, Any], run: Path) -> list[str]:
    """`llmft classify train` / `llmft instruct train` with the suite's hyperparameters (for
    classify: its defaults); instruct in the Alpaca format with no periodic evaluation."""
    task = spec["task"]
    argv = [task, "train", "--model", spec["weights"], "--out", str(run), "--threads", str(spec["threads"]),
            *hp_flags(hyperparameters(spec)), *data_flags(task, spec["data"])]
    if task == "instruct":
        argv += ["--prompt-style", "alpaca", "--eval-freq", str(NO_PERIODIC_EVAL)]
    if spec["mask"]:
        argv.append("--mask-prompt")
    if spec["lora"]:
        argv += ["--finetune", "lora", "--lora-targets", LLMFT_LORA_TARGETS]
    return [*argv, *spec.get("llmft_flags", ())]


def run_llmft(spec: dict[str, Any], run: Path, pipeline: Any) -> tuple[dict[str, Any], float]:
    """The command's results.json and the seconds its training loop took."""
    from llmft.cli import main
    from llmft.rundir import RunDir

    argv = llmft_argv(spec, run)
    print("llmft " + " ".join(argv), flush=True)
    with timed_attribute(pipeline, "train") as loop:
        code = main(argv)
    if code:
        raise SystemExit(f"llmft {' '.join(argv)} exited with {code}")
    return json.loads(RunDir(run).file(RunDir.RESULTS).read_text(encoding="utf-8")), sum(loop)


def split_matches(run: Path, splits: dict[str, list], suffix: str) -> bool:
    """Whether the split files the run wrote hold the splits llmft's data API gives the peer."""
    from llmft.data.sources import read_labelled_texts
    from llmft.rundir import RunDir, read_json

    rd = RunDir(run)
    if suffix == ".csv":
        return all(read_labelled_texts(rd.split(n, suffix)) == list(part) for n, part in splits.items())
    return all(read_json(rd.split(n, suffix)) == list(part) for n, part in splits.items())


def llmft_classify(spec: dict[str, Any], tmp: Path) -> Job:
    import llmft.pipelines.classification as pipeline

    results, loop = run_llmft(spec, tmp / "run", pipeline)
    splits = classify_splits(spec["data"])
    hp = hyperparameters(spec)
    figures = {"train_seconds": loop, "test_accuracy": results["test_accuracy"], "max_length": results["max_length"],
               "trainable_parameters": results["trainable_parameters"], "train_examples": len(splits.train),
               "steps": hp["epochs"] * (len(splits.train) // hp["batch_size"]), "test_examples": len(splits.test)}
    return figures, lambda: {"same_split": split_matches(tmp / "run", dict(splits.items()), ".csv")}


def llmft_instruct(spec: dict[str, Any], tmp: Path) -> Job:
    import llmft.pipelines.instruction as pipeline

    results, loop = run_llmft(spec, tmp / "run", pipeline)
    splits, hp = instruct_splits(spec["data"]), hyperparameters(spec)
    figures = {"train_seconds": loop, "own_val_loss": results["full_val_loss_after"],
               "trainable_parameters": results["trainable_parameters"], "train_examples": len(splits.train),
               "steps": hp["epochs"] * (len(splits.train) // hp["batch_size"])}

    def after() -> Figures:
        from llmft.checkpoint import load_finetuned

        model, tokenizer, _ = load_finetuned(tmp / "run")
        losses = validation_losses(model.hidden_states, model.out_head, splits.validation, tokenizer)
        return {**losses, "same_split": split_matches(tmp / "run", splits._asdict(), ".json")}

    return figures, after


JOBS = {("classify", "peer"): hf_classify, ("classify", "llmft"): llmft_classify,
        ("instruct", "peer"): trl_sft, ("instruct", "llmft"): llmft_instruct}
