"""The two arms of a search: LLRD (ξ searched) and its LR-matched control (ξ = 1 exactly).

A gain of LLRD is only a gain of the decay if the control had the same chance at the learning
rates. So ``[study] control_fraction`` of the study-wide budget tunes plain fine-tuning over the
same ``base_lr`` and ``head_lr`` space, with the same sampler, pruner, data and training, in a
*linked study* ``NAME.control`` in the same storage:

- its own sampler and pruner model only its own trials (TPE never mixes the arms; Hyperband
  compares control trials with control trials);
- Optuna's CLI (``optuna studies``), optuna-dashboard and ``status`` show both studies; every trial
  of either arm carries the user attr ``llrd:arm`` and the control study ``llrd:arm_of`` (its parent);
- ``decay`` is a real parameter of every control trial (a one-value categorical, 1.0), so exports,
  reports and the dashboard show it;
- the budget stays one number on the parent: under the parent's budget lock a worker counts both
  arms' finished, running and waiting trials and asks in the arm that is behind its share
  (:func:`choose_arm`, a pure function of those counts).

A study created before the control arm existed stored a spec without ``control_fraction``; it is
read back as ``control_fraction = 0`` (:func:`stored_spec_data`), so resuming it never adds an arm
its budget was not planned with, and the report says the arm was not part of it.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from llrd_search.exceptions import SpecError
from llrd_search.spec import StudySpec
from llrd_search.study.compat import storage_of, study_id_by_name
from llrd_search.study.storage import predates_control_arm
from llrd_search.vocab import ARM_ATTR, CONTROL_STUDY_ATTR, PARENT_ATTR, SPEC_ATTR

CONTROL_SUFFIX = ".control"
LLRD, CONTROL = "llrd", "control"


def control_name(study_name: str) -> str:
    return study_name + CONTROL_SUFFIX


def arm_of(trial: optuna.Trial | FrozenTrial) -> str:
    """``"llrd"`` or ``"control"``: the arm a (running or finished) trial belongs to.

    Public: a user objective (or ``suggest_param_groups``) may ask it, e.g. to log the arm. Every
    trial a worker asks gets the attr before training starts; older trials are LLRD-arm trials.
    """
    arm = trial.user_attrs.get(ARM_ATTR)
    if arm is None and isinstance(trial, optuna.Trial):
        arm = trial.study.user_attrs.get(ARM_ATTR)
    return CONTROL if arm == CONTROL else LLRD


def study_predates_control_arm(study: optuna.Study) -> bool:
    raw = study.user_attrs.get(SPEC_ATTR)
    return raw is not None and predates_control_arm(json.loads(raw), study.user_attrs)


def control_target(fraction: float, total: int) -> int:
    """Control-arm trials out of a budget of ``total``: ``fraction * total`` rounded half up
    (0.25 of 2 is 1, 0.34 of 6 is 2)."""
    return int(fraction * total + 0.5 + 1e-9)


def smallest_budget(fraction: float, llrd_finished: int, control_finished: int) -> int:
    """The smallest study-wide budget a study with these finished trials may be given: one that
    drops neither below all its finished trials nor the control arm's share below the control
    trials it has finished (the share grows with the budget, so every larger budget is valid too)."""
    n = llrd_finished + control_finished
    while control_finished and control_target(fraction, n) < control_finished:
        n += 1
    return n


def choose_arm(active: dict[str, int], waiting: dict[str, int], total: int, target: int) -> str | None:
    """The arm whose next trial keeps both at their share, or None when the budget is taken.

    ``active`` counts each arm's finished + running + waiting trials, ``waiting`` its queued ones
    (enqueued points, retries of a dead worker's trial: they already hold their slot and run first),
    ``total`` the study-wide budget and ``target`` the control arm's share of it. After m trials are
    allocated the control arm holds round(target * m / total), so the arms stay at their share at
    every moment, and exactly ``target`` when the budget is spent.
    """
    for arm in (LLRD, CONTROL):
        if waiting.get(arm, 0):
            return arm
    allocated = active.get(LLRD, 0) + active.get(CONTROL, 0)
    if allocated >= total:
        return None
    control = active.get(CONTROL, 0)
    if control >= target:
        return LLRD
    if active.get(LLRD, 0) >= total - target:
        return CONTROL
    want = (2 * target * (allocated + 1) + total) // (2 * total)  # round half up, in integers
    return CONTROL if control < want else LLRD


def overall_best(llrd: Any, control: Any, confirmed: list[dict] | None = None, control_row: dict | None = None) -> dict | None:
    """The configuration to use, from either arm: what ``export`` writes and ``summary.json``'s ``winner``.

    ``llrd`` and ``control`` are each arm's best search trial (anything with ``number``, ``value``,
    ``params``; None when the arm has no complete trial), ``confirmed`` the confirmed LLRD rows best
    mean first and ``control_row`` the confirmed control's row (:mod:`confirm_rows`). Once an LLRD
    configuration has confirmed runs, the confirmed means decide (a control whose runs all failed or
    diverged cannot win); before, the two search bests do. The control wins only when strictly
    better (export then says it beat the LLRD arm); a tie keeps the LLRD configuration. Returns
    ``{"arm", "trial" (a trial of that arm's study), "selected_by" ("confirmation" or "search"),
    "params", "value" (the trial's search value), "confirmed" (its row, or None)}``, or None when
    neither arm has a trial.
    """
    win = next((r for r in confirmed or [] if r["n"] > 0), None)
    if win is not None:
        row = control_row if control_row is not None and control_row["n"] > 0 and control_row["mean"] > win["mean"] else win
        arm = CONTROL if row is control_row else LLRD
        return {"arm": arm, "trial": row["source_trial"], "selected_by": "confirmation", "params": dict(row.get("params") or {}),
                "value": row.get("search_accuracy"), "confirmed": row}
    if control is not None and (llrd is None or control.value > llrd.value):
        arm, best = CONTROL, control
    elif llrd is not None:
        arm, best = LLRD, llrd
    else:
        return None
    return {"arm": arm, "trial": best.number, "selected_by": "search", "params": dict(best.params), "value": best.value, "confirmed": None}


def control_spec(spec: StudySpec, total: int) -> StudySpec:
    """The control arm's spec: the parent's with ξ fixed to 1.0, its ξ = 1 enqueued points, no arm of its own."""
    name = control_name(spec.study.name)
    if len(name) > 128:
        raise SpecError("study file", [f"study.name: '{spec.study.name}' is too long for its control arm '{name}' (121 characters at most, or control_fraction = 0)"])
    copy = spec.model_copy(deep=True)
    copy.study.name = name
    target = control_target(spec.study.control_fraction, total)
    copy.study.n_trials = max(1, target)  # a valid spec; the parent's budget lock allots the trials
    copy.study.control_fraction = 0.0
    # No more queued points than the arm's share: a queued trial runs whatever the budget says, so a
    # budget of 1 (share 0) would otherwise finish 2 trials.
    copy.study.enqueue = spec.control_points()[:target]
    copy.study.enqueue_paper_points = False
    copy.space.decay = [1.0]
    return copy


def ensure_control_arm(storage: optuna.storages.RDBStorage, parent: optuna.Study, spec: StudySpec, worker_index: int = 0) -> optuna.Study | None:
    """Create (first call) or load the control arm of ``parent``; None when the spec has none.

    Call under the parent's budget lock: whoever creates it enqueues its points, exactly once.
    """
    from llrd_search.study.pruners import make_pruner
    from llrd_search.study.sampling import make_sampler
    from llrd_search.study.storage import create_study
    from llrd_search.vocab import BUDGET_ATTR

    if not spec.has_control_arm:
        return None
    total = int(parent.user_attrs.get(BUDGET_ATTR, spec.study.n_trials))
    cspec = control_spec(spec, total)
    study, created = create_study(cspec, storage, cspec.study.n_trials)
    if created or study.user_attrs.get(PARENT_ATTR) != parent.study_name:
        study.set_user_attr(ARM_ATTR, CONTROL)
        study.set_user_attr(PARENT_ATTR, parent.study_name)
    if parent.user_attrs.get(ARM_ATTR) != LLRD:
        parent.set_user_attr(ARM_ATTR, LLRD)
        parent.set_user_attr(CONTROL_STUDY_ATTR, cspec.study.name)
    # The worker's own sampler (seeded per worker, like the parent's) and the guarded pruner.
    study.sampler = make_sampler(cspec, worker_index, concurrent=getattr(parent.sampler, "concurrent", None))
    study.pruner = make_pruner(cspec)
    return study


def arm_trials(study: optuna.Study, states: tuple | None = None) -> dict[str, list[FrozenTrial]]:
    """Each arm's trials of a parent study (``{"llrd": [...]}`` alone when it has no control arm)."""
    out = {LLRD: study.get_trials(deepcopy=False, states=states)}
    control = load_control(study)
    if control is not None:
        out[CONTROL] = control.get_trials(deepcopy=False, states=states)
    return out


def best_of_arms(by_arm: dict[str, list[FrozenTrial]]) -> tuple[str, FrozenTrial] | None:
    """(arm, trial): the best COMPLETE trial over both arms (:func:`arm_trials`), or None.

    A trial's own ``llrd:arm`` attr wins over the list it came in, so a confirmation study (both
    arms' runs in one study) reads right too. A tie goes to the LLRD arm, then the earlier trial.
    """
    from llrd_search.vocab import completed

    found = [(CONTROL if t.user_attrs.get(ARM_ATTR) == CONTROL else arm, t) for arm, ts in by_arm.items() for t in completed(ts)]
    return max(found, key=lambda x: (x[1].value, x[0] == LLRD, -x[1].number), default=None)


def load_control(study: optuna.Study) -> optuna.Study | None:
    """The control arm of ``study`` from the same storage, or None when it has none."""
    name = control_name(study.study_name)
    try:
        study_id_by_name(storage_of(study), name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage_of(study))


def parent_name(storage: optuna.storages.BaseStorage, study_name: str) -> str:
    """The parent of a control arm (a worker pointed at ``NAME.control`` joins ``NAME``), else the name."""
    try:
        attrs = storage.get_study_user_attrs(study_id_by_name(storage, study_name))
    except KeyError:
        return study_name
    return str(attrs.get(PARENT_ATTR) or study_name)
