"""The sequential verdict's level and power by simulation (issue 26), for docs/results.md.

Three tables, each from :func:`llrd_search.sequential.decide_many` (tested equal to ``decide``) with
``min_effect`` 0, max seeds 5 and 10, the futility stop off (0) and on (10 %):

1. no effect, normal paired differences: false "helps" / "hurts" / any, ± one Monte Carlo SE, with the
   tabulated boundaries ("new") and with the old ones (the normal-scale Pocock boundaries read as
   Student-t quantiles look by look, as before issue 26), on the same simulated studies;
2. power ("helps") and mean paired seeds at effects of 0.5 to 2 sd, new and old, max seeds 10;
3. the level when seed noise is not normal: (a) N(0, 0.5 points) differences rounded to 1/872 (SST-2's
   validation set), (b) Student t with 3 df, (c) the committed H100 studies' per-seed differences
   resampled: every paired comparison there (the verdict's winner − control and each swept ξ − ξ = 1,
   5 seeds each), centred on its own mean (no effect) and scaled by √(5/4) to undo the centring's
   shrinkage, pooled per task (25 values) and drawn with replacement; (c') the same with a random sign
   on each draw (the null as "the two arms are exchangeable", which makes a difference symmetric).
Each noise row also gives the false decisions made at the first look (3 seeds) and, for reference,
the level of the fixed ``--seeds 5`` paired t-test on the first 5 differences of the same studies.

4. every ``--max-seeds`` from 3 to 30: the level with normal differences, futility off.

Seeds 1000+ (the boundary table was built with another). Usage: python bench/seq_level.py [STUDIES]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import stats

import llrd_search.sequential as seq

sys.path.insert(0, str(Path(__file__).parent))
from replay_verdict import load  # noqa: E402

# The boundaries before issue 26 (t quantiles of the normal-scale Pocock-type boundaries' nominal levels).
OLD = {(3, 5): (5.170797577237504, 3.4645151074788547),
       (3, 5, 7, 10): (6.827356305399625, 3.972741177592291, 3.2863521223874295, 2.8235516624450003)}
NEW = seq._t_boundaries


def run(x: np.ndarray, m: int, futility: float, old: bool = False) -> dict:
    seq._t_boundaries = (lambda p, a: OLD[p]) if old else NEW  # conditional power reads the same boundaries
    try:
        d = seq.decide_many(x, seq.looks(m), 0.0, futility=futility)
    finally:
        seq._t_boundaries = NEW
    s = len(x)
    out = {k: float(np.mean(d["reason"] == i)) for i, k in enumerate(("helps", "hurts"))}
    out["any"] = out["helps"] + out["hurts"]
    out["se"] = {k: (p * (1 - p) / s) ** 0.5 for k, p in out.items()}
    out["seeds"] = float(d["n"].mean())
    out["sd0"] = float(np.mean(d["hi"] == d["lo"]))  # stopped with identical differences (sd 0)
    out["first"] = float(np.mean((d["reason"] <= 1) & (d["n"] == seq.FIRST_LOOK)))  # false decisions at 3 seeds
    x5 = x[:, :5]  # the fixed --seeds 5 paired t-test (two-sided 5 %) on the same noise, for reference
    with np.errstate(divide="ignore", invalid="ignore"):
        t5 = x5.mean(axis=1) / x5.std(axis=1, ddof=1) * 5**0.5
    out["fixed5"] = float(np.mean(np.abs(t5) > stats.t.isf(0.025, 4)))
    return out


def pct(r: dict, k: str) -> str:
    return f"{100 * r[k]:.2f} ± {100 * r['se'][k]:.2f} %"


def residuals(db: str, study: str) -> np.ndarray:
    meta, runs = load(db, study)
    val = {s: np.array([runs[s][i][0] for i in range(5)]) for s in runs}
    base = val["sweep:1.0"]
    ctrl = next(s for s in runs if s.startswith("control:"))
    # The verdict's control: the control arm's best, or ξ = 1 at the winner's LRs where that is better.
    pairs = [("1" if "sst2" in study else "8", base if base.mean() >= val[ctrl].mean() else val[ctrl])]
    pairs += [(s, base) for s in runs if s.startswith("sweep:") and s != "sweep:1.0"]
    out = [(val[a] - b) - (val[a] - b).mean() for a, b in pairs]
    return np.concatenate(out) * (5 / 4) ** 0.5


def main(studies: int = 400_000) -> None:
    print(f"# {studies:,} null studies a row; min_effect 0; ± one Monte Carlo SE")
    print("## 1. no effect, normal differences: false helps / false hurts / any (mean seeds)")
    for m in (5, 10):
        x = np.random.default_rng(1000 + m).standard_normal((studies, m))
        for fut in (0.0, 0.10):
            for old in (True, False):
                r = run(x, m, fut, old)
                print(f"max {m:2d} futility {fut:.0%} {'old' if old else 'new'}: helps {pct(r, 'helps')}, "
                      f"hurts {pct(r, 'hurts')}, any {pct(r, 'any')} (mean seeds {r['seeds']:.2f})")
    print("## 2. power (helps) and mean seeds, max seeds 10")
    for effect in (0.5, 1.0, 1.5, 2.0):
        x = np.random.default_rng(2000 + int(10 * effect)).normal(effect, 1.0, (studies // 4, 10))
        for fut in (0.10, 0.0):
            o, n = run(x, 10, fut, True), run(x, 10, fut)
            print(f"effect {effect} sd futility {fut:.0%}: new helps {pct(n, 'helps')}, {n['seeds']:.2f} seeds; "
                  f"old helps {pct(o, 'helps')}, {o['seeds']:.2f} seeds")
    print("## 3. the level when seed noise is not normal (new boundaries)")
    rng = np.random.default_rng(3000)
    pools = {f"H100 {t} residuals": residuals(f"docs/results/{t}-minilm-full.db", f"{t}-minilm-full") for t in ("sst2", "trec")}
    for name, pool in pools.items():
        print(f"{name}: {len(pool)} values, sd {100 * pool.std(ddof=1):.2f} points, "
              f"distinct {len(np.unique(np.round(pool * 1e6)))}, excess kurtosis {float(((pool - pool.mean())**4).mean() / pool.var()**2 - 3):.2f}")
    for m in (5, 10):
        noises = {"(a) N(0, 0.5 pt) rounded to 1/872": np.round(rng.normal(0, 0.005, (studies, m)) * 872) / 872,
                  "(b) t(3)": rng.standard_t(3, (studies, m))}
        noises |= {f"(c) {k} resampled": rng.choice(p, (studies, m)) for k, p in pools.items()}
        # Under "the two arms are exchangeable" a paired difference is as likely -d as d: random signs.
        noises |= {f"(c') {k} resampled, random signs": rng.choice(p, (studies, m)) * rng.choice([-1.0, 1.0], (studies, m))
                   for k, p in pools.items()}
        for name, x in noises.items():
            for fut in (0.0, 0.10):
                r = run(x, m, fut)
                print(f"max {m:2d} futility {fut:.0%} {name}: helps {pct(r, 'helps')}, hurts {pct(r, 'hurts')}, "
                      f"any {pct(r, 'any')}; at the first look {100 * r['first']:.2f} %; on sd 0 {100 * r['sd0']:.2f} %; "
                      f"fixed 5-seed t-test: {100 * r['fixed5']:.2f} %")
    print("## 4. every plan the CLI accepts: any false decision, normal differences, futility off")
    worst = []
    for m in range(seq.FIRST_LOOK, seq.MAX_SEEDS + 1):
        r = run(np.random.default_rng(4000 + m).standard_normal((studies // 4, m)), m, 0.0)
        worst.append((abs(r["any"] - 0.05) / r["se"]["any"], m))
        print(f"max {m:2d}: helps {pct(r, 'helps')}, hurts {pct(r, 'hurts')}, any {pct(r, 'any')}")
    print(f"largest |any - 5 %| / SE: {max(worst)[0]:.2f} (max seeds {max(worst)[1]})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
