"""Run the server: load the model, listen, serve until SIGINT or SIGTERM.

uvicorn handles the signals: it stops accepting connections, lets the requests in flight end
(for up to `shutdown_timeout` seconds, then cancels them), then the app's lifespan stops the
model's worker thread, and `serve` returns.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from llmft.errors import LlmftError, one_line
from llmft.rundir import RunDir
from llmft.serving.app import create_app
from llmft.serving.bridge import Limits
from llmft.serving.served import load_served

log = logging.getLogger("llmft.serve")


@dataclass(kw_only=True)
class ServeOptions:
    run: str | None = None  # a run directory, or
    model: str | None = None  # a model spec (registry name, HF folder, .gguf file)
    name: str | None = None  # what clients call it (default: the run's folder name, or the spec)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log line says which)
    api_key: str | None = None  # required as a Bearer token on every API request when set
    max_batch: int = 16  # requests computed together
    max_queue: int = 64  # requests waiting beyond those (then 503)
    max_tokens: int = 512  # new tokens a request may ask for
    max_body: int = 1 << 20  # bytes of a request body
    device: str = "auto"
    prepack: bool = True  # see `generation.decoding_session`
    shutdown_timeout: float = 30.0  # seconds requests in flight get to end after a signal

    def __post_init__(self) -> None:
        if (self.run is None) == (self.model is None):
            raise LlmftError("serve a run (RUN) or a model (--model NAME): one of the two")
        if self.run is not None and not RunDir(self.run).is_run():
            raise LlmftError(f"{self.run}: not a run directory (no {RunDir.META}); to serve a model, use --model NAME")
        for option in ("max_batch", "max_queue", "max_tokens", "max_body"):
            if getattr(self, option) < 1:
                raise LlmftError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(self, option)}")
        if not 0 <= self.port <= 65535:
            raise LlmftError(f"--port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise LlmftError("--api-key is empty")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (connections wait there until the server accepts them),
    or a one-line error (address in use, unknown host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LlmftError(f"cannot listen on {host}:{port} ({one_line(e)})") from None
    return sock


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """Once uvicorn has shut down on SIGINT or SIGTERM, it raises that signal again (to end the
    process the default way), which reaches the handlers that were in place when it started:
    these do nothing, so that `serve` returns after a graceful shutdown."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(opts: ServeOptions) -> None:
    """Serve `opts.run` or `opts.model` until SIGINT or SIGTERM."""
    with listen(opts.host, opts.port) as sock:  # first: a taken port fails before the model loads
        served = load_served(opts.run or opts.model, opts.name, opts.device)
        app = create_app(served, api_key=opts.api_key, max_batch=opts.max_batch, max_queue=opts.max_queue,
                         limits=Limits(max_tokens=opts.max_tokens, max_body=opts.max_body), prepack=opts.prepack)
        host, port = sock.getsockname()[:2]
        log.info("serving %s (%s) at http://%s:%d/ (OpenAI API under /v1, Ollama API under /api, a page at /)",
                 served.name, served.task, f"[{host}]" if ":" in host else host, port)
        config = uvicorn.Config(app, log_config=None, access_log=False,
                                timeout_graceful_shutdown=opts.shutdown_timeout)
        with _signals_end_quietly():
            uvicorn.Server(config).run(sockets=[sock])
    log.info("llmft serve: stopped")
