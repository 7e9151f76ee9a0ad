"""Hugging Face ``Trainer`` integration: report evaluations to the trial and prune from inside it.

Imported on its own (``from llrd_search.hf import PruningCallback``), so ``import llrd_search``
never imports transformers. With ``suggest_param_groups`` for the optimizer, a Trainer script
becomes an llrd-search objective::

    trainer = Trainer(model, args, ..., optimizers=(torch.optim.AdamW(suggest_param_groups(trial, model)), None),
                      callbacks=[pruning := PruningCallback(trial, metric="eval_f1")])
    trainer.train()
    return pruning.best
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llrd_search.exceptions import LLRDSearchError


class PruningCallback(TrainerCallback):
    """Reports each evaluation's ``metric`` to ``trial`` (step = evaluation index 1, 2, ..., like
    the built-in loop, so the pruner's resources are evaluations) and ends the trial PRUNED when
    the pruner says so.

    Pruning raises ``optuna.TrialPruned`` out of ``trainer.train()``, as the Trainer's own
    ``hyperparameter_search`` does: the worker records the trial as PRUNED, not FAIL. The
    evaluations are kept in the trial's ``evals`` user attr; ``best`` is the best value seen
    (the study maximizes), the natural return value of the objective.
    """

    def __init__(self, trial: optuna.Trial, metric: str = "eval_accuracy"):
        self.trial = trial
        self.metric = metric
        self.evals: list[dict[str, Any]] = []
        self.best: float | None = None
        self._named = False

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        metrics = metrics or {}
        if self.metric not in metrics:
            raise LLRDSearchError(
                f"PruningCallback(metric='{self.metric}'): the evaluation returned no such metric "
                f"(it has {', '.join(sorted(metrics)) or 'none'}); pass one of those, e.g. 'eval_' + a key of your compute_metrics"
            )
        value = float(metrics[self.metric])
        if math.isnan(value):
            raise LLRDSearchError(f"PruningCallback: {self.metric} is NaN at step {state.global_step}")
        self.evals.append({"eval": len(self.evals) + 1, "step": state.global_step, self.metric: value})
        self.best = value if self.best is None else max(self.best, value)
        if not self._named:
            self._name_metric()
        self.trial.report(value, len(self.evals))
        self.trial.set_user_attr("evals", self.evals)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", state.global_step)
            control.should_training_stop = True
            raise optuna.TrialPruned(f"pruned at evaluation {len(self.evals)} ({self.metric} {value:.4f})")

    def _name_metric(self) -> None:
        """Name the study's metric after ``metric`` (e.g. ``eval_f1``), so the report, export and
        optuna-dashboard label values by it rather than by the study file's ``train.metric``."""
        from llrd_search.engine.metrics import set_study_metric

        self._named = True
        study = getattr(self.trial, "study", None)  # a FixedTrial has no study
        if study is not None and list(getattr(study, "metric_names", None) or []) != [self.metric]:
            set_study_metric(study, self.metric)
