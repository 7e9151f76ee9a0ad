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

Each turn of :func:`run_worker`: :meth:`claims.Claimer.claim` takes a trial (budget lock, reap, ask,
first heartbeat), :func:`_run_trial` runs and tells it (signals, step checks, objective), and a
:class:`claims.FailureCounter` says when repeated errors mean a broken setup.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import optuna

from llrd_search.engine.steps import step_hook
from llrd_search.spec import StudySpec
from llrd_search.study.arms import parent_name
from llrd_search.study.claims import INTERRUPTED as INTERRUPTED  # the fail_reason of an interrupted trial
from llrd_search.study.claims import Claimed, Claimer, FailureCounter, fail_interrupted, tell_outcome
from llrd_search.study.compat import trial_id
from llrd_search.study.guards import Signals
from llrd_search.study.sampling import fleet_workers, make_sampler
from llrd_search.study.storage import load_study, opened_storage, quiet_optuna, spec_of
from llrd_search.study.tracking import trial_tracker

log = logging.getLogger(__name__)


def _run_trial(claimed: Claimed, claimer: Claimer, objective: Callable[[optuna.Trial], float], signals: Signals, failures: FailureCounter) -> None:
    """Run a claimed trial and tell its outcome (once: not if a reaper already did). A signal marks
    it FAIL with reason INTERRUPTED, re-queues it with its parameters and seed, and propagates;
    repeated identical errors raise RepeatedFailureError."""
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
    except KeyboardInterrupt as err:
        signals.clear()  # this is that signal: raised below, after the trial is marked
        fail_interrupted(claimer, [(claimed, t0)], signals, err)
        raise
    except Exception as err:  # optuna.TrialPruned included: tell_outcome tells it PRUNED
        tell_outcome(study, trial, signals, failures, t0, error=err, tb=traceback.format_exc())
    else:
        tell_outcome(study, trial, signals, failures, t0, value=value)
    finally:
        claimed.heartbeat.stop()


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
    "interrupted", re-queue it with its parameters and seed (up to ``study.max_retries``) and
    propagate as KeyboardInterrupt.
    """
    quiet_optuna()
    with opened_storage(storage_url, must_exist=True) as bootstrap:
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
        if packer is not None:  # K trials sampled at once here: TPE's constant liar (study/sampling.py)
            study.sampler = make_sampler(spec, worker_index, concurrent=fleet_workers() * packer.k)
        tracker = trial_tracker(spec, storage_url)  # each worker logs the trials it finishes
        after = None if on_trial_end is None and tracker is None else _after_trial(study, tracker, on_trial_end)
        claimer = Claimer(storage, study, spec, worker_index)
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
                _run_trial(claimed, claimer, objective, signals, failures)
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
