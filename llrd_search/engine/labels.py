"""Labels: clean a label column (missing labels are errors, integral floats are ints) and number the classes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llrd_search.exceptions import DataError

__all__ = ["clean_labels", "label_mapping"]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def clean_labels(values: Any, split: str, column: str, source: Path | None = None) -> list:
    """The label column as a list, ready for :func:`label_mapping`.

    A missing label (empty cell, null, NaN, blank string) raises :class:`DataError` naming the split,
    the 1-based data row (of ``source`` when known) and the column: left alone, it would become a class
    of its own. When every float in the column is integral (``1.0``: pandas reads an int column with
    an empty cell as float), the floats become ints, so ``1.0`` and ``1`` are the same class.
    """
    values = list(values)
    missing = [i for i, v in enumerate(values) if _missing(v)]
    if missing:
        where = f" of {source}" if source is not None else ""
        count = f"; {len(missing)} rows have none" if len(missing) > 1 else ""
        raise DataError(
            f"data.label: the {split} split has no label in column {column!r} at row {missing[0] + 1}{where} "
            f"(1-based, not counting the header; value {values[missing[0]]!r}){count}; fill in the labels or drop those rows"
        )
    floats = [v for v in values if isinstance(v, (float, np.floating))]
    if floats and all(float(v).is_integer() for v in floats):
        values = [int(v) if isinstance(v, (float, np.floating)) else v for v in values]
    return values


def label_mapping(train_labels: list) -> dict[int, str]:
    """id → label name. Ints 0..K-1 keep their ids; anything else is sorted and numbered."""
    values = sorted(set(train_labels), key=lambda v: (str(type(v)), v))
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) and values == list(range(len(values))):
        return {int(v): str(v) for v in values}
    return {i: str(v) for i, v in enumerate(values)}
