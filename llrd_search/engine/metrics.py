"""The validation metric a study maximizes, and the name it goes by in the study.

The built-in loop scores each evaluation with ``[train] metric`` (accuracy, f1, f1_macro, mcc;
all maximized) via scikit-learn. The name is stored as the study's Optuna metric name
(``set_metric_names``), so optuna-dashboard, ``report`` and ``export`` label the value by it;
:func:`study_metric_name` reads it back for any study, including one run by a user objective
whose metric is e.g. ``eval_f1``.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from llrd_search.exceptions import DataError

# name -> what it is (the README and errors quote these)
METRICS: dict[str, str] = {
    "accuracy": "share of correct predictions",
    "f1": "F1 of the positive class (label id 1); binary tasks only",
    "f1_macro": "unweighted mean of the per-class F1 scores",
    "mcc": "Matthews correlation coefficient (multi-class generalisation for more than 2 classes)",
}
BINARY_ONLY = frozenset({"f1"})
DEFAULT_METRIC = "accuracy"


def check_metric(metric: str, num_labels: int) -> None:
    """Refuse a metric the task cannot have (binary F1 on a multi-class task), naming ``train.metric``."""
    if metric not in METRICS:
        raise DataError(f"train.metric: unknown metric '{metric}' (choose one of {', '.join(METRICS)})")
    if metric in BINARY_ONLY and num_labels != 2:
        raise DataError(
            f"train.metric: '{metric}' needs a binary task but the data has {num_labels} classes; "
            "use 'f1_macro' or 'mcc' (or 'accuracy')"
        )


def score(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """``metric`` of ``predictions`` against ``labels`` (label ids; id 1 is f1's positive class)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if metric == "accuracy":
        return float((predictions == labels).mean()) if len(labels) else 0.0
    from sklearn.metrics import f1_score, matthews_corrcoef

    with warnings.catch_warnings():
        # A class never predicted (common early in training) has F1 0: that is the score, not a problem.
        warnings.simplefilter("ignore")
        if metric == "f1":
            return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
        if metric == "f1_macro":
            # Over the classes in the labels or the predictions (scikit-learn's default): a class
            # absent from a small validation split and never predicted does not count as F1 0.
            return float(f1_score(labels, predictions, average="macro", zero_division=0))
        if metric == "mcc":
            return float(matthews_corrcoef(labels, predictions))
    raise DataError(f"train.metric: unknown metric '{metric}' (choose one of {', '.join(METRICS)})")


def set_study_metric(study: Any, name: str) -> None:
    """Name the study's objective (optuna-dashboard shows it instead of "Objective 0")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning on Optuna 3.2-5
        study.set_metric_names([name])


def study_metric_name(study: Any) -> str:
    """The name of what ``study`` maximizes: its Optuna metric name, else the stored spec's
    ``train.metric`` (studies made before metric names were set), else ``"accuracy"``."""
    names = getattr(study, "metric_names", None)
    if names:
        return str(names[0])
    from llrd_search.vocab import SPEC_ATTR

    raw = study.user_attrs.get(SPEC_ATTR)
    if raw:
        try:
            return str(json.loads(raw).get("train", {}).get("metric") or DEFAULT_METRIC)
        except (ValueError, AttributeError):
            pass
    return DEFAULT_METRIC
