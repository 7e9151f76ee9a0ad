"""Data: map labels, carve a validation split, tokenize once and cache on disk.

The split files themselves are read by :mod:`llrd_search.engine.splits`.

Tokenized splits are stored as flat int32 arrays plus offsets (``.npz``, no pickle) under a key
made of the data's content hash, the data section of the spec, the tokenizer and ``max_length``.
Every trial and every worker process on the machine reuses them instead of re-tokenizing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llrd_search.engine.labels import clean_labels, label_mapping
from llrd_search.engine.splits import column, load_raw_splits, split_files
from llrd_search.exceptions import DataError
from llrd_search.spec import DataSection

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One tokenized split: example i's tokens are ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len n+1
    labels: np.ndarray  # int64
    type_ids: np.ndarray | None = None  # int8, same layout as ids; only for tokenizers that emit them

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, indices: np.ndarray | list[int], pad_id: int) -> dict[str, Any]:
        """Dynamically padded batch (to the longest example in it) as torch tensors."""
        import torch

        idx = np.asarray(indices)
        lens = self.lengths[idx]
        width = int(lens.max())
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        types = np.zeros((len(idx), width), dtype=np.int64) if self.type_ids is not None else None
        for row, (i, n) in enumerate(zip(idx, lens, strict=True)):
            start = self.offsets[i]
            ids[row, :n] = self.ids[start : start + n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = self.type_ids[start : start + n]
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        out["labels"] = torch.from_numpy(self.labels[idx])
        return out


@dataclass
class TaskData:
    train: Encoded
    validation: Encoded
    test: Encoded | None
    id2label: dict[int, str]
    fingerprint: str
    validation_from_train: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


# --------------------------------------------------------------------------- sampling


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded, stratified sample of about ``fraction`` of the rows (sorted).

    Each class keeps its share, and every class with at least 2 rows keeps at least one row.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        n = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            n = min(max(n, 1), len(rows) - 1) if fraction < 1 else len(rows)
        chosen.append(rng.permutation(rows)[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def _limit(n_rows: int, limit: int, labels: np.ndarray, seed: int) -> np.ndarray:
    if limit == 0 or limit >= n_rows:
        return np.arange(n_rows)
    idx = stratified_indices(labels, limit / n_rows, seed)
    return idx[:limit] if len(idx) > limit else idx


# --------------------------------------------------------------------------- tokenize + cache


def cache_dir() -> Path:
    return Path(os.environ.get("LLRD_SEARCH_CACHE", Path.home() / ".cache" / "llrd-search"))


def _tokenizer_id(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"{type(tokenizer).__name__}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def _encode(tokenizer: Any, texts: list[str], pairs: list[str] | None, labels: np.ndarray, max_length: int) -> Encoded:
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False)
    ids = enc["input_ids"]
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    types = None
    if "token_type_ids" in enc and any(any(t) for t in enc["token_type_ids"]):
        types = np.fromiter((t for x in enc["token_type_ids"] for t in x), dtype=np.int8, count=int(offsets[-1]))
    return Encoded(ids=flat, offsets=offsets, labels=labels.astype(np.int64), type_ids=types)


def _save(path: Path, task: TaskData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "validation", "test"):
        enc = getattr(task, split)
        if enc is None:
            continue
        for field in ("ids", "offsets", "labels", "type_ids"):
            if getattr(enc, field) is not None:
                arrays[f"{split}.{field}"] = getattr(enc, field)
    meta = {"id2label": {str(k): v for k, v in task.id2label.items()}, "validation_from_train": task.validation_from_train}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent workers either see a complete file or none.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path, fingerprint: str) -> TaskData:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        splits = {}
        for split in ("train", "validation", "test"):
            if f"{split}.ids" in z:
                splits[split] = Encoded(
                    ids=z[f"{split}.ids"],
                    offsets=z[f"{split}.offsets"],
                    labels=z[f"{split}.labels"],
                    type_ids=z.get(f"{split}.type_ids"),
                )
    return TaskData(
        train=splits["train"],
        validation=splits["validation"],
        test=splits.get("test"),
        id2label={int(k): v for k, v in meta["id2label"].items()},
        fingerprint=fingerprint,
        validation_from_train=meta["validation_from_train"],
    )


def load_task_data(data: DataSection, tokenizer: Any, max_length: int, seed: int, use_cache: bool = True) -> TaskData:
    """Load, split, limit and tokenize the data; reuse the on-disk cache when the inputs match."""
    raw, content_hash = load_raw_splits(data)
    fingerprint = _fingerprint(data, content_hash, tokenizer, max_length, seed)
    path = cache_dir() / "tokenized" / f"{fingerprint}.npz"
    if use_cache and (cached := _from_cache(path, fingerprint)) is not None:
        return cached
    labels = _Labels.of_train(raw, data)
    plan = _split_rows(raw, data, labels.y_train, seed)
    encoded = {name: _encode_split(name, ds, rows, data, labels, tokenizer, max_length, seed) for name, (ds, rows) in plan.items()}
    task = TaskData(
        train=encoded["train"],
        validation=encoded["validation"],
        test=encoded.get("test"),
        id2label=labels.id2label,
        fingerprint=fingerprint,
        validation_from_train=data.validation_split not in raw,
    )
    if use_cache:
        _save(path, task)
    return task


def _fingerprint(data: DataSection, content_hash: str, tokenizer: Any, max_length: int, seed: int) -> str:
    """The cache key: everything the tokenized arrays depend on (the data's content, not its path)."""
    key = {
        "content": content_hash,
        "data": data.model_dump(mode="json", exclude={"path"}),
        "tokenizer": _tokenizer_id(tokenizer),
        "max_length": max_length,
        "seed": seed,
        "version": 2,  # 2: integral float labels map to int classes
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _from_cache(path: Path, fingerprint: str) -> TaskData | None:
    if not path.exists():
        return None
    try:
        task = _load(path, fingerprint)
        log.info("tokenized data from cache %s", path)
        return task
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        # Truncated (disk full, killed copy) or foreign file: the cache is only a shortcut, rebuild it.
        log.warning("tokenized-data cache file %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
        path.unlink(missing_ok=True)
        return None


@dataclass
class _Labels:
    """The train split's classes; reads any split's label column and maps it to their ids."""

    data: DataSection
    sources: dict[str, Path]  # split -> its file, for error messages that name the row
    train_labels: list
    id2label: dict[int, str]
    label2id: dict[str, int] = dataclasses.field(init=False)
    y_train: np.ndarray = dataclasses.field(init=False)  # the train split's label ids, all rows

    def __post_init__(self) -> None:
        self.label2id = {v: k for k, v in self.id2label.items()}
        self.y_train = self.ids(self.train_labels, self.data.train_split)

    @classmethod
    def of_train(cls, raw: dict[str, Any], data: DataSection) -> _Labels:
        train = raw[data.train_split]
        if len(train) == 0:
            raise DataError(f"data.path: the {data.train_split} split is empty")
        sources = split_files(Path(data.path)) if Path(data.path).is_dir() else {}
        train_labels = _read_labels(train, data.train_split, data, sources)
        id2label = label_mapping(train_labels)
        if len(id2label) < 2:
            raise DataError(f"data.label: the {data.train_split} split has a single label ({train_labels[0]!r}); need at least 2 classes")
        if len(id2label) > len(train_labels) / 2:
            # Fewer than two rows a class on average: nothing to learn a class from, let alone to
            # stratify a validation split by; most often data.label names an id or text column.
            raise DataError(
                f"data.label: {len(id2label)} classes in {len(train_labels)} {data.train_split} rows, fewer than 2 rows a class; "
                f"check that data.label names the label column, or merge rare classes"
            )
        return cls(data, sources, train_labels, id2label)

    def read(self, ds: Any, split: str) -> list:
        return _read_labels(ds, split, self.data, self.sources)

    def ids(self, values: list, split: str) -> np.ndarray:
        unseen = sorted({str(v): v for v in values if str(v) not in self.label2id}.items())
        if unseen:
            known = ", ".join(repr(v) for v in sorted(set(self.train_labels), key=str)[:10])
            raise DataError(
                f"data.label: {split} has label(s) {', '.join(repr(v) for _, v in unseen[:5])} never seen in {self.data.train_split} "
                f"(which has {known}; the model cannot learn them; fix the labels or the split)"
            )
        return np.array([self.label2id[str(v)] for v in values], dtype=np.int64)


def _read_labels(ds: Any, split: str, data: DataSection, sources: dict[str, Path]) -> list:
    return clean_labels(column(ds, data.label, split, "label"), split, data.label, sources.get(split))


def _split_rows(raw: dict[str, Any], data: DataSection, y_train: np.ndarray, seed: int) -> dict[str, tuple[Any, np.ndarray | None]]:
    """Split name -> (dataset, its rows): rows of the train split for train and a carved-out
    validation, None for a split read whole from its own file."""
    train = raw[data.train_split]
    if data.validation_split not in raw:
        val_idx = stratified_indices(y_train, data.validation_fraction, seed)
        train_idx = np.setdiff1d(np.arange(len(y_train)), val_idx)
        plan = {"train": (train, train_idx), "validation": (train, val_idx)}
    else:
        plan = {"train": (train, np.arange(len(y_train))), "validation": (raw[data.validation_split], None)}
    if data.test_split in raw:
        plan["test"] = (raw[data.test_split], None)
    elif data.test_fraction > 0:
        # Carved from what is left for training, after validation: disjoint from both, and the
        # validation split is the one the search had without it. Another seed than validation's.
        left = plan["train"][1]
        test_idx = left[stratified_indices(y_train[left], data.test_fraction, seed + 1)]
        plan["train"] = (train, np.setdiff1d(left, test_idx))
        plan["test"] = (train, test_idx)
    return plan


def _encode_split(
    name: str, ds: Any, rows: np.ndarray | None, data: DataSection, labels: _Labels, tokenizer: Any, max_length: int, seed: int
) -> Encoded:
    """Check, limit and tokenize one split (``rows`` as :func:`_split_rows` gives them)."""
    split_name = data.train_split if rows is not None else getattr(data, f"{name}_split")
    texts = column(ds, data.text, split_name, "text")
    pairs = column(ds, data.text_pair, split_name, "text_pair") if data.text_pair else None
    y = labels.y_train if rows is not None else labels.ids(labels.read(ds, split_name), split_name)
    if rows is None:
        rows = np.arange(len(y))
    limit = {"train": data.train_limit, "validation": data.validation_limit, "test": data.test_limit}.get(name, 0)
    n_rows, n_classes = len(rows), len(np.unique(y[rows]))
    rows = rows[_limit(len(rows), limit, y[rows], seed)]
    if len(rows) == 0 and n_rows:  # the subsample, not the split: each class kept its share, rounded to 0 rows
        raise DataError(
            f"data.{name}_limit: a stratified sample of {limit} of the {n_rows} {name} rows is empty ({n_classes} classes, "
            f"each keeps its share of {limit}/{n_rows}, rounded down to 0 rows); raise data.{name}_limit to at least {n_classes} or set it to 0 (all rows)"
        )
    if len(rows) == 0:
        raise DataError(f"data: the {name} split is empty (check the file, data.{name}_limit or data.validation_fraction)")
    bad = [i for i in rows[:50_000] if not isinstance(texts[i], str)]
    if bad:
        raise DataError(f"data.text: row {int(bad[0])} of the {split_name} split has no text ({texts[bad[0]]!r})")
    return _encode(tokenizer, [texts[i] for i in rows], [pairs[i] for i in rows] if pairs is not None else None, y[rows], max_length)
