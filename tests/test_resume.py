"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT) in a subprocess and resumed
ends with the same weights, bit for bit, and the same metrics files as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch

from llmft.cli import main
from llmft.errors import LlmftError
from llmft.pipelines.classification import ClassifyOptions, train_classifier
from llmft.pipelines.instruction import InstructOptions, train_instructions
from llmft.training.lora import LoRAConfig
from llmft.training.loop import TrainConfig
from tests.helpers import ROOT, write_slices

TINY = {"n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 128}

# Each case: the pipeline and its options (as keyword arguments). The subprocess is stopped after
# step STOP_AFTER; checkpoints come every 3 steps and evaluations every 2, so a row is logged
# after the last checkpoint (step 6) and must not be duplicated on resume. Step 6 ends an epoch
# of instruction-full (which also draws NEFTune's noise); it falls inside an epoch for the others.
# instruction-lora averages its weights from step 3 of 24 on (`average_tail`): the checkpoint
# holds the mean of steps 3-6.
CASES = {
    "classification-full": ("classification", dict(
        max_length=32, train=dict(epochs=2, batch_size=8, eval_freq=2, eval_iter=1, lr=1e-3))),
    "classification-lora": ("classification", dict(
        max_length=32, finetune="lora", lora=dict(rank=4, alpha=8, dropout=0.1),
        train=dict(epochs=2, batch_size=8, eval_freq=2, eval_iter=1, lr=1e-3))),
    "instruction-full": ("instruction", dict(
        max_length=64, config_overrides={**TINY, "drop_rate": 0.1}, neftune_alpha=5.0,
        train=dict(epochs=2, batch_size=4, grad_accum=2, warmup_steps=2, lr_schedule="cosine", eval_freq=2,
                   eval_iter=1, lr=1e-3))),
    "instruction-lora": ("instruction", dict(
        max_length=64, finetune="lora", lora=dict(rank=4, alpha=8, dropout=0.1),
        train=dict(epochs=2, batch_size=4, eval_freq=2, eval_iter=1, lr=1e-3, average_tail=0.9))),
}
STOP_AFTER = 8

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from llmft.errors import LlmftError
    from llmft.training import loop
    from tests.test_resume import run_case

    torch.set_num_threads(1)
    case, out, stop_after, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    step = loop._Loop.optimizer_step

    def optimizer_step(self):
        step(self)
        if self.step + 1 == stop_after:
            print("stop here", flush=True)
            if sig == "KILL":
                time.sleep(120)
            else:
                deadline = time.monotonic() + 60
                while not self.interrupts.requested and time.monotonic() < deadline:
                    time.sleep(0.01)

    loop._Loop.optimizer_step = optimizer_step
    try:
        run_case(case, out)
    except LlmftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_slices(tmp_path_factory.mktemp("data"), 600, 60)
    os.environ["LLMFT_TEST_RESUME_DATA"] = str(root)
    return root


def run_case(case: str, out, **changes):
    """Train `case` into `out` (also what the subprocess runs)."""
    task, kwargs = CASES[case]
    kwargs = {**kwargs, **changes}
    train = TrainConfig(**{"device": "cpu", "checkpoint_every": 3, "keep_checkpoints": 2,
                           **kwargs.pop("train"), **kwargs.pop("train_changes", {})})
    lora = LoRAConfig(**kwargs.pop("lora", {}))
    root = os.environ["LLMFT_TEST_RESUME_DATA"]
    common = dict(model="gpt2-small", out=out, random_init=True, lora=lora, train=train)
    if task == "classification":
        return train_classifier(ClassifyOptions(data=f"{root}/spam.tsv", config_overrides=TINY, **common, **kwargs))
    return train_instructions(InstructOptions(data=f"{root}/sft.json", **{"config_overrides": TINY, **common,
                                                                           **kwargs}))


def stopped_run(case: str, out, sig: str = "KILL") -> subprocess.CompletedProcess | None:
    """Run `case` in a subprocess and stop it after step STOP_AFTER with SIGKILL or SIGINT."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, case, str(out), str(STOP_AFTER), sig], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:  # progress lines, then the hook's
        if line.strip() == "stop here":
            break
    os.kill(proc.pid, getattr(signal, f"SIG{sig}"))
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def weights(run) -> dict:
    return {name: tensors for name in ("model.safetensors", "adapter.safetensors") if (run / name).exists()
            for tensors in [safetensors.torch.load_file(str(run / name))]}


def assert_same_run(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert wa[name][key].equal(wb[name][key]), (name, key)
    for table in ("metrics.csv", "metrics.jsonl", "epochs.csv", "epochs.jsonl"):
        assert (a / table).read_text() == (b / table).read_text(), table
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    for timing in ("train_seconds", "peak_memory_mb"):
        ra.pop(timing), rb.pop(timing)
    assert ra == rb
    assert not (b / "checkpoints").exists() and not list(b.parent.glob(f".{b.name}.*"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_run_resumes_bit_for_bit(case, data, tmp_path):
    run_case(case, tmp_path / "whole")
    killed = stopped_run(case, tmp_path / "resumed")
    assert killed.returncode == -signal.SIGKILL
    staging = tmp_path / ".resumed.staging"
    assert not (tmp_path / "resumed").exists()
    saved = json.loads((staging / "checkpoints" / "step-000006" / "state.json").read_text())
    assert len((staging / "metrics.csv").read_text().splitlines()) - 1 > len(saved["history"]["steps"])
    assert saved["extra"].get("average_count") == (4 if "average_tail" in CASES[case][1]["train"] else None)
    run_case(case, tmp_path / "resumed", resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


def test_sigint_checkpoints_and_a_torn_checkpoint_falls_back(data, tmp_path):
    case = "instruction-full"
    run_case(case, tmp_path / "whole")
    stopped = stopped_run(case, tmp_path / "resumed", sig="INT")
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: interrupted after step {STOP_AFTER}; checkpoint saved: run the same command with --resume "
        "to continue")
    checkpoints = tmp_path / ".resumed.staging" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000006", f"step-{STOP_AFTER:06d}"]
    torn = checkpoints / f"step-{STOP_AFTER:06d}" / "trainable.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])  # as a kill in the middle of writing it would leave it
    run_case(case, tmp_path / "resumed", resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


def test_a_resume_with_other_options_is_refused(data, tmp_path):
    stopped_run("classification-full", tmp_path / "run")
    with pytest.raises(LlmftError, match=r"made with other options \(--max-length 32 -> 30, --lr 0.001 -> 0.002\)"):
        run_case("classification-full", tmp_path / "run", resume=True, max_length=30,
                 train_changes={"lr": 2e-3})
    assert (tmp_path / ".run.staging" / "checkpoints").is_dir()  # the checkpoint is kept
    with pytest.raises(LlmftError, match="an interrupted run left a checkpoint .* add --resume"):
        run_case("classification-full", tmp_path / "run")
    run_case("classification-full", tmp_path / "run", resume=True, train_changes={"epochs": 3})  # more epochs: fine


def test_a_resume_with_other_epochs_moves_the_averaged_tail(data, tmp_path):
    """instruction-lora's checkpoint after step 6 averages from step 3 on (24 steps). With 5
    epochs (60 steps) the last 0.9 begins at step 7, after the checkpoint: the mean starts anew
    and the run ends as an uninterrupted 5-epoch run does, bit for bit. With 3 epochs (36 steps)
    it would begin at step 4, already taken without being averaged: refused, the checkpoint kept."""
    case = "instruction-lora"
    stopped_run(case, tmp_path / "resumed")
    with pytest.raises(LlmftError, match=r"averages the weights from step 3 on; with 36 optimizer steps "
                                         r"--average-tail 0.9 would begin at step 4, which is past"):
        run_case(case, tmp_path / "resumed", resume=True, train_changes={"epochs": 3})
    assert (tmp_path / ".resumed.staging" / "checkpoints").is_dir()
    run_case(case, tmp_path / "whole", train_changes={"epochs": 5})
    run_case(case, tmp_path / "resumed", resume=True, train_changes={"epochs": 5})
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")


def test_resume_without_a_checkpoint_says_so(data, tmp_path, capsys):
    code = main(["classify", "train", "--random-init", "--data", str(data / "spam.tsv"), "--out", str(tmp_path / "r"),
                 "--resume"])
    assert code == 2
    assert "--resume: no checkpoint of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
