"""The quickstart's defaults end to end: TPE sampling with Hyperband (or median) pruning, through the
worker's PRUNED branch, on the tiny model. Every other test study uses random sampling and no pruner.

The studies enqueue four points that learn the toy task and two that cannot (LRs of 1e-7 leave the
model at chance), then let TPE sample one more: the pruner must stop a hopeless trial early, the
stored trial must say so, and a pruned trial must count toward the budget like a complete one.
"""

from __future__ import annotations

import optuna
import pytest

from llrd_search.cli import main
from llrd_search.cli.search_cmds import status_data
from llrd_search.spec import default_storage

GOOD = [{"base_lr": 3e-3, "head_lr": 3e-3, "decay": d} for d in (1.0, 0.95, 0.9, 0.85)]
HOPELESS = [{"base_lr": 1e-7, "head_lr": 1e-7, "decay": d} for d in (0.6, 0.5)]
N_TRIALS = len(GOOD) + len(HOPELESS) + 1  # the last one is TPE's
N_EVALS = 3  # epochs x evals_per_epoch: Hyperband needs at least 3 evaluations


def _study(write_study, pruner: str):
    return write_study(
        name=f"default-{pruner}",
        n_trials=N_TRIALS,
        study={"sampler": "tpe", "pruner": pruner, "enqueue_paper_points": False, "enqueue": GOOD + HOPELESS},
        train={"epochs": N_EVALS, "evals_per_epoch": 1},
        space={"base_lr": "{ low = 1e-7, high = 3e-3, log = true }", "head_lr": "{ low = 1e-7, high = 3e-3, log = true }"},
    )


@pytest.mark.parametrize("pruner", ["hyperband", "median"])
def test_tpe_with_pruning_stores_pruned_trials_and_counts_them(write_study, pruner, monkeypatch):
    tpe_trials: set[int] = set()  # trials TPE sampled (relatively or independently)
    for method in ("sample_relative", "sample_independent"):
        real = getattr(optuna.samplers.TPESampler, method)

        def spy(self, study, trial, *args, _real=real):
            tpe_trials.add(trial.number)
            return _real(self, study, trial, *args)

        monkeypatch.setattr(optuna.samplers.TPESampler, method, spy)
    path = _study(write_study, pruner)
    url = default_storage(path)
    assert main(["run", str(path)]) == 0

    trials = optuna.load_study(study_name=f"default-{pruner}", storage=url).get_trials()
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED")}
    assert len(trials) == N_TRIALS and len(by_state["COMPLETE"]) + len(by_state["PRUNED"]) == N_TRIALS
    assert N_TRIALS - 1 in tpe_trials  # the last trial was TPE's, not the queue's
    assert "llrd:enqueued" not in trials[-1].user_attrs

    pruned = by_state["PRUNED"]
    hopeless = [t for t in trials if t.params["base_lr"] == 1e-7]
    assert pruned, "no trial was pruned"
    if pruner == "median":
        # MedianPruner(n_startup_trials=4, n_warmup_steps=1): the hopeless trials stop at evaluation 2
        # (TPE's own trial may too), the four good ones, its start-up trials, never.
        assert all(t in pruned for t in hopeless)
        assert not [t for t in pruned if t.number < len(GOOD)]
    for t in pruned:
        evals = t.user_attrs["evals"]
        assert [e["eval"] for e in evals] == sorted(t.intermediate_values) == list(range(1, len(evals) + 1))
        assert [e["accuracy"] for e in evals] == [t.intermediate_values[e["eval"]] for e in evals]
        assert t.user_attrs["pruned_at_step"] == evals[-1]["step"]
        assert t.user_attrs["wall_seconds"] > 0  # written by the worker's PRUNED branch
        if pruner == "median":
            assert len(evals) == 2 < N_EVALS  # stopped early, not at the end of training
    for t in by_state["COMPLETE"]:
        assert sorted(t.intermediate_values) == [1, 2, 3] and "pruned_at_step" not in t.user_attrs
        assert t.value == max(e["accuracy"] for e in t.user_attrs["evals"])
    assert max(t.value for t in by_state["COMPLETE"]) > 0.7  # the good points did learn

    data = status_data(url, f"default-{pruner}")
    assert data["finished"] == data["budget"] == N_TRIALS
    assert data["states"].get("PRUNED", 0) == len(pruned)
    # The budget is spent, pruned trials included: running again starts nothing.
    assert main(["run", str(path)]) == 0
    assert len(optuna.load_study(study_name=f"default-{pruner}", storage=url).get_trials()) == N_TRIALS
