"""Claiming and telling trials: the parts of a worker's turn that a packed worker shares.

:class:`Claimer` hands out the study's trials (and its control arm's) under :func:`storage.budget_lock`,
never more than the budget, each to the arm owed one, stale trials reaped first; a :class:`Claimed`
trial carries its heartbeat. :func:`tell_outcome` tells how a run ended, once (:func:`finish`: not
if a reaper already did), and a :class:`FailureCounter` says when repeated identical errors mean a
broken setup. :mod:`worker` runs one claimed trial at a time with these, :mod:`packs` K at a time.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.engine.space import distributions
from llrd_search.exceptions import RepeatedFailureError
from llrd_search.spec import StudySpec
from llrd_search.study.arms import ARM_ATTR, CONTROL, LLRD, choose_arm, control_spec, control_target, ensure_control_arm
from llrd_search.study.compat import backend_of, study_id, trial_id
from llrd_search.study.guards import Heartbeat, Signals
from llrd_search.study.resilience import count_states, retry_lost_trial
from llrd_search.study.storage import budget_lock, fail_stale
from llrd_search.vocab import BUDGET_ATTR, FINISHED_STATES

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); retried with the same parameters and seed (up to study.max_retries)"


@dataclass
class Budget:
    finished: int
    running: int
    waiting: int
    failed: int
    total: int

    @property
    def open_slots(self) -> int:
        return self.total - self.finished - self.running - self.waiting


def budget_of(study: optuna.Study, total: int) -> Budget:
    counts = count_states(backend_of(study), study_id(study))
    return Budget(
        finished=sum(counts[s] for s in FINISHED_STATES),
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
        failed=counts[TrialState.FAIL],
        total=total,
    )


def error_signature(err: BaseException) -> str:
    """Type and message with numbers masked: "loss became nan at step 13" and "... step 40" are
    the same broken setup."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", f"{type(err).__name__}: {err}")


@dataclass
class FailureCounter:
    """Trials failed in a row with the same :func:`error_signature`: ``limit`` of them mean a broken
    setup. A trial that completes or is pruned, or one failing another way, starts the count over."""

    limit: int
    repeats: int = 0
    last: str | None = None

    def record(self, err: BaseException) -> bool:
        """Count one failed trial; True when it is the ``limit``-th in a row to fail this way."""
        signature = error_signature(err)
        self.repeats = self.repeats + 1 if signature == self.last else 1
        self.last = signature
        return self.repeats >= self.limit

    def reset(self) -> None:
        self.repeats, self.last = 0, None


@dataclass
class Claimed:
    """A trial this worker asked for, in its arm's study, its heartbeat running."""

    study: optuna.Study
    trial: optuna.Trial
    heartbeat: Heartbeat


class Claimer:
    """Hands out the study's trials (and its control arm's) under the budget lock: never more than
    the budget, each to the arm that is owed one, stale trials reaped (and so re-queued) first."""

    def __init__(self, storage: optuna.storages.RDBStorage, study: optuna.Study, spec: StudySpec, worker_index: int):
        self.storage, self.study, self.spec = storage, study, spec
        with budget_lock(storage, study_id(study)):
            control = ensure_control_arm(storage, study, spec, worker_index)
        self.arms = {LLRD: study, **({CONTROL: control} if control is not None else {})}
        self.spaces = {LLRD: distributions(spec.space), CONTROL: distributions(control_spec(spec, 1).space) if control else {}}
        self.running = 0  # after a claim that found no free slot: trials running anywhere (0: budget spent)
        self._last_reap = -float("inf")

    def claim(self, signals: Signals) -> Claimed | None:
        """A trial with every parameter sampled and its first heartbeat written, or None when the
        budget is taken (then :attr:`running` says whether to wait for others or stop)."""
        # Waiting for the lock can be interrupted; once it is held, a signal is held until the
        # trial's heartbeat runs, and the caller raises it inside the try that marks the trial FAIL.
        with contextlib.ExitStack() as held:
            with budget_lock(self.storage, study_id(self.study)):
                held.enter_context(signals.deferred(raise_pending=False))
                self._reap()
                arm = self._owed_arm()
                if arm is None:
                    return None
                # Every parameter is sampled (and stored) here, before the trial can be seen
                # running: a worker killed at any later moment leaves a trial whose retry has all.
                trial = self.arms[arm].ask(self.spaces[arm])
                if ARM_ATTR not in trial.user_attrs:  # a queued run may carry its own
                    trial.set_user_attr(ARM_ATTR, arm)
            # A trial with no heartbeat yet is never reaped early (fail_stale), so the first beat
            # can be written after the lock is released.
            return Claimed(self.arms[arm], trial, Heartbeat(self.storage, trial_id(trial), self.spec.study.heartbeat_interval))

    def _reap(self) -> None:
        # Staleness takes grace_period seconds to arise: reaping once per heartbeat interval is as
        # good as on every ask, and keeps the locked section short.
        if time.monotonic() - self._last_reap >= self.spec.study.heartbeat_interval:
            for arm_study in self.arms.values():
                fail_stale(arm_study)
            self._last_reap = time.monotonic()

    def _owed_arm(self) -> str | None:
        total = int(self.study.user_attrs.get(BUDGET_ATTR, self.spec.study.n_trials))
        budgets = {arm: budget_of(s, total) for arm, s in self.arms.items()}
        self.running = sum(b.running for b in budgets.values())
        return choose_arm(
            {a: b.finished + b.running + b.waiting for a, b in budgets.items()},
            {a: b.waiting for a, b in budgets.items()},
            total,
            control_target(self.spec.study.control_fraction, total) if CONTROL in self.arms else 0,
        )


