"""Statistics for the report and ``confirm``: pure functions on plain numbers (scipy.stats quantiles).

- :func:`paired_difference`: the LLRD-vs-control verdict, a paired t interval over seeds that ran
  both configurations with the same seed (same data order and head initialisation);
- :func:`welch_threshold`: the smallest difference of two seed means Welch's t-test calls real;
- :func:`sweep_interval`: the ξ values of a decay sweep that paired seeds cannot tell from the best;
- :func:`mean_std`: sample mean and standard deviation;
- :func:`paired_verdict` and :func:`verdict`: those tests applied to confirmation rows (``mean``,
  ``std``, ``n``, ``by_seed``), for ``confirm`` and the report.

Nothing here compares single trials at different learning rates: such a difference mixes the
decay's effect with the learning rate's and the seed's, and no p-value can separate them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats as _st


def t_quantile(df: float, level: float = 0.95) -> float:
    """Two-sided Student-t quantile (``level`` = 0.95 gives 12.706 at df = 1, 1.96 as df → ∞)."""
    return float(_st.t.ppf(0.5 + level / 2, df))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std); std is 0.0 for one value, both NaN for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``a[i] - b[i]`` with its paired-t confidence interval and two-sided p-value.

    ``a`` and ``b`` are accuracies of two configurations trained with the same seeds, in seed order.
    Returns ``{"mean", "ci": [lo, hi], "n", "std", "p"}``; ``ci`` and ``p`` are None with fewer than
    two pairs (no spread to judge). Identical differences give a zero-width interval.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    out = {"mean": mean, "ci": None, "n": n, "std": std, "p": None}
    if n < 2:
        return out
    if std == 0:
        out.update(ci=[mean, mean], p=0.0 if mean != 0 else 1.0)
        return out
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    out.update(ci=[mean - half, mean + half], p=float(_st.ttest_rel(a, b).pvalue))
    return out


def sweep_interval(rows: Sequence[dict], level: float = 0.95) -> dict | None:
    """The best-ξ interval of a decay sweep: every ξ whose seed runs the best-mean ξ's do not beat.

    ``rows`` hold ``decay``, ``mean``, ``n`` and ``by_seed`` (run index → accuracy; run i of every ξ
    used the same seed). A ξ ties with the best when the paired-t interval (:func:`paired_difference`)
    of best minus it over their shared seeds includes 0; with fewer than two shared seeds nothing
    tells them apart, so it ties too. Ties of the best mean go to the larger ξ (less decay).
    Returns ``{"low", "high", "best_decay", "members" (ξ values), "compared", "method": "sweep"}``,
    or None when no ξ has a finished run.
    """
    done = [r for r in rows if r["n"] > 0]
    if not done:
        return None
    top = max(done, key=lambda r: (r["mean"], r["decay"]))
    members = []
    for r in done:
        seeds = sorted(set(top["by_seed"]) & set(r["by_seed"]))
        d = paired_difference([top["by_seed"][i] for i in seeds], [r["by_seed"][i] for i in seeds], level)
        if r is top or d["ci"] is None or d["ci"][0] <= 0 <= d["ci"][1]:
            members.append(r["decay"])
    return {"low": min(members), "high": max(members), "best_decay": top["decay"], "members": sorted(members, reverse=True),
            "compared": len(done), "method": "sweep"}


def welch_threshold(a: dict, b: dict, level: float = 0.95) -> float | None:
    """Smallest difference of seed means that Welch's t-test calls real at ``level``, for two rows
    with ``mean``, ``std`` and ``n``. None when either has fewer than 2 runs."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    return t_quantile(df, level) * math.sqrt(va + vb)


