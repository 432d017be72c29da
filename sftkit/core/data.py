"""Loading rows of data: JSONL, JSON, CSV, TSV, a list of dicts, or a ``datasets.Dataset``.

Errors name the file and line. Splits are deterministic for a seed.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError


class DataError(ConfigError):
    """The data can't be read; the message names the file, line or row."""


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path.name}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from exc


def load_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows: list[dict] = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: line {n} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path.name}: line {n} is a JSON {type(obj).__name__}, expected an object with fields")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path.name} has no rows")
    return rows


def load_json(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}: line {exc.lineno} is not valid JSON ({exc.msg})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path.name}: expected a JSON list of objects")
    return rows_from_list(obj, source=path.name)


def load_csv(path: str | Path, delimiter: str = ",") -> list[dict]:
    """Rows of a CSV file with a header row (``delimiter="\t"`` for TSV)."""
    path = Path(path)
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path.name} has no header row")
    rows: list[dict] = []
    for row in reader:
        if None in row:
            raise DataError(
                f"{path.name}: line {reader.line_num} has more values than the header's "
                f"{len(reader.fieldnames)} columns"
            )
        if any(v is None for v in row.values()):
            raise DataError(
                f"{path.name}: line {reader.line_num} has fewer values than the header's "
                f"{len(reader.fieldnames)} columns"
            )
        rows.append(dict(row))
    if not rows:
        raise DataError(f"{path.name} has no rows")
    return rows


def load_tsv(path: str | Path) -> list[dict]:
    """Rows of a tab-separated file with a header row."""
    return load_csv(path, delimiter="\t")


def rows_from_list(items: Sequence[Any], source: str = "data") -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{source}: row {i} is a {type(item).__name__}, expected a dict of fields")
        rows.append(dict(item))
    if not rows:
        raise DataError(f"{source} has no rows")
    return rows


def load_rows(source: Any) -> list[dict]:
    """Rows as a list of dicts from a path (.jsonl/.json/.csv/.tsv), a list of dicts, or a Dataset."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"data file {str(source)!r} not found")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return load_jsonl(path)
        if suffix == ".json":
            return load_json(path)
        if suffix == ".csv":
            return load_csv(path)
        if suffix == ".tsv":
            return load_tsv(path)
        raise DataError(f"data file {path.name}: unknown type {suffix!r}; allowed: .jsonl, .json, .csv, .tsv")
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return rows_from_list(source.to_list(), source="dataset")
    if isinstance(source, (list, tuple)):
        return rows_from_list(source)
    raise DataError(
        f"can't read data from a {type(source).__name__}; pass a .jsonl/.json/.csv/.tsv path, a list "
        "of dicts, or a datasets.Dataset"
    )


def split_rows(rows: Sequence[dict], eval_fraction: float = 0.2, seed: int = 0,
               eval_size: int | None = None) -> tuple[list[dict], list[dict]]:
    """A shuffled train/eval split, the same for the same rows and seed."""
    if eval_size is None:
        if not 0.0 <= eval_fraction < 1.0:
            raise DataError(f"eval_fraction={eval_fraction} is outside [0, 1)")
        eval_size = int(round(len(rows) * eval_fraction))
    if not 0 <= eval_size < len(rows):
        raise DataError(f"eval_size={eval_size} must be between 0 and {len(rows) - 1} for {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:eval_size])
    train = [dict(rows[i]) for i in range(len(rows)) if i not in eval_idx]
    evals = [dict(rows[i]) for i in sorted(eval_idx)]
    return train, evals
