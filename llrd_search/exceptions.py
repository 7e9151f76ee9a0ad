"""Every error llrd-search raises on purpose derives from :class:`LLRDSearchError`.

The library raises; only the CLI turns these into a one-line ``Error: ...`` and an exit code, so
callers embedding llrd-search get real exceptions they can catch by type.

Exit codes of ``llrd-search`` (each class below says its own in its docstring, "Exit code N"):

* 0: done;
* 1: :class:`LLRDSearchError` itself and :class:`TrainingError` (what a command cannot do: a bad
  ``--out``, a flag value the library refuses, such as ``--decay-sweep 1.5``), and ``run``/``confirm``
  with no finished trial to report;
* 2: the input is wrong: :class:`SpecError`, :class:`DataError`, :class:`ModelError`,
  :class:`ObjectiveError`, :class:`UsageError` (an argument argparse refuses, or one the CLI
  refuses before the command starts);
* 3: the storage: :class:`StorageError` (unreachable, missing file, no such study, conflict);
* 4: :class:`RepeatedFailureError` (a worker stopped after the same error on several trials);
* 130: interrupted (Ctrl-C or SIGTERM); running trials are marked FAIL, not lost.
"""

from __future__ import annotations


class LLRDSearchError(Exception):
    """Base class: a problem the user can fix, with a message that says how. Exit code 1."""

    exit_code = 1


class SpecError(LLRDSearchError):
    """The study file (or a spec stored in a study) is invalid.

    ``problems`` holds every problem found, each as ``"key.path: message"``, so all of them can be
    reported at once instead of one per run. Exit code 2.
    """

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class DataError(LLRDSearchError):
    """The dataset cannot be used: missing folder, split, column, empty split, unseen label... Exit code 2."""

    exit_code = 2


class ModelError(LLRDSearchError):
    """The model cannot be loaded, has no tokenizer, or is not an encoder whose layers map to LR groups. Exit code 2."""

    exit_code = 2


class ParamGroupError(ModelError):
    """Parameter groups do not cover every trainable parameter exactly once. Exit code 2."""


class StorageError(LLRDSearchError):
    """The study storage is unreachable, refuses us, is a SQLite file that does not exist (for a
    command that only reads), or holds something we did not expect. Exit code 3."""

    exit_code = 3


class StudyConflictError(StorageError):
    """A study with this name exists but was created from a different spec. Exit code 3."""


class StudyNotFoundError(StorageError):
    """No study with this name in the storage. Exit code 3."""


class NoCompleteTrialError(StorageError):
    """The study exists but has no complete trial yet (export, confirm): wait for the search, like
    for a storage that is not ready, hence the storage exit code: 3."""


class TrainingError(LLRDSearchError):
    """A trial could not train (out of memory, ...). Ends that trial, not the worker; exit code 1
    where it ends a command (``train``)."""


class DivergedError(TrainingError):
    """The training loss became non-finite or climbed far above its start (:mod:`divergence`).
    In a search the trial ends PRUNED with the reason in its ``diverged`` user attr. Exit code 1 (``train``)."""


class OutOfMemoryError(TrainingError):
    """A trial's step did not fit in the device's memory; the message names the batch that did not
    and the keys that make it fit (batch size, accumulation, checkpointing). Ends the trial (FAIL);
    the same batch never fits, so a worker seeing it on several trials in a row stops
    (``study.max_consecutive_failures``). Exit code 1 (``train``)."""


class RepeatedFailureError(LLRDSearchError):
    """A worker saw the same error on several trials in a row and stopped instead of burning the budget. Exit code 4."""

    exit_code = 4


class ObjectiveError(LLRDSearchError):
    """A user objective (``--objective`` / ``train.objective``) cannot be imported or called. Exit code 2."""

    exit_code = 2


class UsageError(LLRDSearchError):
    """A command-line argument is missing, unknown or of the wrong form (what argparse refuses), or
    refused before the command starts (``--workers 0``, ``--max-seeds`` without ``--seeds auto``,
    ``--seeds 1``). Exit code 2, argparse's own."""

    exit_code = 2
