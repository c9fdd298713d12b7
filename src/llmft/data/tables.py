"""Files of rows for batch prediction: texts in (CSV/TSV with a header row, JSON Lines or a JSON
list of objects, or plain text, one text a line), rows out (CSV or JSON Lines, written
atomically), every input field kept."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from llmft.data.sources import json_records, read_lines, table_rows
from llmft.errors import LlmftError
from llmft.rundir import atomic_write_text

OUT_SUFFIXES = (".csv", ".jsonl")


def read_text_rows(path: Path, text_column: str = "text") -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of `path` and the text of each (its `text_column`; a plain text file's rows are
    {text_column: line}, blank lines skipped). An empty or missing text is an error naming its line."""
    path = Path(path)
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise LlmftError(f"{path}: file is empty")
    if path.suffix in (".csv", ".tsv"):
        places = table_rows(path, lines, "," if path.suffix == ".csv" else "\t", (text_column,))
        places = [(f"line {number}", row) for number, row in places]
    elif path.suffix in (".jsonl", ".json"):
        places = [(where, row) for row, where in json_records(path)]
    else:
        places = [(f"line {number}", {text_column: line}) for number, line in enumerate(lines, 1) if line.strip()]
    texts = []
    for where, row in places:
        text = row.get(text_column) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise LlmftError(f"{path}, {where}: no text in {text_column!r} (choose the column with --text-column)")
        texts.append(text)
    return [row for _, row in places], texts


def check_out(path: Path, source: Path) -> None:
    """Fail before any work on an output that cannot be written as asked."""
    if Path(path).suffix not in OUT_SUFFIXES:
        raise LlmftError(f"--out {path}: write .csv or .jsonl")
    if Path(path).resolve() == Path(source).resolve():
        raise LlmftError(f"--out {path}: is the input file; choose another name")
    if not Path(path).resolve().parent.is_dir():
        raise LlmftError(f"--out {path}: folder {Path(path).parent} does not exist")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as CSV (the columns in order of first appearance) or JSON Lines, by `path`'s suffix."""
    if Path(path).suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
