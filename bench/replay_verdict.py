"""What ``confirm --seeds auto`` would have run and decided, replayed on a committed confirmation.

Run i of every configuration in ``NAME.confirm`` trains with seed ``seed_base + i`` whatever the mode,
and identical runs give identical accuracies (docs/results.md), so the first n runs of a fixed
``--seeds 5`` confirmation are exactly the runs a sequential confirmation makes at n seeds. This
replays the sequential design (:mod:`llrd_search.sequential`, with the two-candidate control of
:mod:`llrd_search.study.controls` and the run reuse of issue 19) on those runs and sums their
recorded ``wall_seconds``: no training, no GPU. A look beyond the runs the study holds cannot be
replayed and is reported as such.

Usage: python3 bench/replay_verdict.py DB STUDY [MAX_SEEDS ...]
"""

from __future__ import annotations

import json
import sys

import optuna

from llrd_search.sequential import FUTILITY, decide, decide_many, looks, stop_text
from llrd_search.stats import paired_difference
from llrd_search.study.controls import pick_control
from llrd_search.vocab import CONFIRM_OF_ATTR, CONFIRM_REP_ATTR


def load(db: str, study: str) -> tuple[dict, dict]:
    linked = optuna.load_study(study_name=f"{study}.confirm", storage=f"sqlite:///{db}")
    meta = json.loads(linked.user_attrs["llrd:confirm"])
    runs: dict[str, dict[int, tuple[float | None, float]]] = {}
    for t in linked.get_trials(deepcopy=False):
        if t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED"):
            runs.setdefault(str(t.user_attrs[CONFIRM_OF_ATTR]), {})[int(t.user_attrs[CONFIRM_REP_ATTR])] = (
                t.value if t.state.name == "COMPLETE" else None, float(t.user_attrs.get("wall_seconds", 0.0)))
    return meta, runs


def row(runs: dict, src: str, n: int) -> dict:
    by_seed = {i: v for i, (v, _) in runs.get(src, {}).items() if i < n and v is not None}
    vals = list(by_seed.values())
    return {"by_seed": by_seed, "n": len(vals), "mean": sum(vals) / len(vals) if vals else float("nan")}


def replay(meta: dict, runs: dict, max_seeds: int | None, futility: float = FUTILITY) -> dict:
    """max_seeds None: the fixed --seeds 5 confirmation; else --seeds auto --max-seeds N (--futility)."""
    params = meta["params"]
    llrd = [str(s) for s in meta["sources"] if isinstance(s, int)]
    control = next(str(s) for s in meta["sources"] if str(s).startswith("control:"))
    plan = looks(max_seeds) if max_seeds else [5]
    first = plan[0]
    winner = max(llrd, key=lambda s: (row(runs, s, first)["mean"], -llrd.index(s)))
    w = params[winner]
    # ξ = 1 at the winner's LRs: the sweep's ξ = 1 runs (the same LRs and seeds), or the control's own
    # runs when the control's best sits at those LRs (then they are reused: trained once).
    plain_key = next((str(s) for s in meta["sources"] if str(s).startswith("sweep:") and float(params[str(s)]["decay"]) == 1.0), None)
    shared = all(float(params[control][p]) == float(v) for p, v in {"base_lr": w["base_lr"], "head_lr": w["head_lr"], "decay": 1.0}.items())
    plain_key = control if shared else plain_key
    seeds = {s: first for s in llrd} | {control: first, plain_key: first}
    outcome, n = None, first
    for k, n in enumerate(plan):
        if n > min(len(runs.get(s, {})) for s in (winner, control, plain_key)):
            outcome = {"reason": f"not replayable: look {n} needs runs the study does not hold"}
            break
        for s in (winner, control, plain_key):
            seeds[s] = n
        ctrl, which = pick_control(row(runs, control, n), row(runs, plain_key, n))
        win = row(runs, winner, n)
        common = sorted(set(win["by_seed"]) & set(ctrl["by_seed"]))
        diffs = [win["by_seed"][i] - ctrl["by_seed"][i] for i in common]
        if max_seeds:
            d = decide(diffs, k, plan, 0.005, futility=futility)
            outcome = {"reason": d["reason"], "ci": d["ci"], "mean": d["mean"], "control": which, "power": d["power"],
                       "text": stop_text(d["reason"], d["n"], plan[-1], 0.005, futility)}
            if d["reason"]:
                break
        else:
            d = paired_difference([win["by_seed"][i] for i in common], [ctrl["by_seed"][i] for i in common])
            outcome = {"reason": "fixed_seeds", "ci": d["ci"], "mean": d["mean"], "control": which, "text": "fixed --seeds 5"}
    # The decay sweep: every other ξ at the winner's LRs, on the plan's S seeds (fixed: 5; auto: the
    # first look's 3, confirm --sweep-seeds' default), the first of the winner's.
    own = float(w["decay"])
    for s in (str(x) for x in meta["sources"] if str(x).startswith("sweep:")):
        if float(params[s]["decay"]) not in (own, 1.0):  # ξ = 1 at the winner's LRs is plain_key's runs
            seeds[s] = first
    used = [(s, i) for s, m in seeds.items() for i in range(m) if i in runs.get(s, {})]
    return {"winner": winner, "seeds": n, "runs": len(used), "trial_seconds": sum(runs[s][i][1] for s, i in used), **outcome}


