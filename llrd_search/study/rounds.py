"""Judging a confirmation: the paired verdict against the control that had its chance, the
sequential stop of ``confirm --seeds auto``, and the held-out test split beside validation.

:func:`judged` is what ``confirm`` and ``report`` both print and write (one reading, one verdict);
:func:`run_sequential` runs the paired seeds in rounds until :mod:`sequential` says the verdict is
decided. The test split never feeds a choice: the winner, the control and the stop are all decided
on validation scores; test scores are only read back and shown beside them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import optuna

from llrd_search.sequential import FUTILITY, METHOD, decide, looks, stop_text
from llrd_search.stats import mean_std, paired_difference, paired_verdict
from llrd_search.study.confirm_rows import confirm_name, confirmation_summary, control_summary, linked_runs, plain_summary
from llrd_search.study.controls import CONTROL_WORDS, pick_control
from llrd_search.study.queue import top_up
from llrd_search.study.storage import load_study, opened_storage
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR

DEFAULT_MAX_SEEDS = 10
DEFAULT_MIN_EFFECT = 0.005  # half a point of accuracy: a smaller difference is not worth a setting


def _store(storage: str | optuna.storages.BaseStorage) -> contextlib.AbstractContextManager:
    return opened_storage(storage) if isinstance(storage, str) else contextlib.nullcontext(storage)


def _pairs(a: dict, b: dict, key: str = "by_seed") -> tuple[list[float], list[float]]:
    seeds = sorted(set(a[key]) & set(b[key]))
    return [a[key][i] for i in seeds], [b[key][i] for i in seeds]


def _seq_text(d: dict, seq: dict) -> str:
    pts = f"{100 * d['mean']:+.2f} points"
    lo, hi = (f"{100 * x:+.2f}" for x in d["ci"]) if d["ci"] else ("?", "?")
    ci = f"repeated 95 % CI [{lo}, {hi}], {d['n']} paired seeds"
    reason = d["reason"]
    if reason == "helps":
        return f"LLRD helps by {pts} ({ci}; sequential, stopped early of at most {seq['max_seeds']})"
    if reason == "hurts":
        return f"LLRD hurts here: {pts} ({ci}; the interval lies below 0)"
    if reason == "no_difference":
        return f"no difference that matters: {pts} ({ci}; within ±{100 * seq['min_effect']:.2f} points)"
    if reason == "futile":
        return (f"no evidence that LLRD helps here: {pts} ({ci}; stopped early: more seeds, up to {seq['max_seeds']}, "
                f"would decide with under {100 * seq['futility']:.0f} % chance even if this trend held)")
    if reason == "max_seeds":
        return f"no evidence that LLRD helps here: {pts} ({ci}; includes 0 at the maximum {seq['max_seeds']} seeds)"
    return f"not decided yet: {pts} ({ci}); run the same command again to continue"


def test_verdict(winner: dict, control: dict, crit: float | None = None) -> dict | None:
    """The paired test-split comparison (winner − control over the seeds both scored), with the same
    critical value as the validation verdict (``crit``; None: the paired t quantile). None without test scores."""
    a, b = _pairs(winner, control, "test_by_seed")
    if not a:
        return None
    d = paired_difference(a, b)
    ci = d["ci"]
    if ci is not None and crit is not None and len(a) > 1:
        half = crit * d["std"] / math.sqrt(len(a))
        ci = [d["mean"] - half, d["mean"] + half]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    text = "not enough paired test scores" if ci is None else (
        f"{100 * d['mean']:+.2f} points on test (95 % CI [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}], {len(a)} paired seeds)")
    return {"llrd": mean(a), "control": mean(b), "gain": d["mean"], "ci95": ci, "n_seeds": len(a), "text": text}


def _first(row: dict, n: int) -> dict:
    """A source's row read at a look: only its runs 0 … n − 1 (the seeds that look planned)."""
    by_seed = {i: x for i, x in row["by_seed"].items() if i < n}
    test = {i: x for i, x in row.get("test_by_seed", {}).items() if i < n}
    mean, std = mean_std(list(by_seed.values()))
    return {**row, "by_seed": by_seed, "test_by_seed": test, "n": len(by_seed), "mean": mean, "std": std}


