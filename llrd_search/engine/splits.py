"""Read a study's split files (or a hub dataset) into raw ``datasets`` splits, with a content hash.

A data folder holds one file per split named after it (``train.csv``, ``validation.jsonl``, ...);
problems name the ``data.*`` key and the file to fix (:class:`DataError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from llrd_search.exceptions import DataError
from llrd_search.spec import DataSection

SPLIT_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def split_files(folder: Path) -> dict[str, Path]:
    """A data folder's split files by split name (``train.csv`` → ``train``); two files of one
    split (``train.csv`` and ``train.jsonl``) are an error, not a silent choice of one."""
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix not in SPLIT_SUFFIXES:
            continue
        if f.stem in files:
            raise DataError(
                f"data.path: {files[f.stem].name} and {f.name} in {folder} are both the '{f.stem}' split; "
                "keep one of them (move or rename the other)"
            )
        files[f.stem] = f
    return files


def load_raw_splits(data: DataSection) -> tuple[dict[str, Any], str]:
    """Load the splits as ``datasets.Dataset`` objects plus a content fingerprint of the source."""
    import datasets

    datasets.disable_progress_bars()
    folder = Path(data.path)
    if folder.is_dir():
        files = split_files(folder)
        if data.train_split not in files:
            found = ", ".join(f.name for f in files.values()) or "no csv/json/jsonl/parquet files"
            raise DataError(
                f"data.path: no '{data.train_split}' split file in {folder} (found: {found}); "
                f"name files {data.train_split}.csv / {data.validation_split}.csv / {data.test_split}.csv"
            )
        wanted = {s: files[s] for s in (data.train_split, data.validation_split, data.test_split) if s in files}
        digest = hashlib.sha256()
        splits = {}
        for split, f in wanted.items():
            content = _read(f)
            digest.update(split.encode() + content)
            if f.suffix != ".parquet":
                _check_utf8(content, f)
            if f.suffix == ".csv":
                _check_commas(content, f)
            splits[split] = _load_file(f, split, content)
        return splits, digest.hexdigest()
    if folder.exists() or data.path.startswith((".", "/", "~")):
        missing = "" if folder.exists() else ": it does not exist"
        raise DataError(f"data.path: {data.path} is not a folder{missing} (point it at a folder of split files like train.csv)")
    # A hub dataset id: the real code path for online users; offline it fails with the hub's message.
    try:
        dd = datasets.load_dataset(data.path)
    except Exception as err:
        raise DataError(f"data.path: cannot load dataset '{data.path}' from the hub or a local folder: {err}") from None
    fp = hashlib.sha256(json.dumps({k: v._fingerprint for k, v in dd.items()}, sort_keys=True).encode())
    return dict(dd), fp.hexdigest()


def _read(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as err:  # a symlink loop, a dangling link, no permission
        raise DataError(f"data.path: cannot read {f}: {err.strerror}; point {f.name} at a readable file (ls -l {f})") from None


def _load_file(f: Path, split: str, content: bytes) -> Any:
    """One split file as a Dataset; a parser's failure is one error naming the file and its cause
    (the innermost one: ``datasets`` wraps it in "An error occurred while generating the dataset")."""
    import datasets

    # datasets logs the parser's error itself before raising it: only our line should show.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        return datasets.load_dataset(_BUILDERS[f.suffix], data_files=str(f), split="train")
    except Exception as err:  # pyarrow / csv parser errors: name the file
        if "corresponds to no data" in str(err) or not content.strip():
            raise DataError(f"data.path: the {split} split is empty ({f} has no rows)") from None
        cause: BaseException = err
        while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
            cause = cause.__cause__ or cause.__context__
        reason = " ".join(str(cause).split()).rstrip(".") or type(cause).__name__
        raise DataError(f"data.path: cannot read {f}: {reason}; fix or re-save the file") from None
    finally:
        logger.setLevel(level)


def _check_commas(content: bytes, f: Path) -> None:
    """A tab-separated file saved as .csv: its header has tabs and no comma."""
    header = content.split(b"\n", 1)[0]
    if b"\t" in header and b"," not in header:
        raise DataError(
            f"data.path: {f} is tab-separated (its header has tabs, no commas); save it comma-separated, e.g. "
            f"python -c \"import pandas as p; p.read_csv('{f}', sep='\\t').to_csv('{f}', index=False)\", or as .jsonl"
        )


def _check_utf8(content: bytes, f: Path) -> None:
    """Text split files must be UTF-8; the parser's own error hides the cause behind a generic line."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data.path: {f} is not UTF-8 (byte 0x{content[err.start]:02x} at offset {err.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {f} > utf8{f.suffix} and rename that to {f.name}"
        ) from None


def column(ds: Any, name: str, split: str, key: str) -> list:
    if name not in ds.column_names:
        raise DataError(
            f"data.{key}: column '{name}' not in the {split} split (columns: {', '.join(ds.column_names)}); "
            f"set data.{key} to one of them"
        )
    return ds[name]