def fail_interrupted(claimer: Claimer, claims: Iterable[tuple[Claimed, float | None]], signals: Signals, err: BaseException) -> None:
    """Mark each ``(claimed, started)`` trial FAIL (INTERRUPTED) and re-queue it with its parameters
    and seed, as a dead worker's trial is (up to ``study.max_retries``): an interrupted paper point
    or grid point is trained by the next run, not replaced by a sampled one. Under the budget lock,
    so the retry takes the trial's slot before another worker can see it free. Says on ``err`` (the
    interrupt, raised on by the caller) how many trials were marked and re-queued, for the CLI."""
    marked = requeued = 0
    with signals.deferred(), budget_lock(claimer.storage, study_id(claimer.study)):
        for claimed, t0 in claims:
            timing = {} if t0 is None else {"wall_seconds": seconds_since(t0)}
            if not finish(claimed.study, claimed.trial, TrialState.FAIL, fail_reason=INTERRUPTED, **timing):
                continue  # reaped (and re-queued) while it ran
            marked += 1
            back = retry_lost_trial(claimed.study, claimer.storage.get_trial(trial_id(claimed.trial)))
            requeued += back is True
            log.warning("trial %d: interrupted, marked FAIL%s", claimed.trial.number, _requeued_text(back))
        err.trials_marked = (marked, requeued)  # type: ignore[attr-defined]  # (before a second signal is raised)


def _requeued_text(back: bool | None) -> str:
    if back is None:
        return "; not re-queued (no retry callback)"
    return " and re-queued with its parameters and seed" if back else "; not re-queued: retries exhausted (study.max_retries)"


def tell_outcome(
    study: optuna.Study, trial: optuna.Trial, signals: Signals, failures: FailureCounter, t0: float,
    *, value: float | None = None, error: BaseException | None = None, tb: str = "",
) -> None:
    """Tell how a run ended (once: not if a reaper already did), for an unpacked trial and a packed
    slot alike: COMPLETE with ``value``; PRUNED for ``optuna.TrialPruned``; FAIL for any other
    ``error`` (its traceback ``tb``), which counts toward the repeated-failure stop and raises
    RepeatedFailureError at the limit."""
    if isinstance(error, optuna.TrialPruned):
        with signals.deferred():
            finish(study, trial, TrialState.PRUNED, wall_seconds=seconds_since(t0))
        failures.reset()
        return
    if error is None:
        with signals.deferred():
            finish(study, trial, TrialState.COMPLETE, value, wall_seconds=seconds_since(t0))
        failures.reset()
        return
    reason = f"{type(error).__name__}: {error}".strip()
    with signals.deferred():
        told = finish(study, trial, TrialState.FAIL, fail_reason=reason[:2000], traceback=tb[-4000:], wall_seconds=seconds_since(t0))
    log.warning("trial %d failed: %s", trial.number, reason)
    # A trial reaped under us says nothing about the setup: it is not counted.
    if told and failures.record(error):
        raise repeated_failure(failures, reason) from error


def repeated_failure(failures: FailureCounter, reason: str) -> RepeatedFailureError:
    return RepeatedFailureError(
        f"{failures.repeats} trials in a row failed with the same error, stopping this worker (fix the setup, then run again): {reason}"
    )


def seconds_since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None, **attrs: Any) -> bool:
    """Record ``attrs`` and tell the outcome. False when the trial was already finished: a reaper
    marked it stale while this worker ran (a long storage outage), and its retry runs instead."""
    try:
        for key, val in attrs.items():
            trial.set_user_attr(key, val)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    if backend_of(study).get_trial(trial_id(trial)).state.is_finished():
        log.warning("trial %d was marked stale while it ran (storage unreachable too long?); its retry will run", trial.number)
        return False
    if state == TrialState.COMPLETE:
        study.tell(trial, value, skip_if_finished=True)
    else:
        study.tell(trial, state=state, skip_if_finished=True)
    return True
