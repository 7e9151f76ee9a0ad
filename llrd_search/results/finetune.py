"""``llrd-search train``: fine-tune once with an exported config and save a ready-to-use model.

Same data loading, model template and training loop as a search trial, but on the full training
data (``train_limit`` and ``validation_limit`` reset to 0 unless asked), then ``save_pretrained``
of the final model and tokenizer (``id2label`` in its config) plus ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llrd_search.exceptions import DataError, LLRDSearchError, SpecError
from llrd_search.results.export import LLRDConfig, _versions, load_config
from llrd_search.spec import DataSection, ModelSection, TrainSection


def _section(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        problems = [f"{prefix}.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()]
        raise SpecError(source, problems) from None


def settings(cfg: LLRDConfig, *, epochs: int | None = None, train_limit: int | None = None) -> tuple[ModelSection, DataSection, TrainSection]:
    """The config's model, data and train sections for a full run (all data unless ``train_limit``)."""
    model = _section(ModelSection, cfg.model, "model", cfg.source)
    data = _section(DataSection, {**cfg.data, "train_limit": train_limit or 0, "validation_limit": 0}, "data", cfg.source)
    train = _section(TrainSection, {**cfg.train, **({"epochs": epochs} if epochs else {})}, "train", cfg.source)
    return model, data, train


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LLRDSearchError(f"--out: {out} is a file; pass a folder for the model")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LLRDSearchError(f"--out: {out} is not empty; pick a new folder or pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)


def train_from_config(
    config: str | Path | LLRDConfig,
    out: str | Path,
    *,
    epochs: int | None = None,
    train_limit: int | None = None,
    force: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune with ``config``, save model + tokenizer + ``metrics.json`` into ``out``; return the metrics.

    The saved model is the one at the end of training (the schedule decays the LR to 0); the
    validation accuracy is measured on it, the test accuracy too when the data has a test split.
    """
    from llrd_search.engine.data import load_task_data
    from llrd_search.engine.model import fresh_model, load_template, load_tokenizer
    from llrd_search.engine.train import evaluate, pick_device, pick_precision, train_and_evaluate

    t_start = time.perf_counter()
    cfg = config if isinstance(config, LLRDConfig) else load_config(config)
    model_sec, data_sec, train_sec = settings(cfg, epochs=epochs, train_limit=train_limit)
    out = Path(out)
    _prepare_out(out, force)

    tokenizer = load_tokenizer(model_sec)
    task = load_task_data(data_sec, tokenizer, model_sec.max_length, cfg.seed)
    if cfg.id2label and task.id2label != cfg.id2label:
        raise DataError(
            f"data: the labels are now {task.id2label}, the config was exported with {cfg.id2label}; "
            "the data changed since the search"
        )
    template = load_template(model_sec, task.id2label, tokenizer)
    model = fresh_model(template, cfg.seed)
    groups = cfg.param_groups(model)
    device = pick_device(train_sec.device)
    dtype = pick_precision(train_sec.precision, device)
    pad_id = tokenizer.pad_token_id or 0
    result = train_and_evaluate(model, task, groups, train_sec, seed=cfg.seed, pad_id=pad_id, device=device, dtype=dtype, on_step=on_step)

    def measure(split: Any, metric: str = "accuracy") -> float | None:
        if split is None:
            return None
        return evaluate(model, split, pad_id=pad_id, batch_size=train_sec.eval_batch_size, device=device, dtype=dtype, metric=metric)

    metric = train_sec.metric
    metrics = {
        "validation_accuracy": measure(task.validation),
        "test_accuracy": measure(task.test),
        "metric": metric,  # train.metric: what the search maximized and the evaluations below report
        "validation_score": None,
        "test_score": None,
        f"best_validation_{metric}_during_training": result.best_score,
        "evals": [{"step": s, metric: a} for s, a in result.evals],
        "validation_from_train": task.validation_from_train,
        "n_train": len(task.train),
        "n_validation": len(task.validation),
        "n_test": len(task.test) if task.test is not None else 0,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 2),
        "eval_seconds": round(result.eval_seconds, 2),
        "train_examples_per_second": round(result.examples_per_second, 2),
        "device": str(device),
        "precision": "bf16" if dtype is not None else "fp32",
        "config": {
            "source": cfg.source,
            "study": cfg.study,
            "trial": cfg.trial,
            "seed": cfg.seed,
            "base_lr": cfg.base_lr,
            "head_lr": cfg.head_lr,
            "decay": cfg.decay,
            "model": model_sec.model_dump(mode="json"),
            "data": data_sec.model_dump(mode="json"),
            "train": train_sec.model_dump(mode="json"),
        },
        "versions": _versions(),
    }
    for split in ("validation", "test"):  # accuracy is measured above already
        metrics[f"{split}_score"] = metrics[f"{split}_accuracy"] if metric == "accuracy" else measure(getattr(task, split), metric)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
