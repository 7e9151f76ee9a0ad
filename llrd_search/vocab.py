"""The words every module shares: the searched parameter names, the ``llrd:*`` attribute keys
kept on studies and trials, and what "finished" and "best" mean for a list of Optuna trials.

One place for each word, so a key is never typed twice and a count is never computed two ways.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from optuna.trial import FrozenTrial, TrialState

# The three searched hyperparameters, in the order tables and files list them.
PARAMS = ("base_lr", "head_lr", "decay")

ATTR_PREFIX = "llrd:"  # every attribute llrd-search keeps on a study or trial starts so

# Study user attrs.
SPEC_ATTR = "llrd:spec"  # the validated spec, as JSON (without study.storage)
FINGERPRINT_ATTR = "llrd:fingerprint"  # the spec's identity, written first by a create
BUDGET_ATTR = "llrd:n_trials"  # the study-wide trial budget
CONTROL_STUDY_ATTR = "llrd:control_study"  # on the parent: the control arm's study name
PARENT_ATTR = "llrd:arm_of"  # on the control arm's study: its parent's name
CONFIRM_ATTR = "llrd:confirm"  # the confirmation plan (JSON)

# Trial user attrs.
ENQUEUED_ATTR = "llrd:enqueued"  # why a trial was queued (paper point, confirm, ...)
RETRY_OF_ATTR = "llrd:retry_of"  # the number of the dead trial this one retries
SEED_ATTR = "llrd:seed"  # the training seed a queued trial must use
ARM_ATTR = "llrd:arm"  # "control" on the control arm's trials
CONFIRM_OF_ATTR = "llrd:confirm_of"  # the source trial a confirmation run repeats
CONFIRM_REP_ATTR = "llrd:confirm_rep"  # which repeat of it
SWEEP_ATTR = "llrd:sweep"  # the ξ of a decay-sweep run (absent on other confirmation runs)
TEST_ATTR = "llrd:test_score"  # a confirmation run's score on the held-out test split (never ranked by)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def is_finished(state: TrialState) -> bool:
    """COMPLETE or PRUNED: a trial that counts against the budget."""
    return state in FINISHED_STATES


def finished_count(trials: Iterable[FrozenTrial]) -> int:
    return sum(is_finished(t.state) for t in trials)


def completed(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The COMPLETE trials that hold a value."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]


def best_trial(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The COMPLETE trial with the highest value (every study maximises), or None."""
    done = completed(trials)
    return max(done, key=lambda t: t.value) if done else None


def state_counts(trials: Iterable[FrozenTrial]) -> dict[str, Any]:
    """Trials per state name, in the order they first appear (as ``status`` prints them)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def training_seed(user_attrs: dict[str, Any], seed: int, trial_seed_offset: int, number: int) -> int:
    """The seed trial ``number`` trains with: the one it was queued with (``llrd:seed``: a paired
    confirmation run, a retry), else ``study.seed + trial_seed_offset + number``."""
    queued = user_attrs.get(SEED_ATTR)
    return int(queued) if queued is not None else seed + trial_seed_offset + number
