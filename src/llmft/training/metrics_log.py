"""Metrics appended as they happen, to CSV and JSONL side by side."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Rows of one table. The CSV header is fixed by the first row; the JSONL keeps every key."""

    def __init__(self, csv_path: Path) -> None:
        self.csv_path = Path(csv_path)
        self.jsonl_path = self.csv_path.with_suffix(".jsonl")
        self.fields: list[str] | None = None

    def append(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
