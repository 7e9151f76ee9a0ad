"""Grid studies: end cleanly, train each point once, cap a budget larger than the grid (issue 12.2)."""

from __future__ import annotations

import optuna
import pytest

from llrd_search.cli import main
from llrd_search.spec import load_spec
from llrd_search.study.grid import cap_budget, grid_size
from llrd_search.study.storage import open_storage
from llrd_search.vocab import BUDGET_ATTR

RANGES = (
    "base_lr = { low = 1e-4, high = 1e-3, log = true }",
    "head_lr = { low = 1e-3, high = 1e-2, log = true }",
    "decay = { low = 0.5, high = 1.0 }",
)


def _grid_study(write_study, base_lr, head_lr, decay, **kw):
    path = write_study(study={"sampler": "grid"}, **kw)
    text = path.read_text()
    for old, new in zip(RANGES, (f"base_lr = {base_lr}", f"head_lr = {head_lr}", f"decay = {decay}"), strict=True):
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _trials(path):
    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.study.name, storage=open_storage("sqlite:///" + str(path.with_suffix(".db"))))
    return study, study.get_trials(deepcopy=False)


def _point(t):
    return (t.params["base_lr"], t.params["head_lr"], t.params["decay"])


def test_grid_size_and_cap_are_pure(write_study):
    spec = load_spec(_grid_study(write_study, [1e-4, 2e-4, 1e-4], [1e-3], [0.9, 1.0], n_trials=10))
    assert grid_size(spec.space) == 4  # distinct values: the repeated 1e-4 is one point
    assert cap_budget(spec, 3) == (3, None)
    budget, note = cap_budget(spec, 10)
    assert budget == 4 and "10 is more than the 4 points of the grid" in note
    ranged = load_spec(write_study(filename="r.toml", n_trials=10))
    assert grid_size(ranged.space) is None and cap_budget(ranged, 10) == (10, None)


def test_two_point_grid_ends_cleanly(write_study, capsys):
    path = _grid_study(write_study, [1e-3], [3e-3], [0.9, 1.0], n_trials=2)
    assert main(["run", str(path)]) == 0  # was: RuntimeError "Study.stop is supposed to be invoked inside ..."
    _study, trials = _trials(path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(_point(t) for t in trials) == [(1e-3, 3e-3, 0.9), (1e-3, 3e-3, 1.0)]
    assert "note:" not in capsys.readouterr().err


def test_budget_larger_than_the_grid_is_capped_with_a_note(write_study, capsys):
    path = _grid_study(write_study, [1e-3], [3e-3], [0.9, 1.0], n_trials=5)
    assert main(["run", str(path)]) == 0
    study, trials = _trials(path)
    assert len(trials) == 2 and study.user_attrs[BUDGET_ATTR] == 2
    assert len({_point(t) for t in trials}) == 2
    err = capsys.readouterr().err
    assert "note: study.n_trials: 5 is more than the 2 points of the grid; the budget is 2" in err
    # A rerun (even asking for more) trains nothing again.
    assert main(["run", str(path), "--n-trials", "7"]) == 0
    assert len(_trials(path)[1]) == 2


def test_grid_with_the_paper_points_trains_every_point_once(write_study):
    # The paper point and its control lie in this grid: enqueued copies used to run them twice
    # and leave other grid points untrained.
    path = _grid_study(write_study, [2e-5], [2e-5, 1e-3], [0.95, 1.0], n_trials=4)
    assert main(["run", str(path)]) == 0
    _study, trials = _trials(path)
    assert sorted(_point(t) for t in trials) == sorted((2e-5, h, d) for h in (2e-5, 1e-3) for d in (0.95, 1.0))


def test_a_failed_grid_point_is_trained_again_and_workers_agree_on_ids(write_study, monkeypatch):
    from llrd_search.engine import objective as objective_mod

    path = _grid_study(write_study, [1e-3], [3e-3], [0.7, 0.9, 1.0], n_trials=3)
    calls = {"n": 0}
    real = objective_mod.Objective.__call__

    def flaky(self, trial):
        calls["n"] += 1
        if calls["n"] == 2:
            objective_mod.suggest(trial, self.spec.space)
            raise KeyboardInterrupt  # Ctrl-C mid-trial: FAIL, re-queued with its grid point
        return real(self, trial)

    monkeypatch.setattr(objective_mod.Objective, "__call__", flaky)
    assert main(["run", str(path)]) == 130
    assert main(["run", str(path)]) == 0
    _study, trials = _trials(path)
    failed = [t for t in trials if t.state.name == "FAIL"]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(failed) == 1 and len(done) == 3
    (retry,) = [t for t in done if t.system_attrs.get("failed_trial") == failed[0].number]
    assert _point(retry) == _point(failed[0]) and retry.system_attrs["grid_id"] == failed[0].system_attrs["grid_id"]
    assert sorted(_point(t) for t in done) == [(1e-3, 3e-3, d) for d in (0.7, 0.9, 1.0)]


def test_grid_ids_mean_the_same_point_in_every_worker(write_study):
    from llrd_search.study.storage import make_sampler

    spec = load_spec(_grid_study(write_study, [1e-4, 2e-4, 3e-4], [1e-3, 2e-3], [0.8, 0.9, 1.0], n_trials=3))
    grids = [make_sampler(spec, worker_index=i)._all_grids for i in range(3)]
    assert grids[0] == grids[1] == grids[2]


@pytest.mark.parametrize("path", ["studies/imdb-bert-base.toml"])
def test_shipped_grid_budget_fits_its_grid(path):
    spec = load_spec(path)
    assert cap_budget(spec, spec.study.n_trials) == (spec.study.n_trials, None)