def judged(storage: str | optuna.storages.BaseStorage, study_name: str) -> dict | None:
    """The verdict: :func:`stats.paired_verdict` of the confirmed winner against :func:`controls.pick_control`'s
    control, plus ``control_source`` (which candidate), ``sequential`` (the design, where it stopped and
    why; None with fixed seeds: then the interval is the plain paired t) and ``test`` (:func:`test_verdict`).
    With ``sequential``, all of it (control choice, gain, intervals, test) reads only the runs of the
    recorded look's seeds. None when either side has no finished run."""
    with _store(storage) as store:
        rows = confirmation_summary(store, study_name)
        if not rows:
            return None
        meta = linked_runs(store, study_name)[0]
        seq = meta.get("sequential")
        # Look k judges exactly its first looks[k] seeds, however many are stored (an interrupted round,
        # a rerun): the design's level holds only then, and a rerun replays the same decisions.
        cut = (lambda r: r) if seq is None else (lambda r: _first(r, seq["looks"][seq["look"]]))
        control, which = pick_control(*(None if r is None else cut(r) for r in (
            control_summary(store, study_name), plain_summary(store, study_name))))
    winner = next((cut(r) for r in rows if r["n"] > 0), None)
    out = paired_verdict([winner] if winner else [], control)
    if out is None:
        return None
    crit = None
    if seq is not None:
        a, b = _pairs(winner, control)
        # A record from before the futility stop existed was run without it: judge it as it was run.
        fut = seq.get("futility", 0.0)
        d = decide([x - y for x, y in zip(a, b, strict=True)], seq["look"], seq["looks"], seq["min_effect"], futility=fut)
        crit = d["boundary"]
        seq = {**seq, "futility": fut, "n": d["n"], "reason": d["reason"], "power": d["power"],
               "stopped": stop_text(d["reason"], d["n"], seq["max_seeds"], seq["min_effect"], fut)}
        # A fixed-n p-value means nothing after optional stopping: the repeated interval is the answer.
        out.update(ci95=d["ci"], p=None, confirmed=d["ci"] is not None, text=_seq_text(d, seq), n_planned=seq["looks"][seq["look"]])
    out.update(control_source=which, sequential=seq, test=test_verdict(winner, control, crit if seq else None))
    if control is not None and which is not None:
        out["text"] += f"; control: {CONTROL_WORDS[which]}"
    return out


def _look(url: str, study_name: str, k: int, plan: list[int], min_effect: float, futility: float) -> dict | None:
    """Record look ``k`` in the plan and return its decision (None when a side has no run)."""
    with opened_storage(url) as storage:
        linked = load_study(storage, confirm_name(study_name))
        meta = json.loads(linked.user_attrs[META_ATTR])
        meta["sequential"] = {"method": METHOD, "looks": plan, "max_seeds": plan[-1], "min_effect": min_effect,
                              "futility": futility, "look": k}
        linked.set_user_attr(META_ATTR, json.dumps(meta))
        v = judged(storage, study_name)
    return None if v is None else v["sequential"]


def _extend(url: str, study_name: str, n: int) -> None:
    """Give the verdict's sources (the winner and both control candidates) ``n`` seeds each."""
    with opened_storage(url) as storage:
        linked = load_study(storage, confirm_name(study_name))
        meta = json.loads(linked.user_attrs[META_ATTR])
        ours = [str(meta["winner"]), *(str(s) for s in meta["sources"] if str(s).startswith(("control:", "plain:")))]
        seeds_of = meta.setdefault("seeds_of", {})
        for src in ours:
            seeds_of[src] = max(n, int(seeds_of.get(src, meta["seeds"])))
        linked.set_user_attr(META_ATTR, json.dumps(meta))
        top_up(storage, linked)


def run_sequential(url: str, study_name: str, run: Callable[[], None], max_seeds: int, min_effect: float,
                   futility: float = FUTILITY) -> dict[str, Any] | None:
    """Run the verdict's paired seeds in rounds (looks at :func:`sequential.looks`) until decided.

    Call after the first round (every configuration at the first look's seeds, the second control
    candidate queued). Resumable: a look whose runs exist queues nothing, and every look is judged
    again from the first on exactly its own seeds (:func:`judged`), so a resumed or repeated command
    makes the uninterrupted run's decisions and records the look it stopped at. Returns the last
    look's ``sequential`` record (None when a side has no finished run)."""
    plan = looks(max_seeds)
    seq = None
    for k, n in enumerate(plan):
        if k:
            _extend(url, study_name, n)
            run()
        seq = _look(url, study_name, k, plan, min_effect, futility)
        if seq is None or seq["reason"] is not None:
            break
    return seq
