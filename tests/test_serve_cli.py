"""`llmft serve` as a command: it serves the issue's curl request (no Content-Type), logs a
line per request, ends gracefully on SIGINT and SIGTERM (a request in flight still gets its
whole answer), and refuses bad options with a one-line error."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from llmft.cli import main
from llmft.serving.server import listen
from tests.test_serve import train_runs

LLMFT = [sys.executable, "-c", "import sys; from llmft.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return train_runs(tmp_path_factory.getbasetemp() / "serve-runs").sft


def start(run, *options):
    """`llmft serve RUN --port 0 ...` in a subprocess, and its URL once it listens."""
    process = subprocess.Popen([*LLMFT, "serve", str(run), "--port", "0", *options], stderr=subprocess.PIPE,
                               text=True)
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return process, found.group(1), lines
        assert line or process.poll() is None, "".join(lines)
    process.kill()
    raise AssertionError("no 'serving ... at URL' line:\n" + "".join(lines))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serves_logs_and_stops_gracefully(sft, stop):
    process, url, lines = start(sft, "--max-tokens", "40")
    try:
        # the curl: a JSON body sent as curl -d sends it (x-www-form-urlencoded)
        body = json.dumps({"model": str(sft), "messages": [{"role": "user", "content": "Name a primary color."}],
                           "stream": True, "max_tokens": 40})
        with httpx.stream("POST", url + "/v1/chat/completions", content=body, timeout=30,
                          headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            assert next(events).startswith("data: {")
            process.send_signal(stop)  # while the answer is being streamed
            rest = [line for line in events if line]
        assert rest[-1] == "data: [DONE]"
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    log = "".join(lines) + err
    assert re.search(r"127\.0\.0\.1 POST /v1/chat/completions 200 \d+ ms \| \d+ prompt \+ \d+ new tokens", log)
    assert "llmft serve: stopped" in log and "Traceback" not in log


def test_cli_errors(sft, capsys, tmp_path):
    assert main(["serve"]) == 2
    assert "serve a run (RUN) or a model (--model NAME)" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a run directory (no run.json); to serve a model, use --model NAME" in capsys.readouterr().err
    assert main(["serve", str(sft), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    taken = listen("127.0.0.1", 0)
    try:
        assert main(["serve", str(sft), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    finally:
        taken.close()
