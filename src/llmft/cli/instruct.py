"""`llmft instruct train | dpo | respond | judge` and `llmft generate`."""

from __future__ import annotations

from pathlib import Path

import click

from llmft.cli.options import (
    beam_options, command_options, lora_options, prepack_option, prints_results, run_options, sampling_options,
    train_options,
)


@click.group()
def instruct() -> None:
    """Instruction fine-tuning, answering and scoring (book chapter 7)."""


@instruct.command("train")
@run_options("gpt2-medium", "instruction-data", "Data set name, or a JSON list / JSONL file.")
@click.option("--prompt-style", default=None, help="alpaca, phi3, chatml, chat-template (default: the "
              "model's chat template, else alpaca).")
@click.option("--instruction-key", default="instruction")
@click.option("--input-key", default="input")
@click.option("--output-key", default="output")
@click.option("--shuffle-split/--book-split", default=True, help="Seeded shuffle before the 85/10/5 split, "
              "or the book's split of the file in order.")
@click.option("--mask-prompt", is_flag=True, help="No loss on instruction and input tokens (exercise 7.2).")
@click.option("--neftune-alpha", type=float, default=None, help="NEFTune: uniform noise of this alpha on the input "
              "embeddings while training (transformers' neftune_noise_alpha; the paper uses 5).")
@click.option("--max-length", type=int, default=None, help="Truncate examples (default: the model's context).")
@lora_options
@train_options(epochs=2, eval_freq=5, eval_iter=5)
def train_cmd(**kwargs) -> None:
    """Fine-tune a model to follow instructions."""
    from llmft.pipelines.instruction import InstructOptions, train_instructions

    results = train_instructions(command_options(InstructOptions, kwargs, "instruction", "instruct train"))
    if not prints_results():
        return
    click.echo(f"validation loss (whole split): {results['full_val_loss_before']:.3f} -> "
               f"{results['full_val_loss_after']:.3f}")
    click.echo(f"run saved to {kwargs['out']}")


@instruct.command("dpo")
@run_options("gpt2-medium", "instruction-data-with-preference",
             "Data set name, or a JSON list / JSONL file with instruction, input, chosen and rejected.")
@click.option("--prompt-style", default=None, help="For a model spec (a run keeps its own): alpaca, phi3, chatml, "
              "chat-template (default: the model's chat template, else alpaca).")
@click.option("--instruction-key", default="instruction")
@click.option("--input-key", default="input")
@click.option("--chosen-key", default="chosen")
@click.option("--rejected-key", default="rejected")
@click.option("--shuffle-split/--book-split", default=True, help="Seeded shuffle before the 85/10/5 split, "
              "or the notebook's split of the file in order.")
@click.option("--beta", type=float, default=0.1, show_default=True,
              help="DPO beta: how strongly the policy is held near the reference.")
@click.option("--logprob-reduction", type=click.Choice(["mean", "sum"]), default="mean", show_default=True,
              help="A response's log-probability: the mean over its tokens (the book) or the sum (TRL).")
@click.option("--max-length", type=int, default=None, help="Truncate examples (default: the model's context).")
@lora_options
@train_options(epochs=1, lr=5e-6, weight_decay=0.01, eval_freq=5, eval_iter=5)
def dpo_cmd(**kwargs) -> None:
    """Preference-tune (DPO) an instruction model towards the chosen responses. --model is an
    `instruct train` run (full or LoRA) or a model name or path."""
    from llmft.pipelines.preference import PreferenceOptions, train_preferences

    results = train_preferences(command_options(PreferenceOptions, kwargs, "instruction", "instruct dpo"))
    click.echo(f"validation (whole split): reward margin {results['full_val_reward_margin_before']:.3f} -> "
               f"{results['full_val_reward_margin_after']:.3f}, reward accuracy "
               f"{results['full_val_reward_accuracy_before'] * 100:.1f}% -> "
               f"{results['full_val_reward_accuracy_after'] * 100:.1f}%, loss {results['full_val_loss_before']:.3f} "
               f"-> {results['full_val_loss_after']:.3f}")
    click.echo(f"run saved to {kwargs['out']}")


