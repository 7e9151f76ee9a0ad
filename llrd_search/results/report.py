"""``llrd-search report``: a study's plots, ``summary.md`` and one self-contained ``report.html``.

The statistics are plain functions over :class:`TrialInfo` records so they can be checked on exact
values; :func:`write_report` reads the study, calls them and the figures in :mod:`plots`, and writes
the files. The HTML embeds its PNGs as data URIs and loads nothing: it opens offline, e.g. mailed.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llrd_search.engine.metrics import study_metric_name
from llrd_search.exceptions import LLRDSearchError
from llrd_search.records import runs_text
from llrd_search.results import plots
from llrd_search.results.plots import TrialInfo, lr_profile, param_importances, trial_infos
from llrd_search.results.summary import (
    ARM_OFF,
    ARM_PREDATES,
    ARM_PRESENT,
    PAPER_TABLE4,
    arms_section,
    header_lines,
    summary_data,
    sweep_section,
)
from llrd_search.results.sweep_plot import plot_decay_sweep
from llrd_search.stats import sweep_interval, welch_threshold
from llrd_search.study.arms import load_control, overall_best, study_predates_control_arm
from llrd_search.study.confirm import Z95
from llrd_search.study.storage import check_storage_url, load_study, opened_storage, spec_of

log = logging.getLogger(__name__)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
# File stems stay fixed whatever the metric (links to accuracy_vs_decay.png keep working).
CAPTIONS = {  # file stem -> caption; {metric} is the study's metric name
    "accuracy_vs_decay": "Validation {metric} vs decay ξ, coloured by base LR; pruned trials faint at their last evaluation.",
    "decay_lr_map": "Validation {metric} over ξ × base LR (log axis), interpolated linearly between complete trials.",
    "lr_profile": "Per-layer learning rates of the best trial beside the flat ξ = 1 profile (log scale).",
    "history": "Optimization history: each trial's {metric} and the best so far.",
    "learning_curves": "Learning curves: validation {metric} at each evaluation during training.",
    "importance": "Parameter importance (Optuna's fANOVA evaluator, seed 0).",
    "decay_sweep": "Decay sweep: the winner's LRs at each ξ, mean ± std over the same seeds, beside Sun et al.'s IMDb row.",
}
FIGURES = {stem: caption.format(metric="accuracy") for stem, caption in CAPTIONS.items()}


def figure_captions(metric: str) -> dict[str, str]:
    return {stem: caption.format(metric=metric) for stem, caption in CAPTIONS.items()}


# --------------------------------------------------------------------------- statistics


def state_counts(trials: Sequence[TrialInfo]) -> dict[str, int]:
    """Trials per state; the usual five always present (zeros included), others when they occur."""
    counts = dict.fromkeys(STATES, 0)
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def compute_seconds(trials: Sequence[TrialInfo]) -> float:
    """Total worker wall time over all trials (failed ones cost compute too)."""
    return sum(t.wall_seconds for t in trials)


def best_trial(trials: Sequence[TrialInfo]) -> TrialInfo | None:
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """Pooled two-proportion z statistic of accuracies p1 (over n1 examples) and p2 (over n2)."""
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0 if p1 == p2 else math.copysign(math.inf, p1 - p2)
    return (p1 - p2) / se


def p_value(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def best_decay_interval(trials: Sequence[TrialInfo], confirmation: list[dict] | None = None, *, proportion: bool = True) -> dict | None:
    """The range of ξ over configurations statistically indistinguishable from the best.

    With confirmation results (several seeds per configuration), a configuration ties with the
    best-mean one when Welch's t-test on the seed means does not reject at 95 %. Otherwise each
    complete trial's accuracy is a binomial proportion over ``n_validation`` examples and it ties
    with the best trial when the pooled two-proportion z-test does not reject at 95 %. A metric
    that is not a proportion (``proportion=False``: F1, MCC) has no such test: without seeds the
    interval is the best trial's ξ alone (method ``not-a-proportion``).
    Returns ``{"low", "high", "best_decay", "members", "compared", "method"}`` or None with no data.
    """
    seeded = [c for c in confirmation or [] if c.get("n", 0) >= 2]
    if seeded:
        top = max(seeded, key=lambda c: c["mean"])
        members = []
        for c in seeded:
            threshold = welch_threshold(top, c)
            if (c["mean"] == top["mean"]) if threshold == 0 else abs(top["mean"] - c["mean"]) < threshold:
                members.append(c)
        decays = [c["params"]["decay"] for c in members]
        return {"low": min(decays), "high": max(decays), "best_decay": top["params"]["decay"], "method": "seeds",
                "members": [c["source_trial"] for c in members], "compared": len(seeded)}
    best = best_trial(trials)
    if best is None:
        return None
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not best.n_validation or not proportion:
        return {"low": best.params["decay"], "high": best.params["decay"], "best_decay": best.params["decay"],
                "method": "unknown-n" if proportion else "not-a-proportion",
                "members": [best.number], "compared": 1}
    members = [t for t in complete if t.n_validation and abs(two_proportion_z(best.value, best.n_validation, t.value, t.n_validation)) < Z95]
    decays = [t.params["decay"] for t in members]
    return {"low": min(decays), "high": max(decays), "best_decay": best.params["decay"], "method": "binomial",
            "members": sorted(t.number for t in members), "compared": sum(bool(t.n_validation) for t in complete)}


# --------------------------------------------------------------------------- writing


def _lr(x: float) -> str:
    return f"{x:.2e}"


def _model_layers(spec: Any) -> int | None:
    """Layer count from the model's config on disk (only when no trial stored its LR table)."""
    try:
        from transformers import AutoConfig

        from llrd_search.engine.model import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(spec.model.name), local_files_only=True)
        return int(getattr(config, "num_hidden_layers", 0)) or None
    except Exception:  # any failure only costs the LR-profile figure, which then says why
        return None


