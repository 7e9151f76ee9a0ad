"""Sequential confirmation (``confirm --seeds auto``): paired seeds in rounds, stopping once decided.

Looking at the paired differences after every round and stopping at the first interval that
excludes 0 would call "LLRD helps" far more often than 5 % when it does not: each look is another
chance for noise. The design here is a **group-sequential paired t-test with Lan–DeMets alpha
spending** (Lan & DeMets 1983, Biometrika 70(3):659–663), Pocock-type spending function
α(t) = α·ln(1 + (e − 1)·t), which spends early enough that a large effect stops at the first
looks.

**The level.** With no effect, a false decision ("helps" or "hurts") comes at most 5 % of the time
over all looks together, at most 2.5 % a side, for every plan (``max_seeds`` 3 to :data:`MAX_SEEDS`),
futility stop on or off; exactly 5 % with normal seed noise and no early stop but a decision. The
boundaries are exact for the paired t statistics at the looks: under no effect and normal noise
their joint law does not depend on the unknown variance, so ``tools/seq_boundaries.py`` computed
them once, from 2,000,000 simulated null studies (look k's boundary is where the share of studies
that have crossed by look k equals α(n_k / max_seeds); the first look's is the exact Student-t
quantile), into the table :mod:`llrd_search.seq_boundaries`, which this module reads (nothing is
simulated at run time). The repeated intervals and the conditional power use those boundaries.
Checked: ``tests/test_sequential.py`` simulates 50,000 null studies (another seed) through
:func:`decide_many` (tested to decide as :func:`decide`) and asserts each side <= 2.5 % and both
<= 5 % within two Monte Carlo standard errors at max seeds 5 and 10, futility on and off;
``bench/seq_level.py`` measures 4.97 ± 0.03 % (5) and 5.01 ± 0.03 % (10) with futility off, 4.97
and 4.78 % with it on (400,000 studies). The level is only as good as the noise is normal: rounded
to 1/872 it holds (5.0–5.25 %), with t(3) noise it is lower (3.5 %), and with the committed H100
studies' per-seed differences resampled it is 7–13 %, most of the excess at the first look (3
seeds, 2 degrees of freedom), as for the fixed 5-seed t-test (5.7–8.1 %): docs/results.md.

At each look the **repeated confidence interval** mean ± c_k·sd/√n (Jennison & Turnbull 1989)
decides, and it holds its level jointly over all looks, so the reason to stop is one of:

- ``helps``: the interval lies above 0; ``hurts``: below 0;
- ``no_difference``: it lies within ±``min_effect`` (a difference that would not matter; a
  non-binding futility stop, which can only lower the error rates above);
- ``futile``: before the last look, the **conditional power** is below ``futility`` (default 10 %):
  even if the trend seen so far were the true effect, the last look would decide with less than that
  chance (stochastic curtailment, Lan, Simon & Halperin 1982, *Communications in Statistics C* 1(3):
  207–219; the B-value form of Lan & Wittes 1988, *Biometrics* 44(2):579–585). Also non-binding: it
  stops only to say "cannot tell", so it can only lower the error rates, and it is what keeps a
  no-effect study from spending every seed to say so;
- ``max_seeds``: the last planned look came and none of the above held (cannot tell).

Pure functions on plain numbers (scipy.stats); :mod:`confirm` runs the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

from llrd_search import seq_boundaries as _table

METHOD = "group-sequential paired t-test, Lan-DeMets Pocock-type alpha spending (two-sided 0.05)"
FIRST_LOOK = 3  # the fewest pairs with a spread worth judging (2 degrees of freedom)
MAX_SEEDS = 30  # the largest plan tabulated (llrd_search/seq_boundaries.py)
FUTILITY = 0.10  # conditional power below which another round is not worth its seeds
REASONS = ("helps", "hurts", "no_difference", "futile", "max_seeds")


def looks(max_seeds: int) -> list[int]:
    """The planned looks: 3, 5, 7, ... below ``max_seeds``, then ``max_seeds`` (10 → [3, 5, 7, 10]).

    A look one seed short of the last is dropped: it would spend alpha for almost no information."""
    if max_seeds < FIRST_LOOK:
        raise ValueError(f"max_seeds must be >= {FIRST_LOOK} (got {max_seeds})")
    if max_seeds > MAX_SEEDS:
        raise ValueError(f"max_seeds must be <= {MAX_SEEDS} (got {max_seeds}): no boundaries are tabulated beyond")
    out = list(range(FIRST_LOOK, max_seeds, 2))
    if out and max_seeds - out[-1] == 1 and len(out) > 1:
        out.pop()
    return [*out, max_seeds] if not out or out[-1] != max_seeds else out


def spent(t: float, alpha: float = 0.05) -> float:
    """Pocock-type spending function of Lan & DeMets (1983): the alpha spent by information fraction t."""
    return alpha * math.log(1 + (math.e - 1) * min(max(t, 0.0), 1.0))


def t_boundaries(planned: Sequence[int], alpha: float = 0.05) -> list[float]:
    """Each look's two-sided boundary c_k on the t scale, from the table that ``tools/seq_boundaries.py``
    computed once (:mod:`llrd_search.seq_boundaries`): the plan must be ``looks(max_seeds)``."""
    return list(_t_boundaries(tuple(int(n) for n in planned), alpha))


def _t_boundaries(planned: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    if alpha != _table.ALPHA:
        raise ValueError(f"alpha: only {_table.ALPHA} is tabulated (got {alpha}); rerun tools/seq_boundaries.py for another")
    row = _table.BOUNDARIES.get(planned[-1]) if planned else None
    if row is None or row[0] != planned:
        raise ValueError(f"looks {list(planned)}: no tabulated boundaries; the plan must be looks(max_seeds), "
                         f"{FIRST_LOOK} <= max_seeds <= {MAX_SEEDS}")
    return row[1]


def conditional_power(t_stat: float | np.ndarray, n: int, planned: Sequence[int], alpha: float = 0.05) -> float | np.ndarray:
    """The chance that the last look's boundary is crossed, on the side of the current trend, if the
    trend so far is the true effect (B-value form, Lan & Wittes 1988): with information fraction
    f = n / N, the t statistic and the last boundary c_K read as the normal z's with the same tail
    probabilities (on n − 1 and N − 1 degrees of freedom), B = z·√f and drift θ = z / √f,
    CP = 1 − Φ((z_K − B − θ(1 − f)) / √(1 − f)). The looks between are ignored (crossing there only
    adds), so this errs low by a little, which makes the stop a little readier. Takes an array of t."""
    planned = tuple(int(x) for x in planned)
    total = planned[-1]
    if n >= total:
        return np.zeros_like(t_stat, dtype=float) if np.ndim(t_stat) else 0.0
    f = n / total
    z = _st.norm.isf(_st.t.sf(np.abs(t_stat), n - 1))
    z_last = _st.norm.isf(_st.t.sf(_t_boundaries(planned, alpha)[-1], total - 1))
    cp = _st.norm.sf((z_last - z * math.sqrt(f) - z / math.sqrt(f) * (1 - f)) / math.sqrt(1 - f))
    return cp if np.ndim(t_stat) else float(cp)


def decide(diffs: Sequence[float], look: int, planned: Sequence[int], min_effect: float, alpha: float = 0.05,
           futility: float = FUTILITY) -> dict:
    """The decision at look index ``look`` (0-based into ``planned``) from the paired differences so far.

    Returns ``{"reason"`` (one of :data:`REASONS`, or None: continue), ``"n", "mean", "ci"`` (the repeated
    confidence interval, None with fewer than 2 pairs), ``"boundary"`` (c_k on the t scale),
    ``"power"`` (:func:`conditional_power` before the last look, else None)``}``.
    ``min_effect`` is the smallest difference that matters (accuracy units; 0 turns that stop off);
    ``futility`` the conditional power below which it stops to say "cannot tell" (0 turns that stop off).
    """
    n = len(diffs)
    c = _t_boundaries(tuple(int(x) for x in planned), alpha)[look]
    mean = float(np.mean(diffs)) if n else math.nan
    last = look == len(planned) - 1
    out = {"reason": "max_seeds" if last else None, "n": n, "mean": mean, "ci": None, "boundary": c, "power": None}
    if n < 2:
        return out
    sd = float(np.std(diffs, ddof=1))
    half = c * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    out["ci"] = [lo, hi]
    if lo > 0:
        out["reason"] = "helps"
    elif hi < 0:
        out["reason"] = "hurts"
    elif min_effect > 0 and -min_effect < lo and hi < min_effect:
        out["reason"] = "no_difference"
    elif not last:
        # Identical differences (sd 0) are a perfectly steady trend: full power, never futile.
        out["power"] = conditional_power(mean / sd * math.sqrt(n), n, planned, alpha) if sd > 0 else 1.0
        if out["power"] < futility:
            out["reason"] = "futile"
    return out


def decide_many(diffs: np.ndarray, planned: Sequence[int], min_effect: float, alpha: float = 0.05,
                futility: float = FUTILITY) -> dict[str, np.ndarray]:
    """:func:`decide` run look by look on many studies at once (one row of ``diffs`` a study, at least
    ``planned[-1]`` columns), for simulations: each study's stopping look and what :func:`decide`
    says there. Returns arrays ``"reason"`` (an index into :data:`REASONS`), ``"n"``, ``"mean"``,
    ``"lo"``, ``"hi"`` (the repeated interval). ``tests/test_sequential.py`` checks it equals :func:`decide`."""
    x = np.asarray(diffs, dtype=float)
    plan = tuple(int(p) for p in planned)
    bounds = _t_boundaries(plan, alpha)
    out = {"reason": np.full(len(x), -1), "n": np.zeros(len(x), dtype=int), "mean": np.full(len(x), math.nan),
           "lo": np.full(len(x), math.nan), "hi": np.full(len(x), math.nan)}
    for k, n in enumerate(plan):
        idx = np.flatnonzero(out["reason"] < 0)
        d = x[idx, :n]
        mean, sd = d.mean(axis=1), d.std(axis=1, ddof=1)
        half = bounds[k] * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        last = k == len(plan) - 1
        r = np.full(len(idx), REASONS.index("max_seeds") if last else -1)
        r[(hi < min_effect) & (lo > -min_effect) & (min_effect > 0)] = REASONS.index("no_difference")
        r[hi < 0] = REASONS.index("hurts")
        r[lo > 0] = REASONS.index("helps")
        if not last:
            steady = sd > 0
            t = np.divide(mean, sd, out=np.zeros_like(mean), where=steady) * math.sqrt(n)
            power = np.where(steady, conditional_power(t, n, plan, alpha), 1.0)
            r[(r < 0) & (power < futility)] = REASONS.index("futile")
        for key, val in (("reason", r), ("n", n), ("mean", mean), ("lo", lo), ("hi", hi)):
            out[key][idx] = val
    return out


def stop_text(reason: str | None, n: int, max_seeds: int, min_effect: float, futility: float = FUTILITY) -> str:
    """Why sequential confirmation stopped, in words (the report and ``confirm`` print it)."""
    if reason == "helps":
        return f"stopped after {n} of at most {max_seeds} paired seeds: the repeated 95 % interval lies above 0"
    if reason == "hurts":
        return f"stopped after {n} of at most {max_seeds} paired seeds: the repeated 95 % interval lies below 0"
    if reason == "no_difference":
        return (f"stopped after {n} of at most {max_seeds} paired seeds: the repeated 95 % interval lies within "
                f"±{100 * min_effect:.2f} points, a difference too small to matter")
    if reason == "futile":
        return (f"stopped after {n} of at most {max_seeds} paired seeds: even if the trend so far held, "
                f"{max_seeds} seeds would decide with under {100 * futility:.0f} % chance (conditional power): cannot tell")
    if reason == "max_seeds":
        return f"ran all {max_seeds} paired seeds (the maximum) without a decision: cannot tell"
    return f"{n} of at most {max_seeds} paired seeds so far; not decided yet"
