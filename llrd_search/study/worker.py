"""Workers: run trials until the study-wide budget is spent, never losing or duplicating one.

The loop is Optuna's ask/tell with what Optuna's ``optimize`` does not give a fleet:

- an exact budget: "is a slot free? then ask" runs under :func:`storage.budget_lock`, so N workers
  finish exactly ``n_trials`` COMPLETE + PRUNED trials;
- no orphans: when the budget is taken but trials are still RUNNING elsewhere, a worker waits and
  reaps stale ones (heartbeat grace expired → FAIL → retried with the same params) rather than exit;
- clean interrupts: Ctrl-C / SIGTERM stop training at once, but never between "ask" and the first
  heartbeat or in the middle of a tell, so an interrupted worker leaves no RUNNING trial behind;
- storage outages are ridden out (:mod:`resilience`), and a trial reaped during one is not told twice;
- a broken setup stops the worker after ``max_consecutive_failures`` identical errors instead of
  failing the whole budget.

With ``[train] pack`` resolving to K > 1 (the built-in objective only), claimed trials run K at a
time as one batched model (:mod:`llrd_search.study.packs`), each claimed and told as here.

Each turn of :func:`run_worker`: :meth:`_Claimer.claim` takes a trial (budget lock, reap, ask,
first heartbeat), :func:`_run_trial` runs and tells it (signals, step checks, objective), and a
:class:`FailureCounter` says when repeated errors mean a broken setup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.engine.space import distributions
from llrd_search.engine.steps import step_hook
from llrd_search.exceptions import RepeatedFailureError
from llrd_search.spec import StudySpec
from llrd_search.study.arms import (
    ARM_ATTR,
    CONTROL,
    LLRD,
    choose_arm,
    control_spec,
    control_target,
    ensure_control_arm,
    parent_name,
)
from llrd_search.study.compat import backend_of, study_id, trial_id
from llrd_search.study.guards import Heartbeat, Signals
from llrd_search.study.resilience import count_states
from llrd_search.study.storage import budget_lock, fail_stale, load_study, opened_storage, quiet_optuna, spec_of
from llrd_search.study.tracking import trial_tracker
from llrd_search.vocab import BUDGET_ATTR, FINISHED_STATES

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); a later run fills this slot"


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
class _Claimed:
    """A trial this worker asked for, in its arm's study, its heartbeat running."""

    study: optuna.Study
    trial: optuna.Trial
    heartbeat: Heartbeat


class _Claimer:
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

    def claim(self, signals: Signals) -> _Claimed | None:
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
            return _Claimed(self.arms[arm], trial, Heartbeat(self.storage, trial_id(trial), self.spec.study.heartbeat_interval))

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


def _run_trial(claimed: _Claimed, objective: Callable[[optuna.Trial], float], signals: Signals, failures: FailureCounter) -> None:
    """Run a claimed trial and tell its outcome (once: not if a reaper already did). A signal marks
    it FAIL with reason INTERRUPTED and propagates; repeated identical errors raise
    RepeatedFailureError."""
    study, trial = claimed.study, claimed.trial
    t0 = time.perf_counter()
    try:
        signals.check()
        with signals.deferred():
            trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        # Checked at every training step too: a signal whose KeyboardInterrupt Python dropped (raised
        # inside a GC or weakref callback) still stops the trial at its next step.
        with step_hook(lambda _step, _total: signals.check()):
            value = objective(trial)
    except KeyboardInterrupt:
        signals.clear()  # this is that signal: raised below, after the trial is marked
        with signals.deferred():
            _finish(study, trial, TrialState.FAIL, fail_reason=INTERRUPTED)
        raise
    except Exception as err:  # optuna.TrialPruned included: tell_outcome tells it PRUNED
        tell_outcome(study, trial, signals, failures, t0, error=err, tb=traceback.format_exc())
    else:
        tell_outcome(study, trial, signals, failures, t0, value=value)
    finally:
        claimed.heartbeat.stop()


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
            _finish(study, trial, TrialState.PRUNED, wall_seconds=_seconds_since(t0))
        failures.reset()
        return
    if error is None:
        with signals.deferred():
            _finish(study, trial, TrialState.COMPLETE, value, wall_seconds=_seconds_since(t0))
        failures.reset()
        return
    reason = f"{type(error).__name__}: {error}".strip()
    with signals.deferred():
        told = _finish(study, trial, TrialState.FAIL, fail_reason=reason[:2000], traceback=tb[-4000:], wall_seconds=_seconds_since(t0))
    log.warning("trial %d failed: %s", trial.number, reason)
    # A trial reaped under us says nothing about the setup: it is not counted.
    if told and failures.record(error):
        raise repeated_failure(failures, reason) from error


