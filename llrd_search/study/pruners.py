"""Pruners that never leave a study (an arm) without a COMPLETE trial, and the study file's choice of one.

Hyperband compares a trial against its bracket; in a small arm (the ξ = 1 control gets a quarter of
the budget) it can prune every trial, and the arm then has no best to compare with. These
subclasses prune nothing while their study has no COMPLETE trial, then behave as their base class.
They stay instances of Optuna's classes, so TPE still filters trials by Hyperband bracket.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from llrd_search.spec import StudySpec


class _KeepOneComplete:
    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return False
        return super().prune(study, trial)  # type: ignore[misc]


class GuardedHyperbandPruner(_KeepOneComplete, optuna.pruners.HyperbandPruner):
    """HyperbandPruner that prunes nothing until its study has a COMPLETE trial."""


class GuardedMedianPruner(_KeepOneComplete, optuna.pruners.MedianPruner):
    """MedianPruner that prunes nothing until its study has a COMPLETE trial."""


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    # Intermediate steps are evaluation indices (1, 2, ...), so resources are "evaluations".
    n_evals = spec.train.epochs * spec.train.evals_per_epoch
    # Guarded: nothing is pruned until the study (each arm) has a COMPLETE trial, so no arm ends empty.
    if spec.study.pruner == "hyperband" and n_evals >= 3:
        return GuardedHyperbandPruner(min_resource=1, max_resource=n_evals, reduction_factor=3)
    if spec.study.pruner in ("median", "hyperband"):
        return GuardedMedianPruner(n_startup_trials=4, n_warmup_steps=1)
    return optuna.pruners.NopPruner()
