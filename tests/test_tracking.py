"""``[study] track = "mlflow"``: each finished trial is an MLflow run (params, per-group LRs, the eval
curve, the arm) and confirm's verdict is one more; read back with MLflow's own client."""

from __future__ import annotations

import pytest

from llrd_search.cli import main
from llrd_search.spec import load_spec, parse_spec
from llrd_search.study.storage import opened_study
from llrd_search.study.tracking import tracking_uri

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("optuna_integration")


def test_the_tracking_uri_is_the_files_then_the_environments_then_beside_the_study(tmp_path, monkeypatch):
    base = {"model": {"name": "m"}, "data": {"path": "d"}, "space": {"base_lr": [1e-5], "head_lr": [1e-4], "decay": [0.9]}}
    spec = parse_spec({**base, "study": {"name": "s", "n_trials": 1, "track": "mlflow", "track_uri": "sqlite:///runs/ml.db"}}, base_dir=tmp_path)
    assert tracking_uri(spec, "sqlite:///x.db") == f"sqlite:///{tmp_path / 'runs' / 'ml.db'}"  # relative to the study file
    plain = parse_spec({**base, "study": {"name": "s", "n_trials": 1, "track": "mlflow"}}, base_dir=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(plain, f"sqlite:///{tmp_path / 'a' / 's.db'}") == "http://mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(plain, f"sqlite:///{tmp_path / 'a' / 's.db'}") == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(plain, "postgresql+psycopg://db/llrd") == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracking_settings_are_not_part_of_the_studys_identity(tmp_path):
    base = {"model": {"name": "m"}, "data": {"path": "d"}, "space": {"base_lr": [1e-5], "head_lr": [1e-4], "decay": [0.9]}}
    plain = parse_spec({**base, "study": {"name": "s", "n_trials": 1}})
    tracked = parse_spec({**base, "study": {"name": "s", "n_trials": 1, "track": "mlflow", "track_uri": "http://x:5000"}})
    assert plain.fingerprint() == tracked.fingerprint()


def test_a_tiny_study_and_its_verdict_are_read_back_from_mlflow(write_study, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_study(name="tracked", n_trials=4, study={"track": "mlflow", "control_fraction": 0.25}, train={"evals_per_epoch": 2})
    assert main(["run", str(path), "--workers", "1"]) == 0
    url = f"sqlite:///{path.with_suffix('.db')}"
    with opened_study(url, "tracked") as study:
        search = {("llrd", t.number): t for t in study.get_trials()}
    with opened_study(url, "tracked.control") as control:
        search |= {("control", t.number): t for t in control.get_trials()}

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # beside the study file
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.tags["arm"], int(r.data.tags["number"])) for r in runs) == sorted(search)
    for run in runs:
        trial = search[(run.data.tags["arm"], int(run.data.tags["number"]))]
        assert run.info.run_name == f"{run.data.tags['arm']}-{trial.number}"
        assert run.data.tags["state"] == "COMPLETE"
        assert run.data.metrics["accuracy"] == pytest.approx(trial.value)
        assert {k: float(run.data.params[k]) for k in ("base_lr", "head_lr", "decay")} == pytest.approx(trial.params)
        lrs = {f"lr.{row['name']}": row["lr"] for row in trial.user_attrs["lr_groups"]}
        assert len(lrs) >= 4 and {k: float(run.data.params[k]) for k in lrs} == pytest.approx(lrs)
        curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_accuracy")]
        expected = [(e["step"], e["accuracy"]) for e in trial.user_attrs["evals"]]
        # pytest >= 9 compares flat sequences only: steps exactly, accuracies approximately
        assert [s for s, _ in sorted(curve)] == [s for s, _ in expected]
        assert [a for _, a in sorted(curve)] == pytest.approx([a for _, a in expected])
        assert len(curve) == 2
    assert [r.data.tags["arm"] for r in runs].count("control") == 1

    capsys.readouterr()
    assert main(["confirm", "--storage", url, "--study", "tracked", "--top", "1", "--seeds", "2", "--format", "json"]) == 0
    confirmed = client.get_experiment_by_name("tracked.confirm")
    runs = client.search_runs([confirmed.experiment_id])
    verdicts = [r for r in runs if r.data.tags.get("kind") == "verdict"]
    assert len(verdicts) == 1 and len(runs) == 1 + 4  # the verdict, 2 seeds of the winner and of the control
    import json

    result = json.loads(capsys.readouterr().out)
    metrics = verdicts[0].data.metrics
    assert metrics["winner_mean"] == pytest.approx(result["verdict"]["mean"])
    assert metrics["gain"] == pytest.approx(result["llrd_vs_control"]["gain"])
    assert verdicts[0].data.tags["verdict"] == result["llrd_vs_control"]["text"]


def test_a_study_without_track_has_no_tracker(write_study):
    from llrd_search.study.tracking import trial_tracker

    spec = load_spec(write_study(name="quiet", n_trials=1))
    assert spec.study.track is None and trial_tracker(spec, "sqlite:///unused.db") is None


def test_without_mlflow_track_names_the_extra_to_install(write_study, monkeypatch):
    import sys

    from llrd_search.exceptions import LLRDSearchError
    from llrd_search.study.tracking import trial_tracker

    monkeypatch.setitem(sys.modules, "mlflow", None)
    spec = load_spec(write_study(name="t", n_trials=1, study={"track": "mlflow"}))
    with pytest.raises(LLRDSearchError, match=r"pip install 'llrd-search\[track\]'"):
        trial_tracker(spec, "sqlite:///unused.db")
