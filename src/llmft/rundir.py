"""A run directory is the unit of output: this module owns its files, its metadata and how it
comes into being.

`RunDir` names every file of a run. `RunMeta` is `run.json`, typed and versioned: written and
read here only. `create_run` is the one way to make a run: it refuses unsafe targets before any
work, holds a lock on the target for the whole command, works in a hidden staging folder beside
it, and renames that into place only when the command succeeds (on any error the staging folder
is removed). Single files are written the same way (temporary name, fsync, rename).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from llmft.errors import LlmftError, one_line
from llmft.models.config import ModelConfig
from llmft.paths import replaced_atomically
from llmft.tasks import check_meta
from llmft.training.metrics_log import MetricsLog

log = logging.getLogger("llmft")

SCHEMA_VERSION = 1


@dataclass
class RunMeta:
    """What `run.json` holds: enough to rebuild the trained model and use it."""

    task: str  # a name in llmft.tasks.TASKS
    model: str  # the base model: a registry name or an absolute path
    model_config: dict[str, Any]  # ModelConfig.to_dict()
    max_length: int  # tokens per text (classification) or per example (instructions)
    random_init: bool = False  # the base had random weights: the run keeps them all
    base_fingerprint: str | None = None  # a LoRA run's base weights, checked on every load
    lora: dict[str, Any] | None = None  # LoRAConfig.to_dict() for an adapter run
    labels: list[str] | None = None  # classification: class names, in head order
    class_token: str | None = None  # classification: which hidden state the head reads
    truncate: str = "head"  # classification: which end of a longer text is kept (head or tail)
    prompt_style: str | None = None  # instruction: the prompt format it was trained on
    merged_from: dict[str, Any] | None = None  # `llmft merge`: the LoRA run it came from
    options: dict[str, Any] = field(default_factory=dict)  # the command's options, for the record
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> RunMeta:
        """Validate `data` (a parsed run.json): a one-line error names the first bad field."""
        if not isinstance(data, dict):
            raise LlmftError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise LlmftError(f"{source}: field 'schema_version' is {data.get('schema_version')!r}, expected "
                             f"{SCHEMA_VERSION} (not a run of this llmft version)")
        check_fields(cls, data, source)
        check_fields(ModelConfig, data["model_config"], f"{source}: field 'model_config'")
        meta = cls(**data)
        check_meta(meta, source)
        return meta


def check_fields(cls: type, data: dict[str, Any], source: str) -> None:
    """Every key of `data` is a field of dataclass `cls`, every field without a default is
    there, and each value has its field's type."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise LlmftError(f"{source}: unknown field {key!r}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LlmftError(f"{source}: missing field {f.name!r}")
        elif not _has_type(data[f.name], hints[f.name]):
            raise LlmftError(f"{source}: field {f.name!r} must be {_type_name(hints[f.name])}, "
                             f"got {json.dumps(data[f.name])[:60]}")


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (str, int, float, bool, dict, list[str],
    a nested dataclass as an object, X | None)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, get_args(hint)[0]) for v in value)
    if origin is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


class RunDir:
    """A run's folder and the name of every file in it."""

    META = "run.json"
    WEIGHTS = "model.safetensors"  # the whole model (full fine-tuning, merged or random-base runs)
    ADAPTER = "adapter.safetensors"  # a LoRA run: adapters + the task's new head
    TOKENIZER = "tokenizer"
    RESULTS = "results.json"
    EVALUATION = "evaluation.json"  # classify eval: the metrics report (confusion.png, roc.png, pr.png beside it)
    MODEL_FILES = (META, WEIGHTS, ADAPTER, TOKENIZER)  # what describes the model, not the run's history
    TABLES = {"steps": "metrics", "epochs": "epochs"}  # metrics tables -> file stems (.csv and .jsonl)
    CHECKPOINTS = "checkpoints"  # training checkpoints, while the run is in its staging folder

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def split(self, name: str, suffix: str) -> Path:
        """A data split the run was trained and evaluated on: train/validation/test + .csv or .json."""
        return self.path / f"{name}{suffix}"

    def plot(self, name: str) -> Path:
        """The stem of a plot (written as .png and .pdf)."""
        return self.path / name

    def evaluation(self, data: str | None = None) -> RunDir:
        """Where `classify eval` puts its report and plots: the run itself for its own test split,
        `eval-STEM/` inside it for a labelled file `data` (made here)."""
        if data is None:
            return self
        folder = RunDir(self.path / f"eval-{Path(data).stem}")
        folder.path.mkdir(exist_ok=True)
        return folder

    def table(self, name: str) -> Path:
        return self.path / f"{self.TABLES[name]}.csv"

    def is_run(self) -> bool:
        return self.file(self.META).is_file()

    def has_checkpoint(self) -> bool:
        """Whether an interrupted run here left a checkpoint to resume from."""
        return any((p / "state.json").is_file() for p in self.file(self.CHECKPOINTS).glob("step-*"))

    def read_meta(self) -> RunMeta:
        if not self.path.is_dir():
            raise LlmftError(f"{self.path}: run directory not found")
        path = self.file(self.META)
        return RunMeta.from_dict(read_json(path), str(path))

    def write_meta(self, meta: RunMeta) -> None:
        atomic_write_json(self.file(self.META), meta.to_dict())

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.file(self.RESULTS), results)

    def metrics(self) -> RunMetrics:
        return RunMetrics(self)