def paired_verdict(summary: list[dict], control: dict | None) -> dict | None:
    """Does LLRD help? The confirmed winner (best mean) minus the confirmed control, seed by seed.

    Returns ``{"winner", "control", "gain", "ci95", "n_seeds", "n_planned", "n_diverged", "p",
    "confirmed", "text"}`` (gain and CI in accuracy units, over the seeds both finished; ``n_diverged``
    counts each side's diverged runs, which no pair includes); ``confirmed`` is False, and ``ci95``
    None, with fewer than two paired seeds. None when either side has no finished run.
    """
    winner = next((r for r in summary if r["n"] > 0), None)
    if winner is None or control is None or control["n"] == 0:
        return None
    seeds = sorted(set(winner["by_seed"]) & set(control["by_seed"]))
    if not seeds:
        return None
    d = paired_difference([winner["by_seed"][i] for i in seeds], [control["by_seed"][i] for i in seeds])
    planned = max(winner.get("n_planned", d["n"]), control.get("n_planned", d["n"]))
    diverged = {"llrd": winner.get("n_diverged", 0), "control": control.get("n_diverged", 0)}
    text = verdict_text(d["mean"], d["ci"], d["n"])
    if d["n"] < planned:  # a lost seed must show: a run that diverged on one side only is evidence too
        lost = ", ".join(f"{k} diverged in the {arm}" for arm, k in (("LLRD winner", diverged["llrd"]), ("control", diverged["control"])) if k)
        text += f"; n = {d['n']} of {planned} paired seeds" + (f" ({lost})" if lost else "")
    return {"winner": winner["source_trial"], "control": control["source_trial"], "gain": d["mean"], "ci95": d["ci"],
            "n_seeds": d["n"], "n_planned": planned, "n_diverged": diverged, "p": d["p"], "confirmed": d["ci"] is not None, "text": text}


def _on_shared_seeds(a: dict, b: dict) -> tuple[dict, dict]:
    """Two rows restricted to the run indices both hold (``by_seed``); unchanged without ``by_seed``
    or when nothing is shared."""
    shared = sorted(set(a.get("by_seed") or {}) & set(b.get("by_seed") or {}))
    if not shared or len(shared) == a["n"] == b["n"]:
        return a, b

    def cut(r: dict) -> dict:
        mean, std = mean_std([r["by_seed"][i] for i in shared])
        return {**r, "mean": mean, "std": std, "n": len(shared)}

    return cut(a), cut(b)


def verdict(summary: list[dict]) -> dict[str, Any] | None:
    """The winner after confirmation and whether noise could explain its lead over the runner-up.

    The lead is within noise when Welch's t-test on the seed means does not reject at 95 % (the
    same test the report uses for its best-xi interval); both over the seeds the two ran (with
    ``--seeds auto`` the runner-up keeps the first look's). None when nothing finished.
    """
    done = [r for r in summary if r["n"] > 0]
    if not done:
        return None
    winner = done[0]
    out: dict[str, Any] = {"winner": winner["source_trial"], "mean": winner["mean"], "std": winner["std"], "n": winner["n"]}
    if len(done) < 2:
        out.update(runner_up=None, lead=None, noise=None, within_noise=None)
        return out
    second = done[1]
    # Over the seeds both ran: with --seeds auto the winner has more seeds than the runner-up.
    a, b = _on_shared_seeds(winner, second)
    lead = a["mean"] - b["mean"]
    noise = welch_threshold(a, b)  # None: one run has no spread, noise cannot be judged
    out.update(runner_up=second["source_trial"], lead=lead, noise=noise, within_noise=None if noise is None else lead < noise)
    return out


def verdict_text(gain: float, ci: list[float] | None, n: int) -> str:
    """The one-sentence answer to "does LLRD help?" from a paired difference (accuracy units)."""
    pts = f"{100 * gain:+.2f} points"
    if ci is None:
        return f"not enough paired seeds to judge: {pts} over {n} seed(s) (run confirm with --seeds 2 or more)"
    lo, hi = (f"{100 * x:+.2f}" for x in ci)
    if ci[0] > 0:
        return f"LLRD helps by {pts} (95 % CI [{lo}, {hi}], {n} paired seeds)"
    if ci[1] < 0:
        return f"LLRD hurts here: {pts} (95 % CI [{lo}, {hi}] lies below 0, {n} paired seeds)"
    return f"no evidence that LLRD helps here: {pts} (95 % CI [{lo}, {hi}] includes 0)"
