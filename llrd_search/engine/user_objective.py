"""The user's own objective, our search: sample the LLRD groups inside any training code, and load
``package.module:function`` objectives for workers.

A user objective is ``function(trial) -> float``. It calls :func:`suggest_param_groups` to get the
trial's layer-wise parameter groups (sampled from the study's stored ``[space]`` exactly as the
built-in objective samples them), trains however it likes, and returns the metric to maximize.
Workers run it with every guarantee of the built-in loop (budget, heartbeats, retries with the
same parameters, Ctrl-C, storage outages), because those live in the worker, not the objective.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import optuna
from pydantic import ValidationError

from llrd_search.exceptions import ObjectiveError, SpecError, StudyNotFoundError
from llrd_search.spec import SpaceSection, StudySpec
from llrd_search.vocab import training_seed

Objective = Callable[[optuna.Trial], float]


def _is_control(trial: optuna.Trial) -> bool:
    """Whether ``trial`` belongs to the study's ξ = 1 control arm (decay is then exactly 1.0).

    One call on purpose: it becomes the control-arm module's own test once that lands.
    """
    return trial.study.study_name.endswith(".control")


def _stored_spec(trial: optuna.Trial) -> StudySpec:
    from llrd_search.study.storage import spec_of

    try:
        return spec_of(trial.study)
    except StudyNotFoundError:
        raise SpecError(
            f"study '{trial.study.study_name}'",
            ["no [space] stored in it: create the study with 'llrd-search create STUDY.toml', or pass space={...} to suggest_param_groups"],
        ) from None


def _space(space: dict[str, Any] | SpaceSection | None, trial: optuna.Trial) -> SpaceSection:
    if space is None:
        return _stored_spec(trial).space
    if isinstance(space, SpaceSection):
        return space
    from llrd_search.spec import _format_errors

    try:
        return SpaceSection.model_validate(space)
    except ValidationError as err:
        raise SpecError("space", [f"space.{p}" for p in _format_errors(err)]) from None


def suggest_param_groups(
    trial: optuna.Trial,
    model: Any,
    *,
    weight_decay: float = 0.01,
    space: dict[str, Any] | None = None,
) -> list[dict]:
    """Sample ``base_lr``, ``head_lr`` and ``decay`` for ``trial`` and return ``model``'s LLRD
    parameter groups, ready for ``torch.optim.AdamW(groups)``.

    The ranges come from the study's stored ``[space]`` (a study made by ``llrd-search create``),
    or from ``space``, a dict shaped like the ``[space]`` table
    (``{"base_lr": {"low": 1e-5, "high": 1e-4, "log": True}, "decay": [0.9, 0.95, 1.0], ...}``).
    In the study's control arm ``decay`` is exactly 1.0. The per-group table is stored in the
    trial's ``lr_groups`` user attr, like the built-in objective does, for report and export.
    """
    from llrd_search.engine.param_groups import build_param_groups, group_table
    from llrd_search.engine.space import suggest

    dims = _space(space, trial)
    if _is_control(trial):
        dims = dims.model_copy(update={"decay": [1.0]})
    params = suggest(trial, dims)
    groups = build_param_groups(model, weight_decay=weight_decay, **params)
    trial.set_user_attr("lr_groups", group_table(groups))
    return groups


def trial_seed(trial: optuna.Trial) -> int:
    """The training seed the built-in loop would use for ``trial`` (``study.seed +
    trial_seed_offset + trial.number``): distinct per trial, and fresh in ``confirm``'s re-runs,
    which differ from the search only by this seed. Recorded in the trial's ``seed`` user attr."""
    study = _stored_spec(trial).study
    # A confirm run carries its paired seed (the same for run i of every configuration).
    seed = training_seed(trial.user_attrs, study.seed, study.trial_seed_offset, trial.number)
    trial.set_user_attr("seed", seed)
    return seed


# --------------------------------------------------------------------------- loading objectives


def load_objective(path: str, source: str = "--objective") -> Objective:
    """Import ``package.module:function`` (from the current directory first, like ``python -m``)
    and return the callable; ``source`` names the flag or key in the one-line error."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ObjectiveError(f"{source}: '{path}' must look like package.module:function (e.g. my_training:objective)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ObjectiveError(f"{source}: module '{module_name}' not found (looked in the current directory {cwd} and sys.path)") from None
        raise ObjectiveError(f"{source}: importing module '{module_name}' failed: {err}") from None
    except Exception as err:
        raise ObjectiveError(f"{source}: importing module '{module_name}' failed: {type(err).__name__}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ObjectiveError(f"{source}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ObjectiveError(f"{source}: '{path}' is not callable (it is a {type(obj).__name__}); point it at a function(trial) -> float")
    return obj


def pick_objective(spec: StudySpec, cli: str | None = None, **builtin: Any) -> Objective:
    """The objective a worker runs: ``--objective``, else the study's ``train.objective``, else the
    built-in loop (``Objective(spec, **builtin)``)."""
    if cli:
        return load_objective(cli, "--objective")
    if spec.train.objective:
        return load_objective(spec.train.objective, "train.objective")
    from llrd_search.engine.objective import Objective as BuiltIn

    return BuiltIn(spec, **builtin)
