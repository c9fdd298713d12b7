"""Progress bars: tqdm on a terminal; elsewhere (a log file, CI, a pipe) a plain line now and
then instead of one redraw per refresh.

Every bar in llmft is made by `progress_bar`. When stderr is not a terminal, a bar writes a line
only after `LINE_SECONDS` have passed and another `LINE_PERCENT` of its total is done (both:
at most about 100 / LINE_PERCENT lines however long it runs), each line ending in a newline
rather than tqdm's carriage-return redraws.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

from tqdm import tqdm

LINE_SECONDS = 5.0
LINE_PERCENT = 5


class LineStream:
    """A stream for a bar off the terminal: each status tqdm writes becomes one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        status = text.replace("\r", "").strip()
        if status:
            self.stream.write(status + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, writing plain lines now and then when stderr is not a
    terminal (see the module docstring)."""
    stream = options.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **options)
    total = options.get("total")
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    options.update(file=LineStream(stream), mininterval=LINE_SECONDS, maxinterval=math.inf, dynamic_ncols=False,
                   miniters=max(1, math.ceil((total or 0) * LINE_PERCENT / 100)), ascii=True)
    return tqdm(iterable, **options)
