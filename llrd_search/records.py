"""Typed records of what a confirmation and a report hand on: confirmed rows, verdicts, the ξ interval.

:mod:`confirm` and :mod:`report` compute these as plain dicts (their documented return values and
``summary.json``); the search layer (:mod:`results_api`) turns them into these dataclasses, field
for field and in the same order, so ``dataclasses.asdict`` gives back the very dict (what
``confirm --format json`` prints). A key added on one side without the other fails loudly
(``TypeError``) instead of going missing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, Self


def _finite(x: Any) -> Any:
    """NaN (a configuration with no finished run) is not JSON: None instead."""
    return None if isinstance(x, float) and math.isnan(x) else x


def runs_text(row: dict) -> str:
    """A row's n as tables and the CLI show it: "5" when all planned runs finished, else e.g.
    "4 of 5, 1 diverged" (a diverged or failed run is never silently left out of n)."""
    n, planned = row["n"], row.get("n_planned", row["n"])
    extra = [f"{row[key]} {word}" for key, word in (("n_diverged", "diverged"), ("n_failed", "failed")) if row.get(key)]
    return str(n) if n == planned and not extra else ", ".join([f"{n} of {planned}", *extra])


@dataclass(kw_only=True)
class Runs:
    """One configuration's finished runs; ``by_seed`` (run index → value) is the pairing across rows."""

    accuracies: list[float]
    by_seed: dict[int, float]
    mean: float  # NaN with no finished run
    std: float  # sample std; 0.0 with one run
    n: int
    n_planned: int  # S: n falls short by the runs that diverged, failed for good, or have not run yet
    n_diverged: int  # ended PRUNED by the divergence guard; never re-run (a result about the configuration)
    n_failed: int
    test_by_seed: dict[int, float]  # run index → held-out test score (empty without a test split): never ranked by
    test_mean: float | None
    reused_from: str | None  # the source whose identical runs (same LRs, ξ, seeds) these are; None: its own

    HEAD: ClassVar[tuple[str, ...]] = ()  # the keys that come before the runs' in the dict form

    @classmethod
    def of(cls, row: dict[str, Any]) -> Self:
        return cls(**row)

    @property
    def n_text(self) -> str:
        """n as the CLI and the report show it: "5", or "4 of 5, 1 diverged" (:func:`runs_text`)."""
        return runs_text({"n": self.n, "n_planned": self.n_planned, "n_diverged": self.n_diverged, "n_failed": self.n_failed})

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data, keys in the order confirm has always printed (NaN → None)."""
        data = {k: _finite(v) for k, v in asdict(self).items()}
        return {**{k: data.pop(k) for k in self.HEAD}, **data}


@dataclass(kw_only=True)
class ConfirmRow(Runs):
    """One confirmed configuration (:func:`confirm.confirmation_summary` row; ``arm`` "llrd", "control", or
    "plain": ξ = 1 at the LLRD winner's LRs, ``source_trial`` that winner's)."""

    source_trial: int  # a trial of the search, or of its control arm (``NAME.control``)
    arm: str
    params: dict[str, float]
    search_accuracy: float | None  # the source trial's value in the search

    HEAD: ClassVar[tuple[str, ...]] = ("source_trial", "arm", "params", "search_accuracy")


@dataclass(kw_only=True)
class SweepRow(Runs):
    """One ξ of the decay sweep (:func:`confirm.sweep_summary` row): the winner's LRs at ``decay``."""

    decay: float
    base_lr: float
    head_lr: float
    winner: int  # the confirm source trial whose LRs are swept
    own: bool  # the winner's own ξ: these are its confirmation runs

    HEAD: ClassVar[tuple[str, ...]] = ("decay", "base_lr", "head_lr", "winner", "own")


