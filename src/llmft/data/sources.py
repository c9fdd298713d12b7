"""Named public data sets and the readers for labelled text files.

A name (`sms-spam`, `instruction-data`) resolves to a local copy when one exists
(see `llmft.paths.local_data_dirs`), else to a verified download in the cache. Readers
decode strictly and report the file and line of anything they cannot use.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.download import download, md5sum
from llmft.errors import LlmftError
from llmft.paths import cache_dir, find_local


@dataclass(frozen=True)
class NamedDataset:
    url: str
    relative: str  # path of the usable file under a local data folder or the cache
    md5: str | None = None  # of the usable file
    zip_member: str | None = None  # the file inside a downloaded zip


NAMED_DATASETS = {
    "sms-spam": NamedDataset(
        url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        relative="sms-spam-collection/SMSSpamCollection",
        md5="1949b64a224790d01335c2bf8a0e48b2",
        zip_member="SMSSpamCollection",
    ),
    "instruction-data": NamedDataset(
        url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json",
        relative="instruction-data/instruction-data.json",
    ),
    "instruction-data-with-preference": NamedDataset(
        url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
        relative="instruction-data/instruction-data-with-preference.json",
        md5="fd0bb356c59f99c5b6c2d83c24e759cc",
    ),
}


def resolve_data(name_or_path: str) -> Path:
    """A named data set's file (local copy, cache, or download), or an existing path."""
    named = NAMED_DATASETS.get(name_or_path)
    if named is None:
        path = Path(name_or_path)
        if path.is_dir():
            raise LlmftError(f"{path}: is a directory, expected a data file")
        if not path.is_file():
            raise LlmftError(f"{path}: data file not found (or use a name: {', '.join(NAMED_DATASETS)})")
        return path
    if local := find_local(named.relative):
        return local
    cached = cache_dir() / named.relative
    if not cached.is_file():
        if named.zip_member is None:
            download(named.url, named.relative, named.md5)
        else:
            archive = download(named.url, named.relative + ".zip")
            with zipfile.ZipFile(archive) as z:
                cached.write_bytes(z.read(named.zip_member))
    if named.md5 and md5sum(cached) != named.md5:
        cached.unlink()
        raise LlmftError(f"{cached}: checksum mismatch for {name_or_path}; removed, run again to re-download")
    return cached


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (a byte-order mark is skipped); undecodable bytes are
    reported with their line number."""
    if path.is_dir():
        raise LlmftError(f"{path}: is a directory, expected a data file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LlmftError(f"{path}: cannot read ({e.strerror})") from None
    out = []
    for number, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LlmftError(f"{path}, line {number}: not valid UTF-8 (at byte offset {e.start} of the line)") from None
    return out


def json_records(path: Path) -> list[tuple[Any, str]]:
    """(object, where) pairs from a JSON list or a JSON Lines file; `where` names the entry
    (and its line, for JSON Lines) for error messages."""
    lines = read_lines(path)
    text = "\n".join(lines)
    if path.suffix != ".jsonl" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise LlmftError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        else:
            if isinstance(data, dict):
                raise LlmftError(f"{path}: expected a JSON list of objects (or JSON Lines), got one object "
                                 f"with keys {', '.join(map(repr, list(data)[:5]))}")
            return [(obj, f"entry {i}") for i, obj in enumerate(data)]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmftError(f"{path}: invalid JSON at line {number}, column {e.colno}: {e.msg}") from None
        records.append((obj, f"entry {len(records)} (line {number})"))
    return records


def read_labelled_texts(path: Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from JSONL, CSV/TSV with a header row, or header-less
    `label<TAB>text` lines (the SMS Spam Collection's format, read without CSV quoting)."""
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise LlmftError(f"{path}: file is empty")
    if text_column == label_column:
        raise LlmftError(f"--text-column and --label-column are both {text_column!r}: name two columns")
    if path.suffix in (".jsonl", ".json"):
        return _read_json(path, text_column, label_column)
    delimiter = "," if path.suffix == ".csv" else "\t"
    header = next(csv.reader([lines[0]], delimiter=delimiter))
    if text_column in header or label_column in header or path.suffix == ".csv":
        return _read_table(path, lines, delimiter, text_column, label_column)
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            raise LlmftError(f"{path}, line {number}: expected 'label<TAB>text' or a header row "
                             f"naming columns {text_column!r} and {label_column!r}")
        pairs.append(_checked(path, number, text, label))
    return pairs


def _checked(path: Path, where: int | str, text: object, label: object) -> tuple[str, str]:
    """A (text, label) pair; `where` is a line number or an entry description."""
    place = f"{path}, line {where}" if isinstance(where, int) else f"{path}: {where}"
    if not isinstance(text, str) or not text.strip():
        raise LlmftError(f"{place}: empty text")
    if label is None or not str(label).strip():
        raise LlmftError(f"{place}: empty label")
    return text, str(label).strip()


def table_rows(path: Path, lines: list[str], delimiter: str, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) for each data row of a table with a header row that names `columns`."""
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise LlmftError(f"{path}, line 1: missing column(s) {', '.join(map(repr, missing))}; "
                         f"found {', '.join(map(repr, reader.fieldnames or []))} "
                         f"(choose with --text-column/--label-column)")
    rows = []
    for row in reader:
        if None in row:  # DictReader files surplus fields under None
            raise LlmftError(f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields, "
                             f"but the header names {len(reader.fieldnames)} (quote a text that holds "
                             f"{delimiter!r})")
        rows.append((reader.line_num, row))
    if not rows:
        raise LlmftError(f"{path}: has a header row but no data rows")
    return rows


def _read_table(path: Path, lines: list[str], delimiter: str, text_column: str, label_column: str):
    return [_checked(path, number, row[text_column], row[label_column])
            for number, row in table_rows(path, lines, delimiter, (text_column, label_column))]


def _read_json(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    pairs = []
    for row, where in json_records(path):
        if not isinstance(row, dict) or text_column not in row or label_column not in row:
            raise LlmftError(f"{path}: {where}: expected an object with keys {text_column!r} and {label_column!r}")
        pairs.append(_checked(path, where, row[text_column], row[label_column]))
    return pairs