@instruct.command("respond")
@click.argument("source")
@click.option("--split", default="test", help="train, validation or test split of the run.")
@click.option("--data", default=None, help="Answer this JSON/JSONL file instead of a split.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: RUN/SPLIT-responses.json")
@click.option("--max-new-tokens", default=256)
@click.option("--batch-size", default=8)
@click.option("--device", default="auto")
@click.option("--compile", is_flag=True, help="torch.compile the blocks (GPU).")
@prepack_option
@beam_options
def respond_cmd(source: str, split: str, data: str | None, out: Path | None, max_new_tokens: int,
                batch_size: int, device: str, compile: bool, prepack: bool, num_beams: int,
                length_penalty: float) -> None:
    """Answer every entry with a run (SOURCE = run directory) or a model before fine-tuning
    (SOURCE = model name or path, with --data); rerunning continues where it stopped."""
    from llmft.pipelines.instruction import reference_scores, respond

    path = respond(source, split=split, data=data, out=out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   device=device, compile=compile, prepack=prepack, num_beams=num_beams,
                   length_penalty=length_penalty)
    if not prints_results():
        return
    click.echo(f"responses saved to {path}")
    print_reference_scores(reference_scores(path))


def print_reference_scores(scores: dict) -> None:
    click.echo(f"exact match: {scores['exact_match'] * 100:.2f}%  ROUGE-L F1: {scores['rouge_l_f1'] * 100:.2f}"
               f"  ({scores['n']} entries)")


@instruct.command("judge")
@click.argument("responses", type=click.Path(path_type=Path))
@click.option("--judge", "judge_spec", default="ollama:llama3",
              help="ollama:MODEL, openai:MODEL or local:RUN_OR_MODEL.")
@click.option("--judge-url", default=None, help="Server URL (default: Ollama's http://localhost:11434).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: RESPONSES with -scores.json")
def judge_cmd(responses: Path, judge_spec: str, judge_url: str | None, out: Path | None) -> None:
    """Score each response 0-100 against the reference with a judge model (the book's prompt)."""
    from llmft.evaluation.judge import judge_responses, parse_judge_spec
    from llmft.pipelines.instruction import load_chat_model, reference_scores
    from llmft.rundir import read_json

    out = out or responses.with_name(responses.stem + "-scores.json")
    judge = parse_judge_spec(judge_spec, judge_url, load_local=load_chat_model)
    click.echo(judge_responses(read_json(responses), judge, out).summary())
    print_reference_scores(reference_scores(responses))
    click.echo(f"scores saved to {out}")


@click.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--model", default=None, help="Chat with this model (registry name or path) instead of a run.")
@sampling_options
@beam_options
def generate(args: tuple[str, ...], model: str | None, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | None, device: str, compile: bool,
             prepack: bool, num_beams: int, length_penalty: float) -> None:
    """Answer prompts: `llmft generate RUN PROMPT...` or `llmft generate --model NAME PROMPT...`.
    A single prompt's answer is printed as it is generated (with beam search, once it is decided)."""
    from llmft.errors import LlmftError
    from llmft.generation import check_beams
    from llmft.pipelines.instruction import answer, check_answer_settings, load_chat_model, stream_answer

    check_answer_settings(max_new_tokens, batch_size=1)
    check_beams(num_beams, temperature)
    source, prompts = (model, list(args)) if model else (args[0], list(args[1:]))
    if not prompts:
        raise LlmftError("no prompt given: llmft generate RUN PROMPT... or --model NAME PROMPT...")
    lm, tokenizer, style = load_chat_model(source, device, compile)
    entries = [{"instruction": p, "input": ""} for p in prompts]
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    prepack=prepack)
    if len(entries) > 1 or num_beams > 1:
        for text in answer(lm, tokenizer, style, entries, num_beams=num_beams, length_penalty=length_penalty,
                           **settings):
            click.echo(text)
        return
    for piece in stream_answer(lm, tokenizer, style, entries[0], **settings):
        click.echo(piece, nl=False)
    click.echo()
