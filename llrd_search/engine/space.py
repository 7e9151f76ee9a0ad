"""The search space as Optuna sees it: the distributions a worker asks for and how a trial reads
its three parameters back. Light on purpose (optuna and the spec only): the worker imports it
without loading torch or transformers."""

from __future__ import annotations

import optuna

from llrd_search.spec import Range, SpaceSection


def distributions(space: SpaceSection) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of ``base_lr``, ``head_lr`` and ``decay``: what a worker passes to
    ``study.ask`` so that all three are sampled (and stored) before the trial starts."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name in ("base_lr", "head_lr", "decay"):
        dim = getattr(space, name)
        if isinstance(dim, Range):
            out[name] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(list(dim))
    return out


def suggest(trial: optuna.Trial, space: SpaceSection) -> dict[str, float]:
    """The LLRD parameters; names are exactly ``base_lr``, ``head_lr``, ``decay``.

    A worker's trial already holds all three (sampled at ``ask``, in its arm's space: ξ = 1 in the
    control arm), and they are returned as stored; a bare ``optimize`` trial samples them here.
    """
    stored = trial.params
    out = {}
    for name, dist in distributions(space).items():
        if name in stored:
            out[name] = stored[name]
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            out[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        else:
            out[name] = trial.suggest_categorical(name, list(dist.choices))
    return out