def simulate(effect: float, max_seeds: int = 10, studies: int = 100_000, seed: int = 17, futility: float = FUTILITY) -> tuple[float, float]:
    """(mean paired seeds the verdict uses, share that says "helps") with normal paired differences of
    mean ``effect`` (in sd units); :func:`decide_many` is ``decide`` on many studies at once."""
    import numpy as np

    d = decide_many(np.random.default_rng(seed).normal(effect, 1.0, (studies, max_seeds)), looks(max_seeds), 0.0, futility=futility)
    return float(d["n"].mean()), float(np.mean(d["reason"] == 0))


def main(db: str, study: str = "", *max_seeds: str) -> None:
    if db == "--simulate":  # the expected cost of the docs' pipeline shape by effect size
        from scipy import stats

        for effect in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0):
            n, power = simulate(effect)
            n0, power0 = simulate(effect, futility=0.0)
            # confirm --top 3 + 2 controls + 4 other sweep ξ: the runners-up and the sweep stay at 3 seeds,
            # the winner and the two controls go to n; fixed: 9 sources x 5.
            fixed = stats.nct.sf(stats.t.isf(0.025, 4), 4, effect * 5 ** 0.5)  # the fixed 5-seed paired t says "helps"
            print(f"effect {effect:.1f} sd: fixed --seeds 5 says helps {fixed:.1%}; "
                  f"auto: mean {n:.2f} paired seeds of at most 10, says helps {power:.1%}; "
                  f"runs vs fixed 5 seeds: {(2 * 3 + 3 * n + 4 * 3) / 45:.0%}  "
                  f"(without the futility stop: {n0:.2f} seeds, helps {power0:.1%}, {(2 * 3 + 3 * n0 + 4 * 3) / 45:.0%})")
        return
    meta, runs = load(db, study)
    fixed = replay(meta, runs, None)
    print(f"{study} fixed --seeds 5: winner {fixed['winner']}, {fixed['runs']} runs, {fixed['trial_seconds']:.0f} trial-s, "
          f"gain {100 * fixed['mean']:+.2f} [{100 * fixed['ci'][0]:+.2f}, {100 * fixed['ci'][1]:+.2f}] vs {fixed['control']}")
    for m in max_seeds or ("5", "10"):
        a = replay(meta, runs, int(m))
        ci = f" [{100 * a['ci'][0]:+.2f}, {100 * a['ci'][1]:+.2f}]" if a.get("ci") else ""
        print(f"{study} --seeds auto --max-seeds {m}: winner {a['winner']}, stopped at {a['seeds']} seeds ({a['reason']}), "
              f"{a['runs']} runs ({a['runs'] / fixed['runs']:.0%}), {a['trial_seconds']:.0f} trial-s "
              f"({a['trial_seconds'] / fixed['trial_seconds']:.0%}), gain {100 * a.get('mean', float('nan')):+.2f}{ci} vs {a.get('control')}")


if __name__ == "__main__":
    main(*sys.argv[1:])
