"""Grid searches: the grid's size, a budget capped to it, and a grid sampler fit for a fleet.

Optuna's ``GridSampler`` is made for ``study.optimize`` in one process; our workers ask and tell
(:mod:`worker`) and share one study, which breaks it in three ways this module fixes:

- when the grid is exhausted its ``after_trial`` calls ``study.stop()``, which raises outside
  ``optimize`` (``Study.stop is supposed to be invoked inside an objective function...``) after the
  last trial is saved; here the study-wide budget is what stops workers, so the call is dropped;
- a trial that FAILed (Ctrl-C, an error) counts as visited, so its point would never be trained
  while the refilled slot re-trains another; here only COMPLETE and PRUNED trials visit a point;
- the grid is shuffled with the sampler's seed, and a grid id means a point only within one
  shuffle: every worker must shuffle alike (the study seed) and only *choose* among the unvisited
  points with its own seed, so two workers rarely pick the same point at once.

A budget larger than the grid would only re-train points already trained, so :func:`cap_budget`
lowers it to the grid size.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from llrd_search.spec import Range, SpaceSection, StudySpec
from llrd_search.study.compat import LazyRandomState, storage_of, study_id
from llrd_search.vocab import PARAMS


def grid_values(space: SpaceSection) -> dict[str, list[float]] | None:
    """Each parameter's distinct values in file order, or None when a dimension is a range."""
    dims = {name: getattr(space, name) for name in PARAMS}
    if any(isinstance(d, Range) for d in dims.values()):
        return None
    return {name: list(dict.fromkeys(d)) for name, d in dims.items()}


def grid_size(space: SpaceSection) -> int | None:
    """How many distinct points the grid has; None when the space is not a grid (a range)."""
    values = grid_values(space)
    return None if values is None else math.prod(len(v) for v in values.values())


def cap_budget(spec: StudySpec, budget: int) -> tuple[int, str | None]:
    """(budget, note): a grid study's budget is at most its grid size, and the note says so."""
    size = grid_size(spec.space) if spec.study.sampler == "grid" else None
    if size is None or budget <= size:
        return budget, None
    return size, f"study.n_trials: {budget} is more than the {size} points of the grid; the budget is {size} (each point once)"


class FleetGridSampler(optuna.samplers.GridSampler):
    """``GridSampler`` for ask/tell workers sharing a study (see the module docstring)."""

    def __init__(self, space: SpaceSection, *, grid_seed: int, worker_seed: int):
        values = grid_values(space)
        if values is None:
            raise ValueError("a grid sampler needs value lists for base_lr, head_lr and decay")
        super().__init__(values, seed=grid_seed)  # the shuffle: identical in every worker
        self._rng = LazyRandomState(worker_seed)  # the choice among unvisited points: per worker

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState, values: object) -> None:
        pass  # Optuna stops `optimize` here; the workers stop on the study-wide budget instead

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        visited, running = set(), set()
        for t in storage_of(study).get_all_trials(study_id(study), deepcopy=False):
            if "grid_id" not in t.system_attrs or not self._same_search_space(t.system_attrs["search_space"]):
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                visited.add(t.system_attrs["grid_id"])
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):  # WAITING: a dead worker's retry
                running.add(t.system_attrs["grid_id"])
        every = set(range(self._n_min_trials))
        # All points started: hand out one still running (Optuna's choice) rather than a finished one.
        return sorted(every - visited - running) or sorted(every - visited)
