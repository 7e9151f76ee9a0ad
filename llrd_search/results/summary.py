"""The answer of a study in words and in ``summary.json``: does LLRD help, and which ξ?

Before ``confirm`` the only honest statement is the two arms' search bests, *unconfirmed*: single
trials at different learning rates and seeds, so no p-value is given for their difference. After
``confirm`` the verdict is the paired difference of the confirmed winner and the confirmed control
over the seeds both ran (:func:`stats.paired_verdict`). Pure functions over plain data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from llrd_search.records import runs_text
from llrd_search.results.plots import TrialInfo

# Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?", Table 4: BERT-base on IMDb,
# test error rate (%) by decay factor ξ, as reported in the paper. Only the rows we are sure of;
# the paper's table has no ξ below 0.85 that we could confirm, so none is listed.
PAPER_TABLE4 = {1.0: 5.42, 0.95: 5.40, 0.9: 5.52, 0.85: 5.65}
PAPER_SOURCE = "Sun et al. 2019, Table 4 (BERT-base, IMDb, test error %)"


def _lr(x: float) -> str:
    return f"{x:.2e}"


def unconfirmed_text(best: TrialInfo | None, control: TrialInfo | None) -> str:
    if best is None or control is None:
        missing = "the LLRD arm" if best is None else "the control arm (ξ = 1)"
        return f"unconfirmed: {missing} has no complete trial, so there is nothing to compare"
    return (f"unconfirmed: search bests LLRD {best.value:.4f} (trial {best.number}, ξ = {best.params['decay']:.3f}) vs control "
            f"{control.value:.4f} (trial {control.number} of the control arm), {100 * (best.value - control.value):+.2f} points; "
            "single trials at different learning rates and seeds, not a measured gain: run `llrd-search confirm` for the paired verdict")


def shown_path(path: str, base: Path | None) -> str:
    """A path as a report shows it: relative to ``base`` (the study file's folder); never a machine's
    absolute path (one that lies far from ``base`` shows as its folder name)."""
    p = Path(path)
    if not p.is_absolute():
        if not p.exists():  # a hub id, or a relative path that names nothing here
            return p.as_posix()
        p = p.resolve()
    try:
        rel = Path(os.path.relpath(p, base or Path.cwd())).as_posix()
    except ValueError:  # another drive on Windows
        return p.name
    return p.name if rel.startswith("../..") else rel


def shown_storage(url: str, base: Path | None) -> str:
    """The storage URL, password masked; a SQLite file's path as :func:`shown_path` shows it."""
    from llrd_search.study.storage import mask_url

    prefix = "sqlite:///"
    return prefix + shown_path(url[len(prefix):], base) if url.startswith(prefix) else mask_url(url)


def header_lines(name: str, url: str, spec: Any, trials: list[TrialInfo], control_trials: list[TrialInfo], metric: str,
                 n_validation: int | None, base: Path | None = None) -> list[str]:
    """The report's opening lines; the trial count covers both arms, as the budget does."""
    head = [f"# LLRD search report: study `{name}`", ""]
    if base is not None:
        head.append("- paths: relative to the study file's folder")
    head += [f"- storage: `{shown_storage(url, base)}`", f"- metric: validation {metric} (maximized)"]
    if spec is not None:
        head += [f"- model: `{shown_path(spec.model.name, base)}` (max_length {spec.model.max_length})",
                 f"- data: `{shown_path(spec.data.path, base)}` (label column `{spec.data.label}`; {n_validation or '?'} validation examples)",
                 f"- training: {spec.train.epochs} epoch(s), batch {spec.train.batch_size}, {spec.train.evals_per_epoch} evaluations per epoch",
                 f"- search: sampler {spec.study.sampler}, pruner {spec.study.pruner}"]
    every = [*trials, *control_trials]
    states = {s: sum(t.state == s for t in every) for s in ("COMPLETE", "PRUNED", "FAIL")}
    states |= {t.state: sum(u.state == t.state for u in every) for t in every}
    words = {"FAIL": "failed"}
    arms = f" ({len(trials)} LLRD + {len(control_trials)} control)" if control_trials else ""
    budget = f" of budget {spec.study.n_trials} finished (complete + pruned)" if spec is not None else ""
    head += [f"- trials: {len(every)}{arms}{budget}; {', '.join(f'{n} {words.get(s, s.lower())}' for s, n in states.items())}",
             f"- total compute time: {sum(t.wall_seconds for t in every) / 60:.1f} min (sum of trial wall times, both arms)"]
    return head


# summary.json's `control_arm`: whether the study has the ξ = 1 arm, and why not.
ARM_PRESENT, ARM_OFF, ARM_PREDATES = "present", "off", "predates"


def winner_text(winner: dict | None) -> str:
    """One sentence: the configuration ``llrd-search export`` writes (:func:`arms.overall_best`)."""
    if winner is None:
        return ""
    p = winner["params"]
    how = (f"best confirmed mean over the seeds every configuration ran; {winner['confirmed']['mean']:.4f} over "
           f"{winner['confirmed']['n']} seed(s)" if winner["selected_by"] == "confirmation"
           else f"best search result, {winner['value']:.4f}; unconfirmed")
    if winner["arm"] == "control":
        return (f"Best configuration overall: **the control arm's trial {winner['trial']} (ξ = 1, plain fine-tuning)**, base LR "
                f"{_lr(p['base_lr'])}, head LR {_lr(p['head_lr'])} ({how}): LLRD did not beat it, and `llrd-search export` "
                "exports it (decay 1.0, `arm: control`).")
    return (f"Best configuration overall: LLRD trial {winner['trial']}, ξ = {p['decay']:.3f} ({how}); `llrd-search export` exports it.")


def arms_section(best: TrialInfo | None, control: TrialInfo | None, paired: dict | None, control_arm: str,
                 winner: dict | None = None) -> str:
    """Markdown: the two arms, the verdict (confirmed or not) and which configuration wins overall;
    ``control_arm`` is one of ``ARM_*``."""
    text = "## Does LLRD help? LLRD vs plain fine-tuning (ξ = 1)\n\n"
    if control_arm == ARM_PREDATES:
        return text + ("The control arm was not part of this study: it was created by a version of llrd-search from before the "
                       "control arm existed (its stored spec has no `control_fraction`, read as 0), so nothing here tells LLRD's "
                       "effect from the learning rates'. Search again in a new study (a new `study.name`) for the LR-matched control.")
    if control_arm != ARM_PRESENT:
        return text + ("This study has no control arm (`control_fraction = 0` or a grid), so nothing here tells LLRD's effect "
                       "from the learning rates'. Set `[study] control_fraction` (e.g. 0.25) in a new study.")
    rows = []
    for arm, t in (("LLRD", best), ("control (ξ = 1)", control)):
        rows.append(f"| {arm} | " + (f"{t.number} | {t.value:.4f} | {_lr(t.params['base_lr'])} | {_lr(t.params['head_lr'])} | {t.params['decay']:.3f} |"
                                     if t else "– | no complete trial | | | |"))
    table = "| arm | search best trial | accuracy | base LR | head LR | ξ |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    tail = f"\n\n{winner_text(winner)}" if winner else ""
    if paired is None:
        return text + table + "\n\n**" + unconfirmed_text(best, control) + ".**" + tail
    which = ("plain fine-tuning (ξ = 1) at the LLRD winner's own LRs, which beat the control arm's best"
             if paired.get("control_source") == "winner_lrs" else f"the control arm's best, trial {paired['control']}")
    return (text + table + f"\n\nConfirmed (confirm trial {paired['winner']} vs the better of two controls: {which}; paired seeds): "
            f"**{paired['text']}**." + _stop_line(paired) + _test_table(paired) + tail)


def _stop_line(paired: dict) -> str:
    seq = paired.get("sequential")
    if not seq:
        return ""
    return f"\n\nSequential confirmation ({seq['method']}): {seq['stopped']}."


def _test_table(paired: dict) -> str:
    """Validation and the held-out test split side by side (the test split decided nothing)."""
    t = paired.get("test")
    if not t:
        return ""

    def ci(x: list | None) -> str:
        return "–" if x is None else f"[{100 * x[0]:+.2f}, {100 * x[1]:+.2f}]"

    return ("\n\n| | validation | held-out test |\n|---|---|---|\n"
            f"| paired gain, points (95 % CI) | {100 * paired['gain']:+.2f} {ci(paired['ci95'])} | {100 * t['gain']:+.2f} {ci(t['ci95'])} |\n"
            f"| paired seeds | {paired['n_seeds']} | {t['n_seeds']} |\n\n"
            f"Test means: LLRD winner {t['llrd']:.4f}, control {t['control']:.4f}. The test split is scored only by confirmation "
            "runs and never used for a choice (winner, control and stop are all decided on validation).")


def sweep_section(rows: list[dict], interval: dict | None, metric: str = "accuracy") -> str:
    """Markdown: the decay sweep's table (ξ, mean ± std, n) beside the paper's IMDb row, and its interval."""
    first = rows[0]
    text = (f"## Decay sweep: the paper's ξ table for this model\n\nThe confirmed winner's base LR {_lr(first['base_lr'])} and "
            f"head LR {_lr(first['head_lr'])} (confirm trial {first['winner']}) re-run at each ξ with the same seeds (run i of "
            f"every ξ used the same seed), as Sun et al. did at a fixed LR. The paper's column is {PAPER_SOURCE}, as reported "
            "there: another model, data set and metric, for reference only (lower is better there).\n\n"
            f"| ξ | {metric} mean ± std | n | paper: IMDb test error % |\n|---|---|---|---|\n")
    for r in rows:
        ms = f"{r['mean']:.4f} ± {r['std']:.4f}" if r["n"] else "no run finished"
        paper = PAPER_TABLE4.get(round(r["decay"], 6))
        own = " (winner's ξ)" if r["own"] else ""
        if r.get("reused_from"):  # identical runs (same LRs, ξ, seeds) another row already holds
            own += " (the control's runs, reused)" if str(r["reused_from"]).startswith("control:") else " (reused runs)"
        text += f"| {r['decay']:.3f}{own} | {ms} | {runs_text(r)} | {'' if paper is None else f'{paper:.2f}'} |\n"
    extra = sorted(x for x in PAPER_TABLE4 if all(abs(x - r["decay"]) > 1e-9 for r in rows))
    if extra:
        text += "\nThe paper also reports " + ", ".join(f"ξ = {x} → {PAPER_TABLE4[x]:.2f} %" for x in reversed(extra)) + ".\n"
    if interval is not None and interval.get("method") == "sweep":
        text += (f"\nBest ξ from the sweep: {interval['best_decay']:.3f}; ξ values not distinguishable from it (paired t over "
                 f"shared seeds, 95 %): {', '.join(f'{x:.3f}' for x in interval['members'])}.")
    return text


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def summary_data(best: TrialInfo | None, control: TrialInfo | None, confirmation: list[dict] | None, paired: dict | None,
                 interval: dict | None, sweep: list[dict] | None = None, control_arm: str = ARM_PRESENT,
                 winner: dict | None = None) -> dict:
    """What ``summary.json`` holds (see README: best, best_control, control_arm, winner, verdict,
    decay_interval, decay_sweep). ``best`` is the LLRD arm's; ``winner`` (:func:`arms.overall_best`)
    the configuration of either arm that ``export`` writes."""
    out: dict[str, Any] = {
        "best": None,
        "best_control": None,
        "control_arm": control_arm,
        "winner": None,
        "verdict": None,
        "decay_interval": [interval["low"], interval["high"]] if interval else None,
        "decay_interval_method": interval["method"] if interval else None,
        "decay_sweep": [{k: _finite(r.get(k)) for k in ("decay", "mean", "std", "n", "n_planned", "n_diverged", "reused_from")}
                        for r in sweep or []],
    }
    if best is not None:
        out["best"] = {"trial": best.number, "accuracy": best.value, **{p: best.params[p] for p in ("base_lr", "head_lr", "decay")}}
        win = next((r for r in confirmation or [] if r["n"] > 0), None)
        if win is not None:
            out["best"]["confirmed"] = {"trial": win["source_trial"], **{k: win.get(k) for k in ("mean", "std", "n", "n_planned", "n_diverged")}}
    if control is not None:
        out["best_control"] = {"trial": control.number, "accuracy": control.value, "base_lr": control.params["base_lr"],
                               "head_lr": control.params["head_lr"], "decay": control.params.get("decay", 1.0)}
    if winner is not None:
        conf = winner["confirmed"]
        out["winner"] = {"arm": winner["arm"], "trial": winner["trial"], "selected_by": winner["selected_by"], "accuracy": winner["value"],
                         **{p: winner["params"][p] for p in ("base_lr", "head_lr", "decay")},
                         "confirmed": None if conf is None else {k: _finite(conf.get(k)) for k in ("mean", "std", "n", "n_planned", "n_diverged")}}
    out["test"] = None
    if paired is not None:
        out["verdict"] = {k: paired.get(k) for k in ("gain", "ci95", "n_seeds", "n_planned", "n_diverged", "confirmed", "text",
                                                      "control_source")}
        seq = paired.get("sequential")
        # How many paired seeds ran and why it stopped: fixed seeds stop at S by plan.
        out["verdict"]["stopped"] = ({"reason": seq["reason"], "text": seq["stopped"], "seeds_run": paired["n_seeds"],
                                      "max_seeds": seq["max_seeds"], "looks": seq["looks"], "min_effect": seq["min_effect"],
                                      "futility": seq.get("futility"), "conditional_power": seq.get("power"),
                                      "method": seq["method"]} if seq else
                                     {"reason": "fixed_seeds", "text": f"fixed --seeds {paired['n_planned']}", "seeds_run": paired["n_seeds"]})
        t = paired.get("test")
        if t is not None:
            out["test"] = {"llrd": t["llrd"], "control": t["control"], "verdict": {k: t[k] for k in ("gain", "ci95", "n_seeds", "text")}}
    else:
        gain = best.value - control.value if best is not None and control is not None else None
        out["verdict"] = {"gain": gain, "ci95": None, "n_seeds": 0, "confirmed": False, "text": unconfirmed_text(best, control)}
    return out
