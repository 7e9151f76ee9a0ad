"""The report's figures: bare matplotlib ``Figure`` objects (no pyplot: no display needed, no global
state changed on import) drawn from plain trial records (:class:`TrialInfo`, read by :func:`trial_infos`).

Each ``plot_*`` function either writes its PNG and returns ``None``, or draws nothing and returns
the reason it cannot (too few trials, no data), which the report prints in the figure's place.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

XI = "decay ξ"
BEST_STYLE = {"marker": "*", "s": 260, "facecolor": "none", "edgecolor": "crimson", "linewidths": 1.6, "zorder": 5}


@dataclass(frozen=True)
class TrialInfo:
    number: int
    state: str
    value: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    intermediate: dict[int, float] = field(default_factory=dict)
    lr_groups: list[dict] | None = None
    n_validation: int | None = None
    wall_seconds: float = 0.0
    fail_reason: str | None = None

    @property
    def last_intermediate(self) -> float | None:
        return self.intermediate[max(self.intermediate)] if self.intermediate else None


def trial_infos(study: optuna.Study) -> list[TrialInfo]:
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        out.append(TrialInfo(
            number=t.number, state=t.state.name, value=t.value, params=dict(t.params), intermediate=dict(t.intermediate_values),
            lr_groups=a.get("lr_groups"), n_validation=a.get("n_validation"), wall_seconds=float(a.get("wall_seconds") or 0.0),
            fail_reason=a.get("fail_reason"),
        ))
    return out


def lr_profile(best: TrialInfo, trials: Sequence[TrialInfo], n_layers: int | None = None) -> list[tuple[str, float]]:
    """(group, LR) rows of the best trial: its stored table, else recomputed for the layer count
    taken from any other trial's table or from ``n_layers`` (the model config)."""
    from llrd_search.engine.param_groups import layer_lrs

    if best.lr_groups:
        return [(row["name"], float(row["lr"])) for row in best.lr_groups]
    known = next((t.lr_groups for t in trials if t.lr_groups), None)
    if known:
        n_layers = sum(row["name"].startswith("layer.") for row in known)
    if not n_layers:
        return []
    return list(layer_lrs(n_layers, base_lr=best.params["base_lr"], decay=best.params["decay"], head_lr=best.params["head_lr"]).items())


def param_importances(study: optuna.Study, trials: Sequence[TrialInfo]) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances, or (None, why not). Fewer than 2 complete trials, or params that never
    vary, would give Optuna's evaluators nothing to attribute (they return equal shares)."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    if len(complete) < 2:
        return None, f"parameter importance needs ≥ 2 complete trials (this study has {len(complete)})"
    if all(t.params == complete[0].params for t in complete):
        return None, "parameter importance needs complete trials with different parameters (all complete trials share one point)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            imp = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as err:
            return None, f"parameter importance could not be computed: {err}"
    return {k: float(v) for k, v in imp.items()}, None


def _axes(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)


def _lr_norm(values: Sequence[float]) -> LogNorm:
    lo, hi = min(values), max(values)
    if hi <= lo * 1.0001:  # one LR only: widen so the colour scale still has a range
        lo, hi = lo / 1.5, hi * 1.5
    return LogNorm(vmin=lo, vmax=hi)


def is_control(t: TrialInfo) -> bool:
    """The no-decay control: ξ = 1 (plain fine-tuning)."""
    return abs(t.params.get("decay", 0.0) - 1.0) < 1e-9


