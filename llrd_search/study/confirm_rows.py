"""Reading a confirmation back: one row per re-run configuration of the linked study ``NAME.confirm``.

:mod:`confirm` plans and runs the linked study; this module only reads it, so the report, export
and the decay sweep (:mod:`sweep`) can read it without the planning code. A run belongs to the
configuration named by its ``llrd:confirm_of`` tag (a search trial number, ``control:N`` for the
control arm's best, ``sweep:ξ`` for a decay-sweep point); run ``llrd:confirm_rep`` = i of every
configuration trained with the same seed, which is what pairs them.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llrd_search.exceptions import StorageError, StudyNotFoundError
from llrd_search.stats import mean_std
from llrd_search.study.arms import CONTROL, LLRD
from llrd_search.study.storage import load_study, opened_storage
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR
from llrd_search.vocab import CONFIRM_OF_ATTR as SOURCE_ATTR
from llrd_search.vocab import CONFIRM_REP_ATTR as REP_ATTR
from llrd_search.vocab import PARAMS, TEST_ATTR

SUFFIX = ".confirm"
SWEEP = "sweep"
PLAIN = "plain"  # ``plain:W``: plain fine-tuning (ξ = 1) at LLRD winner W's LRs, the second control candidate


def confirm_name(study_name: str) -> str:
    return study_name + SUFFIX


def is_sweep(src: Any) -> bool:
    """Whether a source key names a decay-sweep point (``sweep:ξ``)."""
    return str(src).startswith(SWEEP + ":")


def is_plain(src: Any) -> bool:
    """Whether a source key names plain fine-tuning at the LLRD winner's LRs (``plain:W``)."""
    return str(src).startswith(PLAIN + ":")


def planned_seeds(meta: dict[str, Any], src: Any) -> int:
    """S for one source: ``seeds_of`` (sequential confirmation extends the verdict's sources only) or the plan's S."""
    return int(meta.get("seeds_of", {}).get(str(src), meta["seeds"]))


def read_meta(storage: optuna.storages.BaseStorage, name: str, strict: bool = True) -> dict[str, Any] | None:
    """The plan stored in the linked study ``name``; None when there is no such study."""
    try:
        study = load_study(storage, name)
    except StudyNotFoundError:
        return None
    raw = study.user_attrs.get(META_ATTR)
    if raw is None and not strict:
        return None  # a study that merely has the name: nothing confirmed
    if raw is None:
        raise StorageError(f"--study: a study '{name}' exists but is not a llrd-search confirmation; rename or delete it")
    return json.loads(raw)


def interrupted(t: FrozenTrial) -> bool:
    return str(t.user_attrs.get("fail_reason", "")).startswith("interrupted")


def run_stats(trials: list[FrozenTrial], src: Any, planned: int, first: int | None = None) -> dict[str, Any]:
    """One source's finished runs: accuracies, run index → accuracy (the pairing), mean, std, n, and
    why n may fall short of the ``planned`` S: runs that diverged (PRUNED with a ``diverged`` attr, never
    re-run: the configuration blew up at that seed) and runs that failed (re-queued up to S times); and
    ``test_by_seed`` / ``test_mean``, the runs' held-out test scores (empty / None without a test split).
    ``first``: read only runs 0 … first − 1 (a decay sweep on fewer seeds than the verdict's sources)."""
    mine = sorted((t for t in trials if t.user_attrs.get(SOURCE_ATTR) == src
                   and (first is None or int(t.user_attrs.get(REP_ATTR, -1)) < first)), key=lambda t: t.number)
    done = [t for t in mine if t.state == TrialState.COMPLETE and t.value is not None]
    accs = [float(t.value) for t in done]
    mean, std = mean_std(accs)
    test = {int(t.user_attrs.get(REP_ATTR, -1)): float(t.user_attrs[TEST_ATTR]) for t in done if TEST_ATTR in t.user_attrs}
    return {"accuracies": accs, "by_seed": {int(t.user_attrs.get(REP_ATTR, -1)): float(t.value) for t in done},
            "mean": mean, "std": std, "n": len(accs), "n_planned": planned,
            "n_diverged": sum(t.state == TrialState.PRUNED and "diverged" in t.user_attrs for t in mine),
            "n_failed": sum(t.state == TrialState.FAIL and not interrupted(t) for t in mine),
            # The held-out test score of each run (run index → score): shown beside, never ranked by.
            "test_by_seed": test, "test_mean": mean_std(list(test.values()))[0] if test else None}


def run_owners(meta: dict[str, Any], trials: list[FrozenTrial]) -> dict[str, str]:
    """Source key → the source whose runs it reuses, for every source that trains nothing of its own.

    Run i of every source in the linked study trains with the same seed (``seed_base + i``) on the
    same data with the same training settings, so two sources with equal (base_lr, head_lr, decay)
    are the same runs: the sweep's ξ = 1 at the winner's LRs is the control's confirmation runs when
    the control's best sits at those LRs. The owner is the first of them (in plan order) that has a
    run of its own, else the first; the others queue nothing and read the owner's runs. Without a
    ``seed_base`` (a plan from before paired seeds) no two sources share a seed: nothing is reused.
    """
    if "seed_base" not in meta:
        return {}
    tagged = {str(t.user_attrs.get(SOURCE_ATTR)) for t in trials}
    groups: dict[tuple[float, ...], list[str]] = {}
    for src in map(str, meta["sources"]):
        groups.setdefault(tuple(float(meta["params"][src][p]) for p in PARAMS), []).append(src)
    out = {}
    for group in groups.values():
        owner = next((s for s in group if s in tagged), group[0])
        out.update({s: owner for s in group if s != owner and s not in tagged})
    return out


