"""Where llmft keeps downloads, where it finds local copies of public data, and how it writes a
file that a reader must never see half-written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Downloads land here: $LLMFT_CACHE, else ~/.cache/llmft."""
    return Path(os.environ.get("LLMFT_CACHE", Path.home() / ".cache" / "llmft"))


def local_data_dirs() -> list[Path]:
    """Folders laid out like the public sources (see README), named by $LLMFT_DATA_DIR
    (separated by os.pathsep). Used before any download."""
    dirs = [Path(p) for p in os.environ.get("LLMFT_DATA_DIR", "").split(os.pathsep) if p]
    return [d for d in dirs if d.is_dir()]


def find_local(relative: str) -> Path | None:
    """The first local copy of `relative` (e.g. 'gpt2-tokenizer/vocab.bpe'), if any."""
    for d in local_data_dirs():
        if (d / relative).is_file():
            return d / relative
    return None


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`, this call's own, for the block to write; renamed onto
    `path` when the block ends, removed when it raises. A reader (or a process writing the same
    file at the same time) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
