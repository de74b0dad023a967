"""Reading raw records from every source users bring, with where each came from.

A record is (location, dict): the location names the file and line (or index) so that every
report can point at it. File-level problems (unreadable file, bad JSON line, undecodable bytes)
are returned as defects, not raised, so that the validation policy decides.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..assets import BUILTIN_DATASETS, BUILTIN_PREFIX, champ_pairs
from ..errors import UserError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the record and the field."""

    kind = "data"


@dataclass(frozen=True)
class Defect:
    location: str
    field: str | None
    problem: str

    def __str__(self) -> str:
        where = f"{self.location}: field '{self.field}'" if self.field else self.location
        return f"{where}: {self.problem}"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open_binary(path) as handle:
        for line_no, line in enumerate(handle, 1):
            yield line_no, line


def _read_text(path: Path, defects: list, encoding: str = "utf-8") -> str | None:
    """The whole (decompressed) file as text, or None with a defect for undecodable bytes."""
    with _open_binary(path) as handle:
        raw = handle.read()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        defects.append(Defect(str(path), None, f"undecodable bytes (not UTF-8) at byte {err.start}"))
        return None


def _read_jsonl(path: Path, records: list, defects: list) -> None:
    for line_no, raw in _open_text_lines(path):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            defects.append(Defect(where, None, f"undecodable bytes (not UTF-8) at byte {err.start}"))
            continue
        if not line.strip():
            continue
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            defects.append(Defect(where, None, f"not valid JSON ({err.msg} at column {err.colno})"))


def _read_json(path: Path, records: list, defects: list) -> None:
    text = _read_text(path, defects)
    if text is None:
        return
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        defects.append(Defect(f"{path}:{err.lineno}", None, f"not valid JSON ({err.msg})"))
        return
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
        loaded = loaded["data"]
    if not isinstance(loaded, list):
        defects.append(Defect(str(path), None, 'expected a JSON list of records (or {"data": [...]})'))
        return
    records.extend((f"{path}[{i}]", record) for i, record in enumerate(loaded))


def _read_csv(path: Path, records: list, defects: list) -> None:
    text = _read_text(path, defects, encoding="utf-8-sig")  # tolerate a byte-order mark
    if text is None:
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:  # line numbers count the header as line 1
        records.append((f"{path}:{reader.line_num}", dict(row)))


def _read_parquet(path: Path, records: list, defects: list) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    records.extend((f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist()))


READERS = {
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".json": _read_json,
    ".json.gz": _read_json,
    ".csv": _read_csv,
    ".csv.gz": _read_csv,
    ".parquet": _read_parquet,
}


def _read_file(path: Path, records: list, defects: list) -> None:
    reader = READERS.get(_suffix(path))
    if reader is None:
        defects.append(Defect(str(path), None, f"unsupported file type (use one of {', '.join(FILE_SUFFIXES)})"))
        return
    try:
        reader(path, records, defects)
    except (OSError, EOFError) as err:  # unreadable, truncated gzip, permissions
        defects.append(Defect(str(path), None, f"unreadable file ({err})"))
    except Exception as err:  # a corrupt Parquet or CSV file: name it, keep the rest
        defects.append(Defect(str(path), None, f"unreadable file ({type(err).__name__}: {err})"))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_datasets(dataset, name: str, split: str, records: list) -> None:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{name}: no split '{split}' (it has {', '.join(dataset)}); set data.split or data.eval_split"
            )
        dataset = dataset[split]
    records.extend((f"{name}[{split}][{i}]", row) for i, row in enumerate(dataset))


def read_records(source: str, split: str = "train") -> tuple[list[tuple[str, object]], list[Defect]]:
    """All raw records of a source (builtin:NAME, a file, a folder of files, a saved dataset or a
    Hugging Face dataset name), plus file-level defects."""
    records: list[tuple[str, object]] = []
    defects: list[Defect] = []
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            raise DataError(f"unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
        return [(f"champ:{pair['id']}", pair) for pair in champ_pairs()], defects
    path = Path(source)
    if path.is_dir():
        if _is_saved_dataset(path):
            from datasets import load_from_disk

            _read_datasets(load_from_disk(str(path)), str(path), split, records)
            return records, defects
        files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: a folder with no data files ({', '.join(FILE_SUFFIXES)}) and not a saved dataset")
        for file in files:
            _read_file(file, records, defects)
        return records, defects
    if path.is_file():
        _read_file(path, records, defects)
        return records, defects
    if path.suffix or source.startswith((".", "/")) or source.count("/") > 1:
        raise DataError(f"{source}: no such file or folder")
    try:  # a Hugging Face dataset name (needs network, or the local hub cache)
        from datasets import load_dataset

        dataset = load_dataset(source, split=split)
    except Exception as err:
        raise DataError(
            f"{source}: not a local file or folder, and loading it as a Hugging Face dataset "
            f"failed ({type(err).__name__}: {err}). Offline? Save it with "
            f"datasets' save_to_disk and point data.source at that folder"
        ) from None
    _read_datasets(dataset, source, split, records)
    return records, defects
