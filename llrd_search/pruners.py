"""Pruners that never leave a study (an arm) without a COMPLETE trial.

Hyperband compares a trial against its bracket; in a small arm (the ξ = 1 control gets a quarter of
the budget) it can prune every trial, and the arm then has no best to compare with. These
subclasses prune nothing while their study has no COMPLETE trial, then behave as their base class.
They stay instances of Optuna's classes, so TPE still filters trials by Hyperband bracket.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState


class _KeepOneComplete:
    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return False
        return super().prune(study, trial)  # type: ignore[misc]


class GuardedHyperbandPruner(_KeepOneComplete, optuna.pruners.HyperbandPruner):
    """HyperbandPruner that prunes nothing until its study has a COMPLETE trial."""


class GuardedMedianPruner(_KeepOneComplete, optuna.pruners.MedianPruner):
    """MedianPruner that prunes nothing until its study has a COMPLETE trial."""