@dataclass
class Verdict:
    """The winner after confirmation and whether noise could explain its lead (:func:`confirm.verdict`)."""

    winner: int
    mean: float
    std: float
    n: int
    runner_up: int | None
    lead: float | None
    noise: float | None  # the 95 % Welch threshold; None: one run each, noise cannot be judged
    within_noise: bool | None


@dataclass
class PairedVerdict:
    """LLRD's confirmed winner minus the confirmed control, seed by seed (:func:`confirm.paired_verdict`)."""

    winner: int
    control: int
    gain: float
    ci95: list[float] | None
    n_seeds: int
    n_planned: int  # S: the pairs there would be had every run of both sides finished
    n_diverged: dict[str, int]  # diverged runs per side ({"llrd": k, "control": m}): seeds no pair includes
    p: float | None
    confirmed: bool
    text: str
    control_source: str | None = None  # "control_arm" or "winner_lrs" (ξ = 1 at the winner's LRs): :func:`controls.pick_control`
    sequential: dict[str, Any] | None = None  # --seeds auto: the design, the look it stopped at and why (:mod:`rounds`)
    test: dict[str, Any] | None = None  # the held-out test split: each side's mean and the paired difference


@dataclass
class DecayInterval:
    """The ξ range the report cannot tell from the best (``summary.json``: decay_interval and its method)."""

    low: float
    high: float
    method: str  # "sweep", "seeds", "binomial", "unknown-n" or "not-a-proportion"


@dataclass
class ReportVerdict:
    """``summary.json``'s verdict: the paired one after ``confirm``, else the arms' unconfirmed bests."""

    gain: float | None
    ci95: list[float] | None
    n_seeds: int
    confirmed: bool
    text: str


# --------------------------------------------------------------------------- the search layer's results


@dataclass
class Created:
    """A study made (or found, and resumed) in its storage."""

    study_name: str
    url: str
    created: bool
    budget: int
    finished: int
    note: str | None = None  # the budget was capped to the grid's size
    control_study: str | None = None  # the control arm's study, when the search has one
    control_trials: int = 0  # of the budget, the trials the control arm tunes


@dataclass
class Launch:
    """The local workers a run starts, and where the study stands when they start."""

    workers: int
    threads: int
    where: str  # "on cpu", "on cuda", or "running my_objective.py"
    budget: int
    finished: int
    best: float | None
    metric: str
    # On a GPU machine, how the workers were placed and why (study/gpus.py GpuPlan.line):
    # "8 workers: 2 per GPU on 4 GPUs (auto: ~3.1 GiB per trial, ...), 2 threads each".
    gpu_plan: str | None = None
    best_arm: str | None = None  # the arm that holds ``best`` ("llrd" or "control")
    counts: str | None = None  # what the progress counts when not the study's trials ("runs this round"), from 0

    @property
    def remaining(self) -> int:
        return self.budget - self.finished


@dataclass
class Best:
    """A study's (or its control arm's) best COMPLETE trial."""

    trial: int
    value: float
    params: dict[str, float]


@dataclass
class Summary:
    """A study's best trial by its metric, and its control arm's best (unconfirmed)."""

    metric: str
    best: Best | None
    control_best: Best | None


@dataclass
class RunResult:
    created: Created
    summary: Summary


class Watcher(Protocol):
    """What a run reports while it works, in this order: created, started, then step and trial
    (from whichever worker) until the budget is spent, then close (always). ``confirm`` reports
    started … close once per round of runs, and no created."""

    def created(self, c: Created) -> None: ...
    def started(self, launch: Launch) -> None: ...
    def step(self, step: int, total: int) -> None: ...
    def trial(self, study: Any, trial: Any) -> None: ...
    def close(self) -> None: ...


class Quiet:
    """A :class:`Watcher` that shows nothing."""

    def created(self, c: Created) -> None: ...
    def started(self, launch: Launch) -> None: ...
    def step(self, step: int, total: int) -> None: ...
    def trial(self, study: Any, trial: Any) -> None: ...
    def close(self) -> None: ...
