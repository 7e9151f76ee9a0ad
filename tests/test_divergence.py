"""Diverged trials end early as PRUNED with the reason stored (issue 12.6)."""

from __future__ import annotations

import optuna
import pytest
import torch

from llrd_search.cli import main
from llrd_search.engine import train as tr
from llrd_search.engine.data import load_task_data
from llrd_search.engine.divergence import DivergenceGuard
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.exceptions import DivergedError, TrainingError
from llrd_search.spec import DataSection, ModelSection, TrainSection, load_spec
from llrd_search.study.storage import open_storage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, toy_data_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LLRD_SEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    template = tr.load_template(ModelSection(name=str(tiny_model_dir), max_length=32), {0: "0", 1: "1"})
    task = load_task_data(DataSection(path=str(toy_data_dir)), template.tokenizer, 32, 0)
    mp.undo()
    return template, task


def _train(template, task, base_lr, head_lr, epochs=3):
    model = tr.fresh_model(template, 0)
    groups = build_param_groups(model, base_lr=base_lr, decay=1.0, head_lr=head_lr, weight_decay=0.01)
    cfg = TrainSection(epochs=epochs, batch_size=16, evals_per_epoch=1, precision="fp32", device="cpu")
    return model, tr.train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None)


# --------------------------------------------------------------------------- the rule


def test_guard_flags_non_finite_and_climbing_losses():
    with pytest.raises(DivergedError, match=r"loss became inf at step 5\b"):
        DivergenceGuard().update([0.7, 0.6, 0.6, 0.5, 0.5, float("inf")], 0)
    guard = DivergenceGuard()
    with pytest.raises(DivergedError, match=r"loss diverged at step \d+: median of the last 8 steps .* > 3 x the starting 0.693"):
        guard.update([0.69, 1.5, 4.0, 9.0, 30.0, 80.0, 150.0, 300.0, 500.0], 0)


def test_guard_ignores_spikes_and_a_low_start():
    # A healthy run: the loss falls, with three bad batches in one window.
    losses = [0.69, 0.68, 0.66, 0.6, 5.0, 0.5, 9.0, 0.45, 12.0, 0.4, 0.38] + [0.3] * 40
    guard = DivergenceGuard()
    guard.update(losses, 0)
    assert guard.peak_ratio < 1.5
    # A model that starts near zero loss (fine-tuned already): noise around 0.05 is not a climb.
    DivergenceGuard().update([0.01, 0.05, 0.2, 0.04, 0.3, 0.02, 0.1, 0.25, 0.2, 0.3] * 5, 0)


# --------------------------------------------------------------------------- the training loop


def test_huge_learning_rates_end_training_early(setup):
    template, task = setup
    with pytest.raises(DivergedError, match="loss diverged at step") as info:
        _train(template, task, base_lr=10.0, head_lr=10.0)
    assert isinstance(info.value, TrainingError)  # `train` reports it like any training error
    step = int(info.value.args[0].split("step ")[1].split(":")[0])
    assert step < 15  # within the first epoch's 15 steps of 45


def test_a_normal_run_is_unchanged_by_the_guard(setup, monkeypatch):
    template, task = setup
    model, result = _train(template, task, base_lr=3e-3, head_lr=3e-3)
    monkeypatch.setattr(tr.DivergenceGuard, "update", lambda self, losses, first_step: None)
    model_off, result_off = _train(template, task, base_lr=3e-3, head_lr=3e-3)
    assert result.evals == result_off.evals and result.steps == result_off.steps == 45
    for (name, a), (_, b) in zip(model.state_dict().items(), model_off.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert result.best_accuracy > 0.8  # it learned: the guard's threshold is far from a healthy run


# --------------------------------------------------------------------------- a search


def test_a_diverged_trial_is_pruned_with_its_reason(write_study):
    path = write_study(n_trials=1, train={"epochs": 3})
    text = path.read_text().replace("low = 1e-4, high = 1e-3", "low = 5.0, high = 10.0").replace("low = 1e-3, high = 1e-2", "low = 5.0, high = 10.0")
    path.write_text(text)
    main(["run", str(path)])  # exit 1: "no trial completed"
    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.study.name, storage=open_storage("sqlite:///" + str(path.with_suffix(".db"))))
    [trial] = study.get_trials(deepcopy=False)
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["diverged"].startswith("loss diverged at step")
    assert trial.user_attrs["evals"] == []  # ended before the first evaluation (step 15 of 45)
    assert "fail_reason" not in trial.user_attrs