def summary_sections(name: str, url: str, spec: Any, trials: Sequence[TrialInfo], confirmation: list[dict] | None,
                     interval: dict | None, missing: dict[str, str], arms: dict | None = None, metric: str = "accuracy",
                     sweep: list[dict] | None = None, control_trials: Sequence[TrialInfo] = (), base: Path | None = None) -> list[str]:
    """The summary as Markdown sections (without the figure list); values are labelled ``metric``;
    paths shown relative to ``base`` (the study file's folder)."""
    best = best_trial(trials)
    n_val = best.n_validation if best else next((t.n_validation for t in trials if t.n_validation), None)
    sections = ["\n".join(header_lines(name, url, spec, list(trials), list(control_trials), metric, n_val, base))]
    fails = Counter((t.fail_reason or "no reason recorded").splitlines()[0][:160] for t in trials if t.state == "FAIL")
    if fails:
        sections.append("## Failed trials\n\n" + "\n".join(f"- {n}× {reason}" for reason, n in fails.most_common(5)))
    if best is None:
        sections.append("## No complete trial\n\nNo trial has completed yet, so there is no best trial, ξ interval or comparison "
                        "to report. Run more trials (`llrd-search worker --storage URL --study NAME`), then report again.")
    else:
        sections.append(f"## Best trial\n\nTrial {best.number}: validation {metric} **{best.value:.4f}** with base LR "
                        f"{_lr(best.params['base_lr'])}, head LR {_lr(best.params['head_lr'])}, ξ = {best.params['decay']:.3f}.")
        sections.append(_interval_section(interval))
        arms = arms or {}
        sections.append(arms_section(best, arms.get("control"), arms.get("paired"), arms.get("control_arm", ARM_OFF), arms.get("winner")))
        ranked = sorted((t for t in trials if t.state == "COMPLETE"), key=lambda t: -t.value)[:10]
        rows = [f"| {t.number} | {t.value:.4f} | {_lr(t.params['base_lr'])} | {_lr(t.params['head_lr'])} | {t.params['decay']:.3f} |" for t in ranked]
        sections.append(f"## Top complete trials\n\n| trial | {metric} | base LR | head LR | ξ |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if confirmation:
        sections.append(_confirmation_section(confirmation, best, metric))
    if sweep:
        sections.append(sweep_section(sweep, interval, metric))
    if missing:
        sections.append("## What this report cannot show\n\n" + "\n".join(f"- {why}" for why in missing.values()))
    return sections


def _interval_section(iv: dict | None) -> str:
    text = "## Best-ξ interval\n\n"
    if iv is None:
        return text + "Not available."
    text += f"ξ ∈ **[{iv['low']:.3f}, {iv['high']:.3f}]** (best ξ = {iv['best_decay']:.3f}; {len(iv['members'])} of {iv['compared']} compared "
    if iv["method"] == "sweep":
        return text + ("ξ values of the decay sweep tie with the best).\n\nMethod: from `confirm --decay-sweep`, the winner's LRs at each ξ "
                       "with the same seeds; a ξ ties with the best-mean ξ when the paired-t 95 % interval of their per-seed "
                       "differences includes 0 (a ξ with fewer than 2 seeds shared with the best cannot be told apart, so it ties).")
    if iv["method"] == "seeds":
        return text + ("confirmed configurations tie with the best).\n\nMethod: from the confirmation re-runs; a configuration ties with "
                       "the best mean when Welch's t-test on its seed accuracies (mean, std, n) does not reject at 95 %. "
                       "Only confirmed configurations are compared.")
    if iv["method"] == "not-a-proportion":
        return text + ("trials).\n\nThe metric is not a proportion, so no single-run test applies: the interval is the best trial's ξ "
                       "alone. Run `llrd-search confirm` to compare the top configurations over several seeds (Welch's t-test).")
    if iv["method"] == "unknown-n":
        return text + "trials).\n\nThe trials do not record `n_validation`, so no test is possible: the interval is the best trial's ξ alone."
    return text + ("complete trials tie with the best).\n\nMethod: each trial's validation accuracy is a binomial proportion over its "
                   "`n_validation` examples; a trial ties with the best when the pooled two-proportion z-test does not reject at 95 % "
                   "(|z| < 1.96). This counts only validation-set sampling noise, not seed-to-seed training noise, so the interval "
                   "would be wider with it (`llrd-search confirm` measures it by re-running the top configurations with several "
                   "seeds). In the other direction, all trials are scored on the same examples, which makes this unpaired test "
                   "somewhat conservative. Picking the best of many trials also flatters its accuracy (winner's curse).")


def _mean_std(c: dict) -> str:
    return f"{c['mean']:.4f} ± {c['std']:.4f}" if c["n"] else "no run finished"


def _confirmation_section(conf: list[dict], best: TrialInfo | None, metric: str = "accuracy") -> str:
    rows = [f"| {i + 1} | {c['source_trial']} | {_lr(c['params']['base_lr'])} | {_lr(c['params']['head_lr'])} | {c['params']['decay']:.3f} "
            f"| {_mean_std(c)} | {runs_text(c)} | {c['search_accuracy']:.4f} |"
            for i, c in enumerate(conf)]
    done = [c for c in conf if c["n"] > 0]
    if not done:
        return "## Confirmation (re-runs with several seeds)\n\nNo confirmation run has finished yet."
    win = max(done, key=lambda c: c["mean"])
    verdict = (f"Trial {win['source_trial']}'s configuration wins after confirmation (mean {win['mean']:.4f} over {win['n']} seeds)")
    if best is not None and win["source_trial"] != best.number:
        verdict += f"; the search's best was trial {best.number}, so confirmation changed the winner."
    else:
        verdict += "; it is also the search's best."
    return ("## Confirmation (re-runs with several seeds)\n\n| rank | from trial | base LR | head LR | ξ | "
            f"{metric} mean ± std | seeds | search {metric} |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + verdict)


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
code{background:#f3f3f3;padding:0 .2em}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}.missing{color:#8a5a00;background:#fff7e0;padding:.5em}"""


def render_html(title: str, sections: Sequence[str], figures: dict[str, Path], missing: dict[str, str],
                captions: dict[str, str] | None = None) -> str:
    from markdown_it import MarkdownIt

    # Raw HTML off: trial fields (fail reasons, names) are shown as text, never interpreted.
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    parts = [md.render("\n\n".join(sections)), "<h2>Plots</h2>"]
    for stem, caption in (captions or FIGURES).items():
        if stem in figures:
            data = base64.b64encode(figures[stem].read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)} ({figures[stem].name})</figcaption></figure>")
        elif stem in missing:
            parts.append(f'<p class="missing">{html.escape(stem)}: {html.escape(missing[stem])}</p>')
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(storage_url: str, study_name: str, out_dir: str | Path, *, study_file: str | Path | None = None) -> dict[str, Path]:
    """Write the PNGs, ``summary.md`` and ``report.html`` into ``out_dir``; return name → path.
    ``study_file``: paths are shown relative to its folder, its data path instead of the stored one."""
    out = Path(out_dir)
    check_storage_url(storage_url, must_exist=True)  # a storage that holds no study leaves no empty --out folder behind
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LLRDSearchError(f"--out: cannot create folder {out}: {err.strerror}") from None
    try:  # a read-only folder or mount only shows when we try; find out before the plots are drawn
        fd, probe = tempfile.mkstemp(dir=out, prefix=".llrd-write-check-")
    except OSError as err:
        raise LLRDSearchError(f"--out: cannot write into folder {out}: {err.strerror}; pick a writable folder") from None
    os.close(fd)
    os.unlink(probe)
    with opened_storage(storage_url, must_exist=True) as storage:
        study = load_study(storage, study_name)
        try:
            spec = spec_of(study)
        except LLRDSearchError:
            spec = None  # an Optuna study made elsewhere: report it all the same, minus the spec lines
        trials = trial_infos(study)
        metric = study_metric_name(study)
        # Looked up when called (not at import): tests stand in a confirmation_summary of their own.
        from llrd_search.study.confirm import confirmation_summary, control_summary, sweep_summary
        from llrd_search.study.rounds import judged

        confirmation = confirmation_summary(storage, study_name)
        control_study = load_control(study)
        control_trials = trial_infos(control_study) if control_study is not None else []
        control = best_trial(control_trials)
        control_arm = ARM_PRESENT if control_study is not None else ARM_PREDATES if study_predates_control_arm(study) else ARM_OFF
        sweep = sweep_summary(storage, study_name)
        control_row = control_summary(storage, study_name) if confirmation else None
        paired = judged(storage, study_name) if confirmation else None  # against the better of the two controls
        importances, importance_why = param_importances(study, trials)
    best = best_trial(trials)
    if best is None:
        log.warning("study '%s' has no complete trial yet: the report shows trial states only", study_name)
    # A decay sweep answers "which ξ?" at equal LRs and paired seeds: its interval wins when it has one.
    interval = (sweep_interval(sweep) if sweep else None) or best_decay_interval(trials, confirmation, proportion=metric == "accuracy")
    captions = figure_captions(metric)
    paths = {stem: out / f"{stem}.png" for stem in FIGURES}
    band = (interval["low"], interval["high"]) if interval else None
    missing: dict[str, str | None] = {
        "accuracy_vs_decay": plots.plot_accuracy_vs_decay(trials, paths["accuracy_vs_decay"], interval=band, metric=metric, control=control_trials),
        "decay_lr_map": plots.plot_decay_lr_map(trials, paths["decay_lr_map"], metric=metric),
        "history": plots.plot_history(trials, paths["history"], metric=metric),
        "learning_curves": plots.plot_learning_curves(trials, paths["learning_curves"], metric=metric),
        "importance": importance_why or plots.plot_importance(importances or {}, sum(t.state == "COMPLETE" for t in trials), paths["importance"], metric=metric),
    }
    if sweep:
        sweep_band = (interval["low"], interval["high"]) if interval and interval["method"] == "sweep" else None
        missing["decay_sweep"] = plot_decay_sweep(sweep, paths["decay_sweep"], interval=sweep_band, paper=PAPER_TABLE4, metric=metric)
    else:  # no sweep: no figure and nothing to say about it (a stale one from another study goes)
        paths.pop("decay_sweep").unlink(missing_ok=True)
    if best is None:
        missing["lr_profile"] = "the per-layer LR profile needs a complete (best) trial"
    else:
        profile = lr_profile(best, trials, None if any(t.lr_groups for t in trials) or spec is None else _model_layers(spec))
        missing["lr_profile"] = plots.plot_lr_profile(profile, base_lr=best.params["base_lr"], head_lr=best.params["head_lr"],
                                                      decay=best.params["decay"], trial=best.number, path=paths["lr_profile"])
    missing_now = {k: v for k, v in missing.items() if v}
    figures = {stem: p for stem, p in paths.items() if stem not in missing_now}
    for stem in missing_now:
        paths[stem].unlink(missing_ok=True)  # a stale PNG from an earlier report would contradict this one
    winner = overall_best(best, control, confirmation, control_row)  # what `export` exports
    arms = {"control": control, "paired": paired, "control_arm": control_arm, "winner": winner}
    base = Path(study_file).resolve().parent if study_file else None
    if spec is not None and study_file:  # where the data lies for whoever holds the study file, not where it lay when searched
        from llrd_search.spec import load_spec

        spec.data.path = load_spec(study_file).data.path
    sections = summary_sections(study_name, storage_url, spec, trials, confirmation, interval, missing_now, arms, metric, sweep, control_trials, base)
    data = summary_data(best, control, confirmation, paired, interval, sweep, control_arm, winner)
    (out / "summary.json").write_text(json.dumps({"study": study_name, "metric": metric, **data}, indent=2) + "\n", encoding="utf-8")
    plot_list = "## Plots\n\n" + "\n\n".join(f"![{captions[s]}]({p.name})" for s, p in figures.items())
    (out / "summary.md").write_text("\n\n".join([*sections, plot_list]) + "\n", encoding="utf-8")
    (out / "report.html").write_text(render_html(f"LLRD search report: {study_name}", sections, figures, missing_now, captions), encoding="utf-8")
    return {"html": out / "report.html", "summary": out / "summary.md", "summary_json": out / "summary.json", **figures}