def repeated_failure(failures: FailureCounter, reason: str) -> RepeatedFailureError:
    return RepeatedFailureError(
        f"{failures.repeats} trials in a row failed with the same error, stopping this worker (fix the setup, then run again): {reason}"
    )


def _seconds_since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def run_worker(
    storage_url: str,
    study_name: str,
    *,
    worker_index: int = 0,
    objective_factory: Callable[[StudySpec], Callable[[optuna.Trial], float]] | None = None,
    on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    poll_seconds: float | None = None,
) -> int:
    """Join ``study_name`` and run trials until the budget is spent. Returns trials this worker ran.

    Ctrl-C and SIGTERM (when called from the main thread) end the current trial as FAIL with reason
    "interrupted" (a later run fills its slot) and propagate as KeyboardInterrupt.
    """
    quiet_optuna()
    with opened_storage(storage_url) as bootstrap:
        study_name = parent_name(bootstrap, study_name)  # a worker pointed at NAME.control joins NAME
        spec = spec_of(load_study(bootstrap, study_name))
    poll = poll_seconds if poll_seconds is not None else min(5.0, float(spec.study.heartbeat_interval))
    ran = 0
    failures = FailureCounter(spec.study.max_consecutive_failures)
    # It opened a moment ago: a failure now is an outage (patient).
    with opened_storage(storage_url, spec, patient=True) as storage:
        study = load_study(storage, study_name, spec, worker_index)
        # Data, tokenizer and model load once, before any trial: a setup error is one clear error,
        # not a string of failed trials. And before the budget lock is first taken (for the control
        # arm): a worker waiting at the lock is ready to train, so workers started together compete
        # for the first trials as equals instead of one loading its model while others run them.
        objective = (objective_factory or _default_objective)(spec)
        packer = _pack_runner(objective)
        tracker = trial_tracker(spec, storage_url)  # each worker logs the trials it finishes
        after = None if on_trial_end is None and tracker is None else _after_trial(study, tracker, on_trial_end)
        claimer = _Claimer(storage, study, spec, worker_index)
        with Signals() as signals:
            while True:
                claimed = claimer.claim(signals)
                if claimed is None:
                    signals.check()
                    if claimer.running == 0:
                        return ran
                    log.info("budget taken; waiting for %d running trial(s) to finish or go stale", claimer.running)
                    time.sleep(poll)
                    continue
                if packer is not None:  # K trials at once (study/packs.py): same claims, same tells
                    from llrd_search.study.packs import run_pack

                    ran += run_pack(claimed, claimer, packer, signals, failures, after)
                    continue
                ran += 1
                _run_trial(claimed, objective, signals, failures)
                if after is not None:
                    after(claimed.study, storage.get_trial(trial_id(claimed.trial)))


def _after_trial(study: optuna.Study, tracker: Any, on_trial_end: Any) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """What runs after each finished trial: the tracker logs it in its arm's study, the caller's
    ``on_trial_end`` hears it with the parent study (both arms report there)."""

    def after(arm_study: optuna.Study, finished: optuna.trial.FrozenTrial) -> None:
        if tracker is not None:
            tracker(arm_study, finished)
        if on_trial_end is not None:
            on_trial_end(study, finished)

    return after


def _finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None, **attrs: Any) -> bool:
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


def _pack_runner(objective: Callable[[optuna.Trial], float]) -> Any:
    """Packed trials for the built-in objective when ``[train] pack`` resolves to K > 1; None
    otherwise. A user's objective never packs (and never makes the worker import torch here)."""
    builtin = sys.modules.get("llrd_search.engine.objective")
    if builtin is None or not isinstance(objective, builtin.Objective):
        return None
    from llrd_search.study.packs import pack_runner

    return pack_runner(objective)


def _default_objective(spec: StudySpec) -> Callable[[optuna.Trial], float]:
    from llrd_search.engine.user_objective import pick_objective

    return pick_objective(spec)  # the study's train.objective, else the built-in loop
