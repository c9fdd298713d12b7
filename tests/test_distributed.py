"""torchrun with 2 gloo processes on CPU: DDP and FSDP2 train what one process trains.

2 processes x batch 4 see the rows of the same global batches of 8 that 1 process x batch 8
sees, and each rank's loss is weighted by its share of the examples (or tokens), so the
averaged gradient is the one-process gradient up to float rounding (another summation order).
Rounding differences of ~1e-7 stay ~1e-7 in the losses and weights, except where Adam divides
a gradient that is zero in exact arithmetic (an attention key bias: softmax ignores it) by its
own rounding noise: such a parameter moves by up to `lr` per step in any direction, so it is
compared with atol = steps x lr.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import safetensors.torch

from tests.helpers import ROOT, write_slices

TINY = {"n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 128}
LR = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_slices(tmp_path_factory.mktemp("data"), 400, 50)
    return root


def spec(task: str, data, out, batch_size: int, **train) -> dict:
    common = dict(model="gpt2-small", out=str(out), random_init=True, config_overrides=TINY)
    cfg = dict(epochs=1, batch_size=batch_size, eval_freq=2, eval_iter=2, lr=LR, device="cpu")
    cfg.update(train)
    if task == "classification":
        return dict(task=task, data=str(data / "spam.tsv"), max_length=32, train=cfg, **common)
    return dict(task=task, data=str(data / "sft.json"), max_length=64, train=cfg, **common)


def launch(run_spec: dict, nproc: int = 2, extra: tuple[str, ...] = (),
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *extra,
           str(ROOT / "tests" / "dist_worker.py"), json.dumps(run_spec)]
    if not extra:
        cmd[3:3] = ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def losses(run) -> list[float]:
    """Train and validation loss of every evaluation, in order."""
    with open(run / "metrics.csv") as f:
        return [float(r[k]) for r in csv.DictReader(f) for k in ("train_loss", "val_loss")]


def assert_same_training(one, two, steps: int) -> None:
    a, b = losses(one), losses(two)
    assert len(a) == len(b) > 2
    assert a == pytest.approx(b, abs=1e-5)
    wa, wb = (safetensors.torch.load_file(str(r / "model.safetensors")) for r in (one, two))
    assert wa.keys() == wb.keys()
    for name in wa:
        atol = steps * LR if name.endswith("attn.key.bias") else 1e-5
        assert (wa[name] - wb[name]).abs().max().item() <= atol, name


@pytest.mark.parametrize("task, strategy, train", [
    ("classification", "ddp", {"average_tail": 0.5}),
    ("instruction", "ddp", {"grad_accum": 2}),
    ("instruction", "fsdp", {"grad_accum": 2}),
    ("classification", "fsdp", {}),
])
def test_two_processes_train_what_one_does(task, strategy, train, data, tmp_path):
    from tests.dist_worker import PIPELINES
    from llmft.training.loop import TrainConfig

    one = spec(task, data, tmp_path / "one", 8, **train)
    options, pipeline = PIPELINES[one.pop("task")]
    results = pipeline(options(**{**one, "train": TrainConfig(**one["train"])}))
    launch(spec(task, data, tmp_path / "two", 4, strategy=strategy, **train))
    steps = len(losses(tmp_path / "one"))  # evaluations every 2 steps, two losses each
    assert_same_training(tmp_path / "one", tmp_path / "two", steps)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for key in ("train_accuracy", "validation_accuracy", "test_accuracy", "full_val_loss_after"):
        if key in results:
            assert two[key] == pytest.approx(results[key], abs=1e-5), key
    assert not list(tmp_path.glob(".two.*"))


def test_two_nodes_rendezvous_on_loopback(data, tmp_path):
    """Two torchrun invocations, one process each, meeting through the c10d rendezvous. Node 0
    hosts the rendezvous store, as the machine that --rdzv-endpoint names does: on one machine
    both agents match the address, and the store would go to whichever binds first."""
    port = free_port()
    run_spec = json.dumps(spec("classification", data, tmp_path / "run", 4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=llmft-test"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    with logs[0].open("w") as err0, logs[1].open("w") as err1:
        nodes = [subprocess.Popen([*cmd, f"--node-rank={rank}", f"--rdzv-conf=is_host={int(rank == 0)}",
                                   str(ROOT / "tests" / "dist_worker.py"), run_spec], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=err)
                 for rank, err in enumerate((err0, err1))]
        try:
            codes = [node.wait(timeout=180) for node in nodes]
        except subprocess.TimeoutExpired:
            codes = "timed out"
        finally:
            for node in nodes:
                node.kill()
    errors = "".join(f"--- node {rank} ---\n{log.read_text()[-2000:]}" for rank, log in enumerate(logs))
    assert codes == [0, 0], errors
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_an_fsdp_checkpoint_at_two_processes_resumes_on_one(data, tmp_path):
    """FSDP at world size 2 checkpoints through torch.distributed.checkpoint (a shard file per
    rank) and is stopped after step 5, inside its second epoch; one process resumes it with the same global batch and
    ends where an uninterrupted one-process run ends."""
    from tests.dist_worker import PIPELINES
    from llmft.training.loop import TrainConfig

    train = {"grad_accum": 2, "checkpoint_every": 2, "epochs": 3}  # 3 steps an epoch
    one = spec("instruction", data, tmp_path / "one", 8, **train)
    options, pipeline = PIPELINES[one.pop("task")]
    pipeline(options(**{**one, "train": TrainConfig(**one["train"])}))
    two = spec("instruction", data, tmp_path / "run", 4, strategy="fsdp", **train)
    done = launch({**two, "stop_after": 5}, check=False)
    assert done.returncode != 0 and "checkpoint saved" in done.stderr, done.stderr[-3000:]
    [saved] = (tmp_path / ".run.staging" / "checkpoints").glob("step-*")
    assert saved.name == "step-000005" and len(list((saved / "shards").glob("*.safetensors"))) == 2
    resumed = spec("instruction", data, tmp_path / "run", 8, **train)
    options, pipeline = PIPELINES[resumed.pop("task")]
    pipeline(options(**{**resumed, "resume": True, "train": TrainConfig(**resumed["train"])}))
    assert_same_training(tmp_path / "one", tmp_path / "run", len(losses(tmp_path / "one")))


def test_respond_splits_the_entries_across_ranks_into_one_file(data, tmp_path):
    """`torchrun -m llmft instruct respond` on two ranks answers the test split's 5 entries (3 and
    2) into the file one process writes, and prints once (a barely trained model: random tokens,
    not an end-of-text at once)."""
    from tests.dist_worker import PIPELINES
    from llmft.pipelines.instruction import respond
    from llmft.training.loop import TrainConfig

    run = spec("instruction", data, tmp_path / "sft", 8, lr=1e-9)
    options, pipeline = PIPELINES[run.pop("task")]
    pipeline(options(**{**run, "train": TrainConfig(**run["train"])}))
    asked = dict(split="test", max_new_tokens=6, batch_size=1, device="cpu")
    one = respond(tmp_path / "sft", out=tmp_path / "one.json", **asked)
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "llmft", "instruct", "respond", str(tmp_path / "sft"),
           "--split", "test", "--out", str(tmp_path / "two.json"), "--max-new-tokens", "6", "--batch-size", "1",
           "--device", "cpu"]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("responses saved to") == 1  # only rank 0 prints
    answers = json.loads(one.read_text())
    assert len(answers) == 5 and all(e["model_response"] for e in answers)
    assert json.loads((tmp_path / "two.json").read_text()) == answers
    assert (tmp_path / "two.settings.json").read_text() == (tmp_path / "one.settings.json").read_text()
