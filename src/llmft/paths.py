"""Where llmft keeps downloads, and where it finds local copies of public data."""

from __future__ import annotations

import os
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
