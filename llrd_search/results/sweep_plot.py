"""The report's decay-sweep figure: this model's mean ± std at each ξ (the winner's LRs, the same
seeds), and under it, on its own panel and its own unflipped scale, the paper's ξ row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from llrd_search.results.plots import XI, _save


def _n_labels(ax: object, done: Sequence[dict]) -> None:
    """Seeds per ξ: said once in the legend when all agree; otherwise only the ξ values that differ
    are labelled, alternately above and below their point so neighbours' labels never meet."""
    n_max = max(r["n"] for r in done)
    odd = [r for r in done if r["n"] != n_max]
    for i, r in enumerate(odd):
        ax.annotate(f"n={r['n']}", (r["decay"], r["mean"]), textcoords="offset points", xytext=(0, 10 if i % 2 == 0 else -16),
                    ha="center", fontsize=7, color="tab:blue")


def plot_decay_sweep(rows: Sequence[dict], path: Path, *, interval: tuple[float, float] | None = None,
                     paper: dict[float, float] | None = None, metric: str = "accuracy") -> str | None:
    """The decay sweep (top) and, when given, the paper's row (bottom panel, test error %, lower is better)."""
    done = [r for r in rows if r["n"] > 0]
    if not done:
        return "the decay sweep has no finished run yet (run `llrd-search confirm ... --decay-sweep` again to resume)"
    fig = Figure(figsize=(7.5, 5.8 if paper else 4.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3]) if paper else [fig.subplots()]
    ax = axes[0]
    if interval is not None:
        ax.axvspan(interval[0] - 0.004, interval[1] + 0.004, color="gold", alpha=0.25, lw=0, label="best-ξ interval (paired t, 95 %)")
    n_max = max(r["n"] for r in done)
    ax.errorbar([r["decay"] for r in done], [r["mean"] for r in done], yerr=[r["std"] for r in done], fmt="o-", color="tab:blue",
                capsize=4, label=f"this model: mean ± std over seeds (n = {n_max}{' unless labelled' if any(r['n'] != n_max for r in done) else ''})")
    _n_labels(ax, done)
    ax.set_ylabel(f"validation {metric}")
    base, head = done[0]["base_lr"], done[0]["head_lr"]
    ax.set_title(f"Decay sweep at base LR {base:.2e}, head LR {head:.2e}", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    if paper:
        low = axes[1]
        xs = sorted(paper)
        low.plot(xs, [paper[x] for x in xs], "s--", color="tab:grey")
        for x in xs:
            low.annotate(f"{paper[x]:.2f}", (x, paper[x]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="tab:grey")
        low.set_ylabel("test error %\n(lower is better)", fontsize=8)
        low.set_title("Sun et al. 2019, Table 4: BERT-base on IMDb (another model and data set, for reference)", fontsize=8)
        low.margins(y=0.35)
        low.grid(alpha=0.3)
    axes[-1].set_xlabel(f"{XI} (same base and head LR at every ξ)")
    _save(fig, path)
    return None
