"""The core commands end to end on the tiny model: run, resume, create, status, validate."""

from __future__ import annotations

import json

import optuna
import pytest

from llrd_search.cli import build_parser, main
from llrd_search.spec import load_spec
from llrd_search.study.storage import open_storage
from llrd_search.vocab import BUDGET_ATTR, SPEC_ATTR


def _study(path):
    spec = load_spec(path)
    url = "sqlite:///" + str(path.with_suffix(".db"))
    return optuna.load_study(study_name=spec.study.name, storage=open_storage(url)), url


def test_run_creates_study_with_real_trials(write_study, capsys):
    path = write_study(n_trials=3, train={"epochs": 2, "evals_per_epoch": 2})
    assert main(["run", str(path)]) == 0
    study, _ = _study(path)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        assert set(t.params) == {"base_lr", "head_lr", "decay"}
        assert 0.0 <= t.value <= 1.0
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]  # evaluation indices: 2 epochs x 2
        assert t.value == max(t.intermediate_values.values())
        names = [g["name"] for g in t.user_attrs["lr_groups"]]
        assert names == ["embeddings", "layer.0", "layer.1", "head"]
        top = t.user_attrs["lr_groups"][2]["lr"]
        assert top == pytest.approx(t.params["base_lr"])
        assert t.user_attrs["lr_groups"][1]["lr"] == pytest.approx(t.params["base_lr"] * t.params["decay"])
        assert t.user_attrs["lr_groups"][3]["lr"] == pytest.approx(t.params["head_lr"])
        assert t.user_attrs["steps"] == 2 * 15 and t.user_attrs["train_examples_per_second"] > 0
        assert t.user_attrs["seed"] == t.number and t.user_attrs["n_validation"] == 60
    spec = json.loads(study.user_attrs[SPEC_ATTR])
    assert spec["study"]["name"] == "toy" and study.user_attrs[BUDGET_ATTR] == 3
    out = capsys.readouterr()
    assert "best: trial" in out.out and "[3/3]" in out.err


def test_tiny_model_learns_toy_task(write_study):
    path = write_study(n_trials=1, train={"epochs": 6}, study={"sampler": "random"})
    path.write_text(path.read_text().replace("low = 1e-4, high = 1e-3", "low = 3e-3, high = 3e-3"))
    assert main(["run", str(path)]) == 0
    study, _ = _study(path)
    assert study.best_value > 0.8


def test_paper_points_enqueued_once_and_resume_extends_budget(write_study):
    path = write_study(n_trials=2)
    text = path.read_text().replace("low = 1e-4, high = 1e-3", "low = 1e-5, high = 1e-3").replace("low = 1e-3, high = 1e-2", "low = 1e-5, high = 1e-2")
    path.write_text(text)
    assert main(["run", str(path)]) == 0
    study, _ = _study(path)
    assert [t.params for t in study.trials] == [
        {"base_lr": 2e-5, "decay": 0.95, "head_lr": 2e-5},
        {"base_lr": 2e-5, "decay": 1.0, "head_lr": 2e-5},
    ]
    assert study.trials[1].user_attrs["llrd:enqueued"] == "no-decay control"
    # Same spec, bigger budget: resumes, runs one more, never re-enqueues the paper points.
    assert main(["run", str(path), "--n-trials", "3"]) == 0
    study, _ = _study(path)
    assert len(study.trials) == 3 and study.trials[2].params["decay"] not in (0.95, 1.0)
    assert main(["run", str(path), "--n-trials", "3"]) == 0  # budget spent: nothing to do
    assert len(_study(path)[0].trials) == 3


def test_changed_spec_is_refused(write_study, capsys):
    path = write_study(n_trials=1)
    assert main(["run", str(path)]) == 0
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 2"))
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "Error: study.name: study 'toy' exists with a different spec (train.epochs was 1, now 2); give the changed search a new study.name, or revert the change"


def test_create_then_worker_then_status(write_study, capsys):
    path = write_study(n_trials=2)
    url = "sqlite:///" + str(path.parent / "shared.db")
    assert main(["create", str(path), "--storage", url]) == 0
    out = capsys.readouterr().out
    assert f"llrd-search worker --storage '{url}' --study toy" in out
    assert main(["worker", "--storage", url, "--study", "toy"]) == 0
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "toy", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["finished"] == 2 and data["budget"] == 2 and data["states"] == {"COMPLETE": 2}
    assert data["best"]["accuracy"] == max(t.value for t in optuna.load_study(study_name="toy", storage=url).trials)
    assert main(["status", "--storage", url, "--study", "toy"]) == 0
    assert "finished / budget" in capsys.readouterr().out


def test_status_unknown_study(write_study, tmp_path, capsys):
    url = "sqlite:///" + str(tmp_path / "none.db")
    assert main(["status", "--storage", url, "--study", "nope"]) == 3
    assert capsys.readouterr().err.strip() == (
        f"Error: --storage: SQLite file {tmp_path / 'none.db'} does not exist, so it holds no study; check the path "
        "(a study is made by 'llrd-search create STUDY.toml' or 'llrd-search run STUDY.toml')"
    )
    assert not (tmp_path / "none.db").exists()  # reading a study writes nothing


def test_validate(write_study, capsys):
    assert main(["validate", str(write_study())]) == 0
    assert "ok (study 'toy', 2 trials, sampler random)" in capsys.readouterr().out


def test_every_command_help_has_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) >= 5
    for name, p in sub.choices.items():
        assert "example" in (p.epilog or ""), f"'{name} --help' has no example"
        assert "llrd-search" in p.epilog
