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
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from .arms import (
    ARM_ATTR,
    CONTROL,
    LLRD,
    choose_arm,
    control_spec,
    control_target,
    distributions,
    ensure_control_arm,
    parent_name,
)
from .compat import rdb_of, storage_of, study_id, trial_id
from .exceptions import RepeatedFailureError
from .resilience import count_states
from .spec import StudySpec
from .steps import step_hook
from .storage import budget_lock, fail_stale, load_study, opened_storage, quiet_optuna, spec_of
from .vocab import BUDGET_ATTR, FINISHED_STATES

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
    counts = count_states(rdb_of(study), study_id(study))
    return Budget(
        finished=sum(counts[s] for s in FINISHED_STATES),
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
        failed=counts[TrialState.FAIL],
        total=total,
    )


class _Heartbeat:
    """Records the trial's heartbeat in the storage every ``interval`` seconds from a thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)
        storage.record_heartbeat(trial_id)  # before ask's caller can be interrupted: the trial is never beat-less
        self._thread.start()

    def _beat(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int) -> None:
        try:
            while not self._stop.wait(interval):
                try:
                    # Unretried: this loop is the retry, and a stuck beat must not outlive the trial.
                    optuna.storages.RDBStorage.record_heartbeat(storage, trial_id)
                except Exception as err:  # a storage hiccup must not kill the training thread
                    log.warning("heartbeat failed (will retry): %s", type(err).__name__)
        finally:
            storage.remove_session()  # give this thread's connection back to the pool

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Signals:
    """SIGINT/SIGTERM raise KeyboardInterrupt, except inside :meth:`deferred` sections (bookkeeping
    that must not be cut in half), where the signal is held and raised when the section ends."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        # Remembered even when raised: Python drops an exception raised while a GC or weakref
        # callback runs ("Exception ignored in ..."), and the next check() must still see it.
        self._pending = signum
        if self._depth:
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def clear(self) -> None:
        self._pending = None

    @contextlib.contextmanager
    def deferred(self, *, raise_pending: bool = True) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if raise_pending:
            self.check()

    def check(self) -> None:
        """Raise the signal held by a deferred section, if any."""
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def error_signature(err: BaseException) -> str:
    """Type and message with numbers masked: "loss became nan at step 13" and "... step 40" are
    the same broken setup."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", f"{type(err).__name__}: {err}")


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
    last_error: str | None = None
    repeats = 0
    last_reap = -float("inf")
    # It opened a moment ago: a failure now is an outage (patient).
    with opened_storage(storage_url, spec, patient=True) as storage:
        study = load_study(storage, study_name, spec, worker_index)
        with budget_lock(storage, study_id(study)):
            control = ensure_control_arm(storage, study, spec, worker_index)
        arms = {LLRD: study, **({CONTROL: control} if control is not None else {})}
        spaces = {LLRD: distributions(spec.space), CONTROL: distributions(control_spec(spec, 1).space) if control else {}}
        # Data, tokenizer and model load once, before any trial: a setup error is one clear error,
        # not a string of failed trials.
        objective = (objective_factory or _default_objective)(spec)
        with _Signals() as signals:
            while True:
                # Waiting for the lock can be interrupted; once it is held, a signal is held until the
                # trial is inside the try below, whose KeyboardInterrupt branch marks it FAIL.
                with contextlib.ExitStack() as held:
                    with budget_lock(storage, study_id(study)):
                        held.enter_context(signals.deferred(raise_pending=False))
                        # Staleness takes grace_period seconds to arise: reaping once per heartbeat
                        # interval is as good as on every ask, and keeps the locked section short.
                        if time.monotonic() - last_reap >= spec.study.heartbeat_interval:
                            for arm_study in arms.values():
                                fail_stale(arm_study)
                            last_reap = time.monotonic()
                        total = int(study.user_attrs.get(BUDGET_ATTR, spec.study.n_trials))
                        budgets = {arm: budget_of(s, total) for arm, s in arms.items()}
                        arm = choose_arm(
                            {a: b.finished + b.running + b.waiting for a, b in budgets.items()},
                            {a: b.waiting for a, b in budgets.items()},
                            total,
                            control_target(spec.study.control_fraction, total) if control is not None else 0,
                        )
                        running = sum(b.running for b in budgets.values())
                        trial = None
                        if arm is not None:
                            # Every parameter is sampled (and stored) here, before the trial can be
                            # seen running: a worker killed at any later moment leaves a trial whose
                            # retry has all of them.
                            trial = arms[arm].ask(spaces[arm])
                            if ARM_ATTR not in trial.user_attrs:  # a queued run may carry its own
                                trial.set_user_attr(ARM_ATTR, arm)
                    # A trial with no heartbeat yet is never reaped early (fail_stale), so the first
                    # beat can be written after the lock is released.
                    heartbeat = _Heartbeat(storage, trial_id(trial), spec.study.heartbeat_interval) if trial else None
                if trial is None or heartbeat is None:  # (heartbeat is None exactly when trial is)
                    signals.check()
                    if running == 0:
                        return ran
                    log.info("budget taken; waiting for %d running trial(s) to finish or go stale", running)
                    time.sleep(poll)
                    continue
                ran += 1
                t0 = time.perf_counter()
                try:
                    signals.check()
                    with signals.deferred():
                        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
                    # Checked at every training step too: a signal whose KeyboardInterrupt Python
                    # dropped (raised inside a GC or weakref callback) still stops the trial.
                    with step_hook(lambda _step, _total: signals.check()):
                        value = objective(trial)
                except optuna.TrialPruned:
                    with signals.deferred():
                        _finish(arms[arm], trial, TrialState.PRUNED, wall_seconds=round(time.perf_counter() - t0, 3))
                    last_error, repeats = None, 0
                except KeyboardInterrupt:
                    signals.clear()  # this is that signal: raised below, after the trial is marked
                    with signals.deferred():
                        _finish(arms[arm], trial, TrialState.FAIL, fail_reason=INTERRUPTED)
                    raise
                except Exception as err:
                    reason = f"{type(err).__name__}: {err}".strip()
                    with signals.deferred():
                        told = _finish(
                            arms[arm],
                            trial,
                            TrialState.FAIL,
                            fail_reason=reason[:2000],
                            traceback=traceback.format_exc()[-4000:],
                            wall_seconds=round(time.perf_counter() - t0, 3),
                        )
                    log.warning("trial %d failed: %s", trial.number, reason)
                    if told:  # a trial reaped under us says nothing about the setup
                        signature = error_signature(err)
                        repeats = repeats + 1 if signature == last_error else 1
                        last_error = signature
                    if repeats >= spec.study.max_consecutive_failures:
                        raise RepeatedFailureError(
                            f"{repeats} trials in a row failed with the same error, stopping this worker "
                            f"(fix the setup, then run again): {reason}"
                        ) from err
                else:
                    with signals.deferred():
                        _finish(arms[arm], trial, TrialState.COMPLETE, value, wall_seconds=round(time.perf_counter() - t0, 3))
                    last_error, repeats = None, 0
                finally:
                    heartbeat.stop()
                if on_trial_end is not None:
                    on_trial_end(study, storage.get_trial(trial_id(trial)))


def _finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None, **attrs: Any) -> bool:
    """Record ``attrs`` and tell the outcome. False when the trial was already finished: a reaper
    marked it stale while this worker ran (a long storage outage), and its retry runs instead."""
    try:
        for key, val in attrs.items():
            trial.set_user_attr(key, val)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    if (rdb_of(study) or storage_of(study)).get_trial(trial_id(trial)).state.is_finished():
        log.warning("trial %d was marked stale while it ran (storage unreachable too long?); its retry will run", trial.number)
        return False
    if state == TrialState.COMPLETE:
        study.tell(trial, value, skip_if_finished=True)
    else:
        study.tell(trial, state=state, skip_if_finished=True)
    return True


def _default_objective(spec: StudySpec) -> Callable[[optuna.Trial], float]:
    from .user_objective import pick_objective

    return pick_objective(spec)  # the study's train.objective, else the built-in loop