def plot_accuracy_vs_decay(
    trials: Sequence[TrialInfo], path: Path, *, interval: tuple[float, float] | None = None, metric: str = "accuracy",
    control: Sequence[TrialInfo] = (),
) -> str | None:
    """The metric against ξ, coloured by base LR; pruned trials faint at their last evaluation; the
    control arm's trials (all at ξ = 1) as red diamonds."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    pruned = [t for t in trials if t.state == "PRUNED" and t.last_intermediate is not None]
    n_failed = sum(t.state == "FAIL" for t in trials)
    if not complete and not pruned and not control:
        return f"{metric} vs ξ needs a finished (complete or pruned) trial"
    norm = _lr_norm([t.params["base_lr"] for t in [*complete, *pruned] or control])
    fig, ax = _axes(7.5, 4.8)
    if interval is not None:
        ax.axvspan(interval[0] - 0.004, interval[1] + 0.004, color="gold", alpha=0.25, lw=0, label="best-ξ interval")
    if pruned:
        ax.scatter([t.params["decay"] for t in pruned], [t.last_intermediate for t in pruned], c=[t.params["base_lr"] for t in pruned],
                        norm=norm, cmap="viridis", alpha=0.3, marker="v", s=30, label="pruned (last evaluation)")
    if complete:
        ax.scatter([t.params["decay"] for t in complete], [t.value for t in complete], c=[t.params["base_lr"] for t in complete],
                        norm=norm, cmap="viridis", s=46, edgecolor="black", linewidth=0.4, label="complete", zorder=3)
        best = max(complete, key=lambda t: t.value)
        ax.scatter([best.params["decay"]], [best.value], **BEST_STYLE, label=f"best: trial {best.number}, {best.value:.4f}")
    arm = [(t.value if t.state == "COMPLETE" else t.last_intermediate, t.state == "COMPLETE") for t in control]
    arm = [(v, done) for v, done in arm if v is not None]
    for done in (True, False):
        values = [v for v, d in arm if d is done]
        if values:
            ax.scatter([1.0] * len(values), values, marker="D", s=40 if done else 26, facecolor="none", edgecolor="tab:red",
                       alpha=1.0 if done else 0.4, linewidths=1.2, zorder=4,
                       label=f"control arm (ξ = 1): {len(values)} {'complete' if done else 'pruned'}")
    controls = [t.value for t in complete if is_control(t)] + [v for v, d in arm if d]
    if controls:
        ax.axhline(max(controls), color="grey", ls=":", lw=1, label=f"best ξ = 1 control: {max(controls):.4f}")
    ax.axvline(1.0, color="grey", ls="--", lw=1, label="no decay (ξ = 1)")
    # A mappable of its own: the pruned points' transparency must not fade the colour bar.
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="base LR (top layer), log scale")
    ax.set_xlabel(f"{XI}  (layer i trains at base LR · ξ^(L−1−i))")
    ax.set_ylabel(f"validation {metric}")
    ax.margins(y=0.1)  # room for the best trial's star under the title
    failed = f", {n_failed} failed (not shown)" if n_failed else ""
    arm_text = f" + {len(arm)} control" if arm else ""
    ax.set_title(f"{_cap(metric)} vs decay: {len(complete)} complete, {len(pruned)} pruned{failed}{arm_text}")
    fig.legend(fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_decay_lr_map(trials: Sequence[TrialInfo], path: Path, *, metric: str = "accuracy") -> str | None:
    """The metric over (ξ, base LR): linear interpolation between trials in (ξ, log10 LR) space."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    if len(complete) < 2:
        return "the ξ × base LR map needs ≥ 2 complete trials"
    x = np.array([t.params["decay"] for t in complete])
    y = np.log10([t.params["base_lr"] for t in complete])
    z = np.array([t.value for t in complete])
    norm = Normalize(vmin=z.min(), vmax=z.max() if z.max() > z.min() else z.min() + 1e-3)
    fig, ax = _axes(7.5, 4.8)
    how = "points only (too few distinct points to interpolate)"
    try:
        # Triangulation fails on < 3 distinct or collinear points; the scatter alone still says a lot.
        cs = ax.tricontourf(x, y, z, levels=12, cmap="magma", norm=norm, alpha=0.85)
        how = "interpolated between trials"
    except (ValueError, RuntimeError):
        cs = None
    sc = ax.scatter(x, y, c=z, cmap="magma", norm=norm, s=40, edgecolor="black", linewidth=0.7, zorder=3)
    ax.scatter([], [], facecolor="none", edgecolor="black", s=40, label=f"complete trial (colour: its {metric})")
    best = int(np.argmax(z))
    ax.scatter([x[best]], [y[best]], **{**BEST_STYLE, "edgecolor": "deepskyblue"}, label=f"best ({z[best]:.4f})")
    fig.colorbar(cs if cs is not None else sc, ax=ax, label=f"validation {metric}")
    # Pad the limits: trials on the hull's edge would otherwise sit on the frame, half hidden.
    for lo, hi, setter in ((x.min(), x.max(), ax.set_xlim), (y.min(), y.max(), ax.set_ylim)):
        pad = 0.06 * (hi - lo) or 0.05
        setter(lo - pad, hi + pad)
    ax.set_yticks(_lr_ticks(y.min(), y.max()))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _sci(10**v)))
    ax.set_xlabel(XI)
    ax.set_ylabel("base LR (top layer), log scale")
    ax.set_title(f"{_cap(metric)} over ξ × base LR ({how})", fontsize=11)
    fig.legend(fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    ax.grid(alpha=0.25)
    _save(fig, path)
    return None


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sci(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _lr_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of round LRs (1, 2, 5 x 10^k; denser on a narrow range) within [lo, hi]."""
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [np.log10(m) + e for e in range(int(np.floor(lo)) - 1, int(np.ceil(hi)) + 1) for m in mantissas]
        ticks = [t for t in ticks if lo - 0.05 <= t <= hi + 0.05]
        if len(ticks) >= 3:
            return ticks
    return [lo, hi] if hi > lo else [lo]


def plot_lr_profile(profile: Sequence[tuple[str, float]], *, base_lr: float, head_lr: float, decay: float, trial: int, path: Path) -> str | None:
    """One bar pair per LR group: the best trial's LLRD profile beside the flat ξ = 1 profile."""
    if not profile:
        return "the best trial has no per-layer LR table and the layer count is unknown"
    names = [name for name, _lr in profile]
    best = [lr for _name, lr in profile]
    flat = [head_lr if name == "head" else base_lr for name in names]
    pos = np.arange(len(names))
    fig, ax = _axes(max(7.5, 0.45 * len(names) + 2), 4.8)
    ax.bar(pos - 0.2, best, width=0.4, color="tab:blue", label=f"best trial {trial} (ξ = {decay:.3f})")
    ax.bar(pos + 0.2, flat, width=0.4, color="tab:grey", alpha=0.7, label="no decay (ξ = 1), same base and head LR")
    ax.set_yscale("log")
    # Headroom above the tallest bar keeps the legend off the bars.
    ax.set_ylim(min(best + flat) / 1.3, max(best + flat) * 2.5)
    ax.set_xticks(pos, names, rotation=45 if len(names) > 10 else 0, ha="right" if len(names) > 10 else "center")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_xlabel("parameter group, bottom (embeddings) → top (head)")
    ratio = best[0] / flat[0] if flat[0] else float("nan")
    ax.set_title(f"Per-layer learning rates of the best trial (embeddings at {ratio:.2g}× base LR)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.25)
    _save(fig, path)
    return None


def plot_history(trials: Sequence[TrialInfo], path: Path, *, metric: str = "accuracy") -> str | None:
    """Each finished trial's metric by trial number, and the best so far."""
    finished = sorted((t for t in trials if t.state == "COMPLETE"), key=lambda t: t.number)
    pruned = [t for t in trials if t.state == "PRUNED" and t.last_intermediate is not None]
    if not finished:
        return "the optimization history needs a complete trial"
    fig, ax = _axes(7.5, 4.3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.last_intermediate for t in pruned], color="tab:grey", alpha=0.4, marker="v", s=24,
                   label="pruned (last evaluation)")
    ax.scatter([t.number for t in finished], [t.value for t in finished], color="tab:blue", s=28, label="complete", zorder=3)
    xs = [t.number for t in finished]
    ys = list(np.maximum.accumulate([t.value for t in finished]))
    last = max(t.number for t in trials)  # carry the line to the newest trial, whatever its state
    ax.step([*xs, last], [*ys, ys[-1]], where="post", color="crimson", label="best so far")
    _finish_integer_axes(fig, ax, path, "trial number", f"validation {metric}", f"Optimization history ({len(finished)} complete, {len(pruned)} pruned)")
    return None


def plot_learning_curves(trials: Sequence[TrialInfo], path: Path, *, metric: str = "accuracy") -> str | None:
    """The validation metric at each evaluation; complete trials coloured by ξ, pruned ones grey."""
    curves = [t for t in trials if t.state in ("COMPLETE", "PRUNED") and t.intermediate]
    if not curves:
        return "the learning curves need a finished trial that reported evaluations"
    decays = [t.params["decay"] for t in curves if t.state == "COMPLETE"] or [0.0, 1.0]
    lo, hi = min(decays), max(decays)
    norm = Normalize(vmin=lo, vmax=hi) if hi > lo else Normalize(vmin=lo - 0.05, vmax=hi + 0.05)
    cmap = colormaps["plasma"]
    fig, ax = _axes(7.5, 4.5)
    complete = [t for t in curves if t.state == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    for t in curves:
        steps = sorted(t.intermediate)
        values = [t.intermediate[s] for s in steps]
        if t.state == "PRUNED":
            ax.plot(steps, values, color="grey", alpha=0.35, lw=1, marker=".", ms=4)
        else:
            ax.plot(steps, values, color=cmap(norm(t.params["decay"])), alpha=0.8, lw=2.6 if t is best else 1.2, marker="o", ms=3.5)
    if complete:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"{XI} of complete trials")
    if len(complete) < len(curves):
        ax.plot([], [], color="grey", alpha=0.5, label="pruned")
    if best is not None:
        ax.plot([], [], color="black", lw=2.6, label=f"thick: best (trial {best.number})")
    _finish_integer_axes(fig, ax, path, "evaluation index (evaluations at equal intervals over training)", f"validation {metric}",
                         f"Learning curves of {len(complete)} complete and {len(curves) - len(complete)} pruned trial(s)")
    return None


def _finish_integer_axes(fig: Figure, ax: Axes, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, integer x ticks (trial numbers, evaluation indices), legend and grid; then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_importance(importances: dict[str, float], n_trials: int, path: Path, *, metric: str = "accuracy") -> str | None:
    """Horizontal bars of fANOVA importance per parameter."""
    if not importances:
        return "no importances to plot"
    names = sorted(importances, key=importances.get)
    fig, ax = _axes(6.5, 3.2)
    ax.barh(names, [importances[n] for n in names], color="tab:green")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    ax.set_xlabel(f"importance (fANOVA share of {metric} variance)")
    rough = " (few trials: a rough guide)" if n_trials < 10 else ""
    ax.set_title(f"Parameter importance over {n_trials} complete trials{rough}", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return None
