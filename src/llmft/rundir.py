"""A run directory is the unit of output. It appears whole or not at all.

Work is written into a hidden staging folder beside the target and renamed into place only
when the command succeeds; on any error the staging folder is removed. Single files are
written the same way (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmft.errors import LlmftError


def check_new_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LlmftError(f"{out}: run directory already exists (pass --overwrite to replace it)")


@contextmanager
def staged_run_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `out`, on failure it is deleted."""
    out = Path(out)
    check_new_run_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmftError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise LlmftError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
