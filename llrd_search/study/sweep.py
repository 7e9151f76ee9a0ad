"""The decay sweep (``confirm --decay-sweep``): the paper's ξ table for the user's model.

The confirmed winner's ``base_lr`` and ``head_lr`` re-run at each listed ξ with the first S seeds of
its confirmation (``--sweep-seeds``; with ``--seeds auto`` the first look's 3), source key ``sweep:ξ``
in the linked study ``NAME.confirm``, user attr ``llrd:sweep`` = ξ; so the rows are paired, as Sun
et al. did at a fixed LR. The winner's own ξ is its confirmation row (same params, same seeds): it
is not run twice; nor is any ξ whose runs another source already holds
(:func:`confirm_rows.run_owners`: ξ = 1 when the control's best sits at the winner's LRs). The
winner is chosen on the first sweep and kept (its runs are paired); later sweeps add ξ values to the same runs.

The runs live in the linked study and are queued by :func:`queue.top_up` like every confirmation
run; this module only plans the sweep's sources and reads its rows back (:mod:`confirm_rows`). Its interval is
:func:`stats.sweep_interval`; its Markdown, :func:`summary.sweep_section`.
"""

from __future__ import annotations

import contextlib
import json

import optuna

from llrd_search.exceptions import LLRDSearchError
from llrd_search.study.arms import LLRD
from llrd_search.study.confirm_rows import SWEEP, all_rows, confirm_name, is_sweep, linked_runs, planned_seeds, source_stats
from llrd_search.study.storage import load_study, opened_storage
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR

__all__ = ["parse_decays", "prepare_sweep", "sweep_summary"]


def parse_decays(text: str) -> list[float]:
    """``--decay-sweep`` text ("1.0,0.95,0.9") → distinct ξ values, largest first; each 0 < ξ ≤ 1."""
    hint = "pass comma-separated values with 0 < ξ <= 1, e.g. --decay-sweep 1.0,0.95,0.9,0.8,0.7"
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise LLRDSearchError(f"--decay-sweep: no ξ given; {hint}")
    out: set[float] = set()
    for part in parts:
        try:
            xi = float(part)
        except ValueError:
            raise LLRDSearchError(f"--decay-sweep: {part!r} is not a number; {hint}") from None
        if not 0.0 < xi <= 1.0:  # NaN fails too
            raise LLRDSearchError(f"--decay-sweep: ξ = {part} is out of range; {hint}")
        out.add(xi)
    return sorted(out, reverse=True)


def keep_sweep(old: dict | None, meta: dict) -> None:
    """Carry a decay sweep already planned in ``old`` over into the new plan ``meta`` (its runs are paired)."""
    if old and "sweep" in old:
        meta["sweep"] = old["sweep"]
        for key in (k for k in old["sources"] if is_sweep(k)):
            meta["sources"].append(key)
            meta["params"][key] = old["params"][key]
            meta["search_accuracy"][key] = None


def prepare_sweep(url: str, study_name: str, decays: list[float], seeds: int | None = None) -> dict:
    """Queue the decay sweep in the linked study (after :func:`confirm.prepare`): the confirmed
    winner's LRs at each ξ of ``decays`` plus its own, written into the linked study's plan. Runs and
    queues nothing (the caller queues the runs with :func:`queue.top_up`); returns ``meta["sweep"]``.

    ``seeds`` per ξ: None is the plan's S (with ``--seeds auto`` the first look's 3: the sweep is a
    description, not the verdict, and need not follow the verdict's rounds); never more than the
    winner's own, which every ξ pairs with. Every row, the winner's and ξ = 1's included, is read at
    runs 0 … seeds − 1, so the means are over the same seeds. A later sweep keeps the larger count.

    The winner is the confirmed best mean (the search's best when no confirmation run finished),
    chosen on the first sweep and kept: later sweeps add ξ values to the same paired runs.
    """
    with opened_storage(url) as storage:
        linked = load_study(storage, confirm_name(study_name))
        meta = json.loads(linked.user_attrs[META_ATTR])
        sweep = meta.get("sweep")
        if sweep is None:
            rows = [r for r in all_rows(storage, study_name) or [] if r["arm"] == LLRD and r["n"]]
            best = min(rows, key=lambda r: (-r["mean"], r["source_trial"]), default=None)
            first = best["source_trial"] if best else next(s for s in meta["sources"] if isinstance(s, int))
            sweep = {"winner": meta.get("winner", first), "decays": []}  # the verdict's kept winner when there is one
        params = meta["params"][str(sweep["winner"])]
        sweep["decays"] = sorted(set(sweep["decays"]) | set(decays) | {float(params["decay"])}, reverse=True)
        for xi in sweep["decays"]:
            key = f"{SWEEP}:{xi!r}"
            if xi != float(params["decay"]) and key not in meta["sources"]:
                meta["sources"].append(key)
                meta["params"][key] = {"base_lr": params["base_lr"], "head_lr": params["head_lr"], "decay": xi}
                meta["search_accuracy"][key] = None
        own = planned_seeds(meta, sweep["winner"])
        n = min(own, max(int(seeds or meta["seeds"]), int(sweep.get("seeds", 0))))
        sweep["seeds"] = n
        meta["sweep"] = sweep
        if n != meta["seeds"]:
            for key in (k for k in meta["sources"] if is_sweep(k)):
                meta.setdefault("seeds_of", {})[key] = n
        linked.set_user_attr(META_ATTR, json.dumps(meta))
        return sweep


def sweep_summary(storage: str | optuna.storages.BaseStorage, study_name: str) -> list[dict] | None:
    """The decay sweep, one row per ξ (largest first), or None before ``confirm --decay-sweep``.

    Keys: ``decay``, ``base_lr``, ``head_lr`` (the winner's), ``winner`` (its confirm source trial),
    ``own`` (True for the winner's own ξ: its confirmation runs), ``accuracies``, ``by_seed``,
    ``mean``, ``std``, ``n``, ``n_planned``, ``n_diverged``, ``n_failed`` (:func:`confirm_rows.run_stats`),
    ``reused_from`` (the source whose identical runs this ξ reads, e.g. ``control:N`` at ξ = 1; None: its own).
    """
    with opened_storage(storage) if isinstance(storage, str) else contextlib.nullcontext(storage) as store:
        linked = linked_runs(store, study_name)
    if linked is None or "sweep" not in linked[0]:
        return None
    meta, trials = linked
    winner = meta["sweep"]["winner"]
    params = meta["params"][str(winner)]
    rows = []
    for xi in meta["sweep"]["decays"]:
        is_own = xi == float(params["decay"])
        src = winner if is_own else f"{SWEEP}:{xi!r}"
        rows.append({"decay": xi, "base_lr": params["base_lr"], "head_lr": params["head_lr"], "winner": winner, "own": is_own,
                     **source_stats(meta, trials, src, meta["sweep"].get("seeds"))})
    return rows
