"""Per-trial seeding: every worker of a fleet samples different points, with no flag to set.
(:func:`make_sampler` builds the study file's sampler this way.)

A sampler seeded once per worker makes every worker started with the same command propose the
same points (they all draw from one seed). Instead, :class:`TrialSeededSampler` builds the real
sampler afresh for each trial, seeded from (study seed, trial number). Trial numbers are unique in a
study, so concurrent workers draw different points, and trial *i* gets the same random (or TPE
start-up) point whichever worker asks for it.

What stays reproducible: random and grid searches, the TPE start-up trials, and a single-worker
TPE search (same study file, same seed: same points). What does not: TPE's model-based points in a
fleet depend on which results have arrived when a trial is asked, which depends on timing.

No Optuna private attribute is touched: a fresh sampler per trial needs only the public API.

TPE runs with ``constant_liar=True`` whenever more than one trial runs at once (workers x pack > 1):
the trials still running count as bad results, so trials sampled together spread out instead of
landing on the same promising point. ``run``/``confirm`` tell their workers the fleet's size
(:data:`FLEET_ENV`); a packed worker multiplies it by its K. With one trial at a time TPE is left
exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from llrd_search.spec import StudySpec

# How many workers of one local fleet (``run``/``confirm``) sample the study at once; a worker
# started by hand (``llrd-search worker``) with none set counts as alone unless its user sets it.
FLEET_ENV = "LLRD_SEARCH_FLEET_WORKERS"


def fleet_workers(env: dict[str, str] | None = None) -> int:
    """:data:`FLEET_ENV` as a count, 1 when unset or not a whole number >= 1."""
    raw = (os.environ if env is None else env).get(FLEET_ENV, "").strip()
    return int(raw) if raw.isdigit() and int(raw) >= 1 else 1


def trial_seed(seed: int, number: int) -> int:
    """A well-mixed 32-bit seed for trial ``number`` of a study seeded with ``seed``."""
    return int(np.random.SeedSequence([seed % 2**64, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to ``factory(trial_seed(seed, trial.number))``, a new sampler for each trial.

    ``before_trial`` is the first sampler call Optuna makes for a trial (in ``Trial.__init__``), so
    every later call of the same trial reaches that trial's sampler. A worker asks and tells one
    trial at a time, which is all this needs (it is not meant for ``optimize(n_jobs > 1)``).
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], seed: int, concurrent: int = 1):
        self._factory = factory
        self._seed = seed
        self.concurrent = concurrent  # trials sampled at once; the control arm's sampler copies it
        self.inner = factory(seed)

    def __getattr__(self, name: str) -> Any:
        # Sampler-specific helpers (e.g. GridSampler.is_exhausted) are the inner sampler's.
        if name in ("_factory", "_seed", "inner", "concurrent"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner = self._factory(trial_seed(self._seed, trial.number))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        # Seeds come from the trial number; Optuna's optimize() calls this per thread, and a
        # random reseed would break reproducibility for nothing.
        pass


def make_sampler(spec: StudySpec, worker_index: int = 0, concurrent: int | None = None) -> TrialSeededSampler:
    """The study's sampler, seeded per trial from (study.seed, trial number) (see :mod:`sampling`):
    workers started with the same command still sample different points, and trial i gets the same
    random point whichever worker runs it. ``concurrent``: trials sampled at once, the fleet's
    workers x pack (default :func:`fleet_workers`); above 1, TPE lies constantly about the running
    ones. ``worker_index`` is accepted for old callers and unused."""
    n = fleet_workers() if concurrent is None else concurrent
    return TrialSeededSampler(lambda seed: _base_sampler(spec, seed, constant_liar=n > 1), spec.study.seed, concurrent=n)


def _base_sampler(spec: StudySpec, seed: int, constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    if spec.study.sampler == "grid":
        from llrd_search.study.grid import FleetGridSampler

        return FleetGridSampler(spec.space, grid_seed=spec.study.seed, worker_seed=seed)
    if spec.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.study.n_trials // 3)), constant_liar=constant_liar)
