"""Downloading public files into the cache: once, verified, atomically."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from llmft.errors import LlmftError
from llmft.paths import cache_dir
from llmft.progress import progress_bar


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, relative: str, md5: str | None = None) -> Path:
    """Fetch `url` to cache_dir()/relative unless already there; check md5 when given.

    The file is written to a temporary name and renamed, so an interrupted download never
    leaves a truncated file that a later run would trust.
    """
    dest = cache_dir() / relative
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if md5 is not None and (got := md5sum(tmp)) != md5:
            raise LlmftError(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
        tmp.replace(dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise LlmftError(f"cannot download {url} ({e}); pass a local file instead, or set LLMFT_DATA_DIR "
                         f"to a folder holding {relative}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
