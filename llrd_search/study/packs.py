"""A worker's packed trials: claim up to K trials, train them as one pack, tell each its own outcome.

With ``[train] pack`` resolving to K > 1 and the built-in objective, :func:`run_worker` hands each
claimed trial to :func:`run_pack` instead of running it alone. The guarantees of a single trial
hold per trial: every trial is claimed through the same :meth:`claims.Claimer.claim` (budget lock, arm,
its own heartbeat), so N workers still finish exactly ``n_trials``; each is told COMPLETE / PRUNED /
FAIL through :func:`claims.finish` the moment its slot ends, and its slot is refilled by a new claim while
the budget has room. A signal marks every trial still running in the pack FAIL (INTERRUPTED), re-queues
each with its parameters and seed, and propagates; an exception of the pack fails them all with its
reason and counts once toward the repeated-failure stop. No trial is left RUNNING and none already told is told again.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.engine.packed import PackJob, SlotEnd
from llrd_search.engine.packed_trials import PackedTrials, check_packable, resolve_pack
from llrd_search.engine.steps import step_hook
from llrd_search.exceptions import RepeatedFailureError
from llrd_search.study.claims import (
    Claimed,
    Claimer,
    FailureCounter,
    fail_interrupted,
    finish,
    repeated_failure,
    seconds_since,
    tell_outcome,
)
from llrd_search.study.compat import trial_id
from llrd_search.study.guards import Signals

log = logging.getLogger(__name__)


def pack_runner(objective: Any) -> PackedTrials | None:
    """The packed runner for ``objective`` (the built-in one) when ``[train] pack`` resolves to
    K > 1 and the model packs; None to run trials one at a time."""
    spec = objective.spec
    k = resolve_pack(spec.train, objective.device, objective.template.model, spec.model.max_length, objective.dtype)
    if k <= 1:
        return None
    why = check_packable(objective)
    if why is not None:
        log.warning("train.pack = %s: this model cannot be packed (%s); training one trial at a time", spec.train.pack, why)
        return None
    log.info("packing %d trials per worker (train.pack = %s)", k, spec.train.pack)
    return PackedTrials(objective, k)


def run_pack(
    first: Claimed,
    claimer: Claimer,
    packer: PackedTrials,
    signals: Signals,
    failures: FailureCounter,
    on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> int:
    """Run ``first`` and up to K - 1 more claimed trials as one pack, refilling freed slots with
    new claims until none is left; returns how many trials it ran."""
    live: dict[int, tuple[Claimed, float]] = {}  # trial id -> its claim, when it started
    ran = 0

    def start(claimed: Claimed) -> PackJob:
        nonlocal ran
        ran += 1
        live[trial_id(claimed.trial)] = (claimed, time.perf_counter())
        signals.check()
        with signals.deferred():
            claimed.trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        return packer.job(claimed.trial)

    def next_job() -> PackJob | None:
        claimed = claimer.claim(signals)
        return None if claimed is None else start(claimed)

    def on_end(end: SlotEnd) -> None:
        tid = trial_id(end.job.tag.trial)
        claimed, t0 = live.pop(tid)
        try:
            _tell(claimed, packer, end, signals, failures, t0)
        finally:
            claimed.heartbeat.stop()
        if on_trial_end is not None:
            on_trial_end(claimed.study, claimer.storage.get_trial(tid))

    try:
        jobs = [start(first)]
        while len(jobs) < packer.k and (claimed := claimer.claim(signals)) is not None:
            jobs.append(start(claimed))
        # Checked at every pack step: a signal stops the whole pack at its next step.
        with step_hook(lambda _step, _total: signals.check()):
            packer.run(jobs, next_job, on_end)
    except KeyboardInterrupt as err:
        signals.clear()  # this is that signal: raised below, after the trials are marked (and re-queued)
        fail_interrupted(claimer, list(live.values()), signals, err)
        live.clear()
        raise
    except RepeatedFailureError as err:  # a slot's own failure was the last straw: the others did nothing wrong
        _fail_all(live, signals, fail_reason=f"worker stopped: {err}"[:2000])
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".strip()
        log.warning("a pack of %d trial(s) failed: %s", len(live), reason)
        told = _fail_all(live, signals, fail_reason=reason[:2000], traceback=traceback.format_exc()[-4000:])
        if told and failures.record(err):  # one broken pack is one failure, however many trials it held
            raise repeated_failure(failures, reason) from err
    finally:
        for claimed, _t0 in live.values():
            claimed.heartbeat.stop()
    return ran


def _tell(claimed: Claimed, packer: PackedTrials, end: SlotEnd, signals: Signals, failures: FailureCounter, t0: float) -> None:
    """Tell one slot's trial its outcome, as the unpacked worker tells a trial."""
    try:
        value = packer.outcome(end)
    except Exception as err:  # optuna.TrialPruned included: told PRUNED
        tell_outcome(claimed.study, claimed.trial, signals, failures, t0, error=err, tb="".join(traceback.format_exception(err)))
    else:
        tell_outcome(claimed.study, claimed.trial, signals, failures, t0, value=value)


def _fail_all(live: dict[int, tuple[Claimed, float]], signals: Signals, **attrs: Any) -> bool:
    """Mark every trial still running in the pack FAIL; whether any was told (not reaped already)."""
    told = False
    with signals.deferred():
        for claimed, t0 in live.values():
            told = finish(claimed.study, claimed.trial, TrialState.FAIL, wall_seconds=seconds_since(t0), **attrs) or told
    return told
