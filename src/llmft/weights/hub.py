"""Fetching a model folder from the Hugging Face hub, failing fast and in one line.

`huggingface_hub` waits without a time limit for its first request (the repository listing),
so on a machine whose network silently drops packets a download could hang for minutes.
We first try a plain TCP connection to the hub with a short timeout; when it fails (or
HF_HUB_OFFLINE is set) only the local hub cache is consulted. Every failure becomes an
`LlmftError` so the CLI can suggest an offline model instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from llmft.errors import LlmftError, one_line

# Only what loading needs: config, safetensors weights (single or sharded), tokenizer files.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt",
]
CONNECT_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _offline_requested() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to the hub fails, or None when it works (or a proxy decides)."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot connect to {url.hostname}:{port} ({e})"
    return None


def download_hf(hub_id: str) -> Path:
    """The local folder of `hub_id` (downloaded, or from the hub cache when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    reason = "HF_HUB_OFFLINE is set" if _offline_requested() else _unreachable(endpoint)
    try:
        return Path(snapshot_download(
            hub_id, allow_patterns=ALLOW_PATTERNS, local_files_only=reason is not None,
            etag_timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT", 5)),
        ))
    except GatedRepoError:
        raise LlmftError(f"cannot reach the Hugging Face hub for {hub_id}: the repository is "
                         "gated; accept its licence on the hub and log in (`hf auth login`)") from None
    except Exception as e:  # network and hub failures come in many types
        detail = f"{reason}; not in the local hub cache" if reason else one_line(e)
        raise LlmftError(f"cannot reach the Hugging Face hub for {hub_id}: {detail}") from None
