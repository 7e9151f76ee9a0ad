"""Workers: run trials until the study-wide budget is spent, never losing or duplicating one.

The loop is Optuna's ask/tell with three additions Optuna's ``optimize`` does not give a fleet:

- an exact budget: "is a slot free? then ask" runs under :func:`storage.budget_lock`, so N workers
  finish exactly ``n_trials`` COMPLETE + PRUNED trials;
- no orphans: when the budget is taken but trials are still RUNNING elsewhere, a worker waits and
  reaps stale ones (heartbeat grace expired → FAIL → retried with the same params) rather than exit;
- a broken setup stops the worker after ``max_consecutive_failures`` identical errors instead of
  failing the whole budget.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from .exceptions import RepeatedFailureError
from .spec import StudySpec
from .storage import budget_lock, fail_stale, load_study, open_storage, spec_of

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return Budget(
        finished=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED],
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
        storage.record_heartbeat(trial_id)
        self._thread.start()

    def _beat(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int) -> None:
        while not self._stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as err:  # a storage hiccup must not kill the training thread
                log.warning("heartbeat failed (will retry): %s", err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_worker(
    storage_url: str,
    study_name: str,
    *,
    worker_index: int = 0,
    objective_factory: Callable[[StudySpec], Callable[[optuna.Trial], float]] | None = None,
    on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    poll_seconds: float = 5.0,
) -> int:
    """Join ``study_name`` and run trials until the budget is spent. Returns trials this worker ran.

    SIGTERM is treated like Ctrl-C: the current trial is marked FAIL with reason "interrupted"
    (a later run fills its slot), and KeyboardInterrupt propagates to the caller.
    """
    bootstrap = open_storage(storage_url)
    spec = spec_of(load_study(bootstrap, study_name))
    bootstrap.engine.dispose()
    storage = open_storage(storage_url, spec)
    study = load_study(storage, study_name, spec, worker_index)
    study_id = study._study_id
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)

    objective = None
    ran = 0
    last_error: str | None = None
    repeats = 0
    try:
        while True:
            with budget_lock(storage, study_id):
                fail_stale(study)
                budget = budget_of(study, int(study.user_attrs.get("llrd:n_trials", spec.study.n_trials)))
                trial = study.ask() if budget.waiting or budget.open_slots > 0 else None
                if trial is not None:
                    heartbeat = _Heartbeat(storage, trial._trial_id, spec.study.heartbeat_interval)
            if trial is None:
                if budget.running == 0:
                    return ran
                time.sleep(poll_seconds)  # others are still running: wait to reap or retry their trials
                continue
            if objective is None:
                objective = (objective_factory or _default_objective)(spec)
            ran += 1
            t0 = time.perf_counter()
            trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                trial.set_user_attr("wall_seconds", round(time.perf_counter() - t0, 3))
                study.tell(trial, state=TrialState.PRUNED)
                last_error, repeats = None, 0
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM); a later run fills this slot")
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as err:
                reason = f"{type(err).__name__}: {err}".strip()
                trial.set_user_attr("fail_reason", reason[:2000])
                trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
                trial.set_user_attr("wall_seconds", round(time.perf_counter() - t0, 3))
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, reason)
                repeats = repeats + 1 if reason == last_error else 1
                last_error = reason
                if repeats >= spec.study.max_consecutive_failures:
                    raise RepeatedFailureError(
                        f"{repeats} trials in a row failed with the same error, stopping this worker: {reason}"
                    ) from err
            else:
                trial.set_user_attr("wall_seconds", round(time.perf_counter() - t0, 3))
                study.tell(trial, value)
                last_error, repeats = None, 0
            finally:
                heartbeat.stop()
            if on_trial_end is not None:
                on_trial_end(study, storage.get_trial(trial._trial_id))
    finally:
        storage.engine.dispose()


def _default_objective(spec: StudySpec) -> Callable[[optuna.Trial], float]:
    from .objective import Objective

    return Objective(spec)