class RunMetrics:
    """The training loop's metrics sink: rows of the run's tables, appended as they happen."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.logs = {name: MetricsLog(run.table(name)) for name in RunDir.TABLES}

    def write(self, table: str, row: dict[str, Any]) -> None:
        self.logs[table].append(row)

    def clear(self) -> None:
        """Start the tables afresh (a resumed run writes its rows so far again)."""
        for log_ in self.logs.values():
            log_.csv_path.unlink(missing_ok=True)
            log_.jsonl_path.unlink(missing_ok=True)
        self.logs = {name: MetricsLog(self.run.table(name)) for name in RunDir.TABLES}


# -- creating a run ------------------------------------------------------------------------

def _refuse_unsafe_target(out: Path, inputs: Iterable[Path]) -> None:
    """A target that must never be replaced: not a run, a place the user lives in, or holding
    an input of the command."""
    resolved = out.resolve()
    protected = {Path("/"), Path.home().resolve()}
    cwd = Path.cwd().resolve()
    if resolved in protected or resolved == cwd or resolved in cwd.parents:
        raise LlmftError(f"{out}: refusing to use this directory as a run directory (choose a new folder)")
    for given in inputs:
        path = Path(given).resolve()
        if path == resolved or resolved in path.parents:
            raise LlmftError(f"{out}: it holds {given}, an input of this command; choose another --out")
    if resolved.exists() and not resolved.is_dir():
        raise LlmftError(f"{out}: exists and is not a directory")
    if resolved.is_dir() and not RunDir(resolved).is_run():
        raise LlmftError(f"{out}: exists and is not an llmft run (no {RunDir.META}); --overwrite only "
                         "replaces runs, choose another --out")


def require_out(out: Path | str) -> Path:
    """`--out` as a path; an empty one is an error (it would mean the current directory)."""
    if not str(out).strip():
        raise LlmftError("--out is empty: name the run directory to create")
    return Path(out)


def check_target(out: Path | str, overwrite: bool, inputs: Iterable[Path] = ()) -> Path:
    """The run path, after the checks that need no work done: a one-line error otherwise."""
    out = Path(out)
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise LlmftError(f"{out}: {parent} is a file, not a directory")
    if out.exists() and not overwrite:
        raise LlmftError(f"{out}: run directory already exists (pass --overwrite to replace it)")
    if out.exists() or out.is_symlink():
        _refuse_unsafe_target(out, inputs)
    elif any(Path(i).resolve() == out.resolve() for i in inputs):
        raise LlmftError(f"{out}: is an input of this command; choose another --out")
    return out


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` for the whole command; a second writer fails at once."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LlmftError(f"{out}: cannot write into {out.resolve().parent} ({one_line(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LlmftError(f"{out}: another llmft command is writing this run directory") from None
        try:  # the holder before us may have removed the file after we opened it: lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def staging_path(out: Path | str) -> Path:
    """Where the run `out` is made before it appears (and where its checkpoints are)."""
    out = Path(out)
    return out.parent / f".{out.name}.staging"


def _staging(out: Path, resume: bool) -> Path:
    """The staging folder of `out`, ready for this command: an interrupted run's is kept for
    `resume`, refused without it when it holds a checkpoint, and removed otherwise."""
    staging = staging_path(out)
    if staging.exists() and RunDir(staging).has_checkpoint():
        if not resume:
            raise LlmftError(f"{out}: an interrupted run left a checkpoint in {staging}; add --resume to "
                             "continue it, or remove that folder to start over")
        return staging
    if resume:
        raise LlmftError(f"--resume: no checkpoint of {out} to resume from (in {staging})")
    if staging.exists():
        shutil.rmtree(staging)
        log.info("removed %s, left by an interrupted run", staging)
    staging.mkdir()
    return staging


def _replace(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to `out`; an existing run is replaced only with
    `overwrite`, and only once the new one is complete."""
    shutil.rmtree(staging / RunDir.CHECKPOINTS, ignore_errors=True)
    if out.exists():
        if not overwrite:
            kept = out.parent / f".{out.name}.finished-{os.getpid()}"
            staging.rename(kept)
            raise LlmftError(f"{out}: appeared while this command ran; the finished run is kept in {kept}")
        _refuse_unsafe_target(out, ())
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    staging.rename(out)


@contextmanager
def create_run(out: Path | str, overwrite: bool = False, inputs: Iterable[Path] = (),
               resume: bool = False) -> Iterator[RunDir]:
    """Yield the staging `RunDir` of a new run; on success it becomes `out`. On failure it is
    deleted, unless it holds a checkpoint to `resume` from. `inputs` are the files the command
    reads (never inside what it replaces)."""
    inputs = list(inputs)
    out = check_target(out, overwrite, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmftError(f"{out}: cannot create its folder ({one_line(e)})") from None
    with _locked(out):
        check_target(out, overwrite, inputs)  # another command may have finished meanwhile
        staging = _staging(out, resume)
        try:
            yield RunDir(staging)
        except BaseException:
            if RunDir(staging).has_checkpoint():
                log.warning("kept %s: run the same command with --resume to continue", staging)
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _replace(staging, out, overwrite)


# -- files ---------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file, fsync and rename: a reader never sees half a file."""
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON with strict numbers: a NaN or infinity is a bug to surface, not a file to write."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if path.is_dir():
        raise LlmftError(f"{path}: is a directory, expected a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise LlmftError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise LlmftError(f"{path}: not UTF-8 text (at byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise LlmftError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