def source_stats(meta: dict[str, Any], trials: list[FrozenTrial], src: Any, first: int | None = None) -> dict[str, Any]:
    """:func:`run_stats` of ``src`` (its runs 0 … ``first`` − 1 when given), read from the source it
    reuses (:func:`run_owners`) when it has one; ``reused_from`` names that source (None: its own runs)."""
    owner = run_owners(meta, trials).get(str(src))
    key = src if owner is None else next(s for s in meta["sources"] if str(s) == owner)
    planned = planned_seeds(meta, src) if first is None else min(first, planned_seeds(meta, src))
    return {**run_stats(trials, key, planned, first), "reused_from": owner}


def runs_saved(storage: str | optuna.storages.BaseStorage, study_name: str) -> int:
    """Runs the linked study did not train because another source holds identical ones (:func:`run_owners`):
    S per reusing source; 0 before ``confirm``."""
    with opened_storage(storage) if isinstance(storage, str) else contextlib.nullcontext(storage) as store:
        linked = linked_runs(store, study_name)
    if linked is None:
        return 0
    meta, trials = linked
    return sum(planned_seeds(meta, src) for src in run_owners(meta, trials))


def linked_runs(store: optuna.storages.BaseStorage, study_name: str) -> tuple[dict, list[FrozenTrial]] | None:
    """The plan and the trials of ``study_name``'s linked study, or None before ``confirm``."""
    meta = read_meta(store, confirm_name(study_name), strict=False)
    if meta is None:
        return None
    return meta, load_study(store, confirm_name(study_name)).get_trials(deepcopy=False)


def all_rows(store: optuna.storages.BaseStorage, study_name: str) -> list[dict] | None:
    """Every confirmed configuration of either arm (the decay sweep's points excluded), in plan order."""
    linked = linked_runs(store, study_name)
    if linked is None:
        return None
    meta, trials = linked
    rows = []
    for src in meta["sources"]:
        if is_sweep(src):
            continue  # the decay sweep's runs: sweep.sweep_summary
        rows.append({
            "source_trial": int(str(src).rsplit(":", 1)[-1]),
            "arm": CONTROL if str(src).startswith(CONTROL + ":") else PLAIN if is_plain(src) else LLRD,
            "params": {p: meta["params"][str(src)][p] for p in PARAMS},
            "search_accuracy": meta["search_accuracy"][str(src)],
            **source_stats(meta, trials, src),
        })
    return rows


def _rows(storage: str | optuna.storages.BaseStorage, study_name: str) -> list[dict] | None:
    with opened_storage(storage) if isinstance(storage, str) else contextlib.nullcontext(storage) as store:
        return all_rows(store, study_name)


def confirmation_summary(storage: str | optuna.storages.BaseStorage, study_name: str) -> list[dict] | None:
    """One dict per confirmed LLRD-arm configuration, best mean first; None when ``study_name`` has
    no linked confirmation study.

    Keys: ``source_trial``, ``arm``, ``params`` (base_lr, head_lr, decay), ``accuracies`` (one per
    finished run), ``by_seed`` (run index → accuracy: the pairing), ``mean``, ``std`` (sample std;
    0.0 with one run), ``n``, ``search_accuracy`` (the source trial's value), ``n_planned`` (S),
    ``n_diverged`` and ``n_failed`` (:func:`run_stats`; :func:`records.runs_text` words them),
    ``reused_from`` (the source whose identical runs it reads, :func:`run_owners`; None: its own). A
    configuration whose runs all failed comes last with NaN mean. The control arm's row:
    :func:`control_summary`.
    """
    rows = _rows(storage, study_name)
    if rows is None:
        return None
    llrd = sorted((r for r in rows if r["arm"] == LLRD), key=lambda r: (r["n"] == 0, -r["mean"] if r["n"] else 0.0, r["source_trial"]))
    # The verdict's winner, once chosen (when the ξ = 1 control at its LRs was queued), stays first:
    # its later seeds are paired with the controls', and a runner-up with fewer seeds does not displace it.
    chosen = _winner(storage, study_name)
    return sorted(llrd, key=lambda r: r["source_trial"] != chosen) if chosen is not None else llrd


def _winner(storage: str | optuna.storages.BaseStorage, study_name: str) -> int | None:
    with opened_storage(storage) if isinstance(storage, str) else contextlib.nullcontext(storage) as store:
        meta = read_meta(store, confirm_name(study_name), strict=False)
    return None if meta is None else meta.get("winner")


def control_summary(storage: str | optuna.storages.BaseStorage, study_name: str) -> dict | None:
    """The confirmed control-arm configuration (same keys as a :func:`confirmation_summary` row;
    ``source_trial`` numbers a trial of ``NAME.control``), or None when none was confirmed."""
    return next((r for r in _rows(storage, study_name) or [] if r["arm"] == CONTROL), None)


def plain_summary(storage: str | optuna.storages.BaseStorage, study_name: str) -> dict | None:
    """Plain fine-tuning (ξ = 1) at the LLRD winner's LRs, confirmed with the same seeds (``arm`` "plain",
    ``source_trial`` the LLRD winner's trial), or None before it was queued."""
    return next((r for r in _rows(storage, study_name) or [] if r["arm"] == PLAIN), None)
