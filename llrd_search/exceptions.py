"""Every error llrd-search raises on purpose derives from :class:`LLRDSearchError`.

The library raises; only the CLI turns these into a one-line ``Error: ...`` and an exit code, so
callers embedding llrd-search get real exceptions they can catch by type.
"""

from __future__ import annotations


class LLRDSearchError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code = 1


class SpecError(LLRDSearchError):
    """The study file (or a spec stored in a study) is invalid.

    ``problems`` holds every problem found, each as ``"key.path: message"``, so all of them can be
    reported at once instead of one per run.
    """

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class DataError(LLRDSearchError):
    """The dataset cannot be used: missing folder, split, column, empty split, unseen label..."""

    exit_code = 2


class ModelError(LLRDSearchError):
    """The model cannot be loaded or its encoder layers cannot be mapped to LR groups."""

    exit_code = 2


class ParamGroupError(ModelError):
    """Parameter groups do not cover every trainable parameter exactly once."""


class StorageError(LLRDSearchError):
    """The study storage is unreachable, refuses us, or holds something we did not expect."""

    exit_code = 3


class StudyConflictError(StorageError):
    """A study with this name exists but was created from a different spec."""


class StudyNotFoundError(StorageError):
    """No study with this name in the storage."""


class NoCompleteTrialError(StorageError):
    """The study exists but has no complete trial yet (export, confirm): wait for the search, like
    for a storage that is not ready, hence the storage exit code."""


class TrainingError(LLRDSearchError):
    """A trial could not train (out of memory, ...). Ends that trial, not the worker."""


class DivergedError(TrainingError):
    """The training loss became non-finite or climbed far above its start (:mod:`divergence`).
    In a search the trial ends PRUNED with the reason in its ``diverged`` user attr."""


class OutOfMemoryError(TrainingError):
    """A trial's step did not fit in the device's memory; the message names the batch that did not
    and the keys that make it fit (batch size, accumulation, checkpointing). Ends the trial (FAIL);
    the same batch never fits, so a worker seeing it on several trials in a row stops
    (``study.max_consecutive_failures``)."""


class RepeatedFailureError(LLRDSearchError):
    """A worker saw the same error on several trials in a row and stopped instead of burning the budget."""

    exit_code = 4


class ObjectiveError(LLRDSearchError):
    """A user objective (``--objective`` / ``train.objective``) cannot be imported or called."""

    exit_code = 2
