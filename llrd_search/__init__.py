"""llrd-search: find the best layer-wise learning-rate decay (LLRD) for fine-tuning BERT-like encoders.

The public names are imported lazily so that ``llrd-search --help`` and ``status`` do not pay for
importing torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_param_groups": "llrd_search.engine.param_groups",
    "group_table": "llrd_search.engine.param_groups",
    "layer_lrs": "llrd_search.engine.param_groups",
    "load_spec": "llrd_search.spec",
    "load_config": "llrd_search.results.export",
    "StudySpec": "llrd_search.spec",
    "LLRDSearchError": "llrd_search.exceptions",
    "suggest_param_groups": "llrd_search.engine.user_objective",
    "trial_seed": "llrd_search.engine.user_objective",
    "arm_of": "llrd_search.study.arms",
    "study_metric_name": "llrd_search.engine.metrics",
    # The search layer: what the CLI calls, for scripts of your own.
    "create": "llrd_search.search",
    "run": "llrd_search.search",
    "join": "llrd_search.search",
    "status": "llrd_search.search",
    "summary": "llrd_search.search",
    "confirm": "llrd_search.search",
    "report": "llrd_search.search",
    "export": "llrd_search.search",
    "train": "llrd_search.search",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llrd_search' has no attribute {name!r}")
