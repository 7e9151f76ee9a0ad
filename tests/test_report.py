"""The report: exact statistics on hand-made trials, and whole reports from studies built directly
with Optuna in a temporary SQLite file (no training)."""

from __future__ import annotations

import math
import re
import tomllib

import optuna
import pytest
from conftest import study_toml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from llrd_search.cli import main
from llrd_search.engine.param_groups import layer_lrs
from llrd_search.results import report
from llrd_search.results.report import (
    TrialInfo,
    best_decay_interval,
    compute_seconds,
    lr_profile,
    state_counts,
    two_proportion_z,
)
from llrd_search.spec import parse_spec
from llrd_search.study import confirm

DISTS = {
    "base_lr": FloatDistribution(1e-4, 1e-3, log=True),
    "head_lr": FloatDistribution(1e-3, 1e-2, log=True),
    "decay": FloatDistribution(0.5, 1.0),
}


def T(number: int, value: float | None, decay: float, *, state: str = "COMPLETE", n: int | None = 1000, base_lr: float = 1e-4, **kw) -> TrialInfo:
    return TrialInfo(number=number, state=state, value=value, params={"base_lr": base_lr, "head_lr": 1e-3, "decay": decay}, n_validation=n, **kw)


# --------------------------------------------------------------------------- exact statistics


def test_two_proportion_z_matches_hand_computation():
    # pooled p = 0.85, se = sqrt(0.85 * 0.15 * 2 / 1000) = 0.0159687
    assert two_proportion_z(0.87, 1000, 0.83, 1000) == pytest.approx(0.04 / math.sqrt(0.85 * 0.15 * 0.002))
    assert two_proportion_z(1.0, 50, 1.0, 50) == 0.0
    assert report.p_value(1.959963984540054) == pytest.approx(0.05)


def test_best_decay_interval_binomial():
    trials = [
        T(0, 0.90, 0.80),  # best
        T(1, 0.885, 0.95),  # z = 1.08: ties
        T(2, 0.87, 0.60),  # z = 2.09: worse
        T(3, 0.875, 0.70),  # z = 1.77: ties
        T(4, 0.95, 0.55, state="PRUNED"),  # not complete: ignored
        T(5, 0.89, 0.99, n=None),  # no n_validation: cannot be compared
    ]
    iv = best_decay_interval(trials)
    assert iv["method"] == "binomial"
    assert (iv["low"], iv["high"], iv["best_decay"]) == (0.70, 0.95, 0.80)
    assert iv["members"] == [0, 1, 3]
    assert iv["compared"] == 4


def test_best_decay_interval_without_n_or_trials():
    assert best_decay_interval([T(0, None, 0.9, state="FAIL")]) is None
    iv = best_decay_interval([T(0, 0.8, 0.9, n=None), T(1, 0.79, 0.6, n=None)])
    assert (iv["low"], iv["high"], iv["method"], iv["members"]) == (0.9, 0.9, "unknown-n", [0])


def conf(trial: int, decay: float, mean: float, std: float, n: int = 3) -> dict:
    return {"source_trial": trial, "params": {"base_lr": 1e-4, "head_lr": 1e-3, "decay": decay}, "accuracies": [], "mean": mean,
            "std": std, "n": n, "search_accuracy": mean}


def test_best_decay_interval_from_confirmation_seeds():
    confirmation = [
        conf(7, 0.85, 0.900, 0.004),
        conf(3, 0.95, 0.896, 0.004),  # t = 1.22, df = 4 (t95 = 2.776): ties
        conf(9, 0.60, 0.880, 0.004),  # t = 6.1: worse
        conf(1, 0.50, 0.990, 0.0, n=1),  # one seed has no std: left out
    ]
    iv = best_decay_interval([T(0, 0.95, 0.5)], confirmation)
    assert iv["method"] == "seeds"
    assert (iv["low"], iv["high"], iv["best_decay"]) == (0.85, 0.95, 0.85)
    assert iv["members"] == [7, 3]
    assert iv["compared"] == 3
    assert confirm.t95(4) == pytest.approx(2.776, abs=1e-3) and confirm.t95(500) == pytest.approx(1.9647, abs=1e-4)


def test_counts_and_compute_time():
    trials = [T(0, 0.9, 0.8, wall_seconds=10.5), T(1, None, 0.9, state="FAIL", wall_seconds=2.0), T(2, 0.7, 0.7, state="PRUNED", wall_seconds=4.0)]
    assert state_counts(trials) == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert compute_seconds(trials) == 16.5


def test_lr_profile_falls_back_to_other_trials_layer_count():
    table = [{"name": n, "lr": lr, "n_params": 1} for n, lr in layer_lrs(3, base_lr=1e-4, decay=0.5, head_lr=1e-3).items()]
    best = T(0, 0.9, 0.8, base_lr=2e-4)
    expected = list(layer_lrs(3, base_lr=2e-4, decay=0.8, head_lr=1e-3).items())
    assert lr_profile(best, [best, T(1, 0.8, 0.5, lr_groups=table)]) == expected
    assert lr_profile(best, [best], n_layers=3) == expected
    assert lr_profile(best, [best]) == []
    stored = T(2, 0.9, 0.5, lr_groups=table)
    assert lr_profile(stored, [stored]) == [(r["name"], r["lr"]) for r in table]


# --------------------------------------------------------------------------- whole reports


@pytest.fixture
def make_study(tmp_path):
    """make_study(trials) -> (url, name): an llrd-search study in SQLite holding the given trials."""
    def _make(trials: list[dict], model: str = "tiny-model") -> tuple[str, str]:
        spec = parse_spec(tomllib.loads(study_toml(model, "toy-data", name="rep", n_trials=8)))
        url = f"sqlite:///{tmp_path / 'rep.db'}"
        study = optuna.create_study(storage=url, study_name="rep", direction="maximize")
        study.set_user_attr("llrd:spec", spec.model_dump_json())
        for t in trials:
            study.add_trial(create_trial(distributions=DISTS, **t))
        return url, "rep"

    return _make


def _attrs(base_lr: float, decay: float, wall: float = 30.0) -> dict:
    groups = [{"name": n, "lr": lr, "n_params": 10} for n, lr in layer_lrs(2, base_lr=base_lr, decay=decay, head_lr=2e-3).items()]
    return {"lr_groups": groups, "n_validation": 60, "wall_seconds": wall}


def _trial(value: float | None, base_lr: float, decay: float, state: TrialState = TrialState.COMPLETE, evals: int = 3) -> dict:
    curve = {i + 1: (value or 0.6) - 0.1 * (evals - 1 - i) / evals for i in range(evals)}
    return {"params": {"base_lr": base_lr, "head_lr": 2e-3, "decay": decay}, "value": value if state == TrialState.COMPLETE else None,
            "state": state, "intermediate_values": curve if state != TrialState.FAIL else {}, "user_attrs": _attrs(base_lr, decay)}


MIXED = [
    _trial(0.85, 2e-4, 0.9),
    _trial(0.80, 1e-4, 1.0),
    _trial(0.75, 5e-4, 0.6),
    _trial(0.88, 3e-4, 0.8),
    _trial(0.70, 8e-4, 0.7),
    _trial(0.60, 1e-4, 0.5, TrialState.PRUNED, evals=1),
    {**_trial(None, 6e-4, 0.55, TrialState.FAIL), "user_attrs": {"fail_reason": "TrainingError: loss is NaN", "wall_seconds": 5.0}},
]


def _no_network(page: str) -> None:
    assert not re.search(r"<(script|link)\b", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_report_of_mixed_study(make_study, tmp_path):
    url, name = make_study(MIXED)
    out = tmp_path / "rep-out"
    written = report.write_report(url, name, out)
    stems = {"accuracy_vs_decay", "decay_lr_map", "lr_profile", "history", "learning_curves", "importance"}
    assert set(written) == {"html", "summary", "summary_json"} | stems
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0
    for stem in stems:
        assert written[stem].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = written["html"].read_text()
    assert page.count('src="data:image/png;base64,') == len(stems)
    _no_network(page)
    summary = written["summary"].read_text()
    assert "Trial 3: validation accuracy **0.8800**" in summary
    assert "1 failed" in summary and "TrainingError: loss is NaN" in summary
    assert "5 complete" in summary and "1 pruned" in summary
    assert "total compute time: 3.1 min" in summary  # 6 × 30 s + 5 s
    # n = 60: everything within ~0.12 of 0.88 ties, 0.70 (z = 2.3) does not.
    assert "ξ ∈ **[0.600, 1.000]**" in summary
    # No control arm here: no gain is claimed and no p-value is given across learning rates.
    assert "has no control arm" in summary and "Gain" not in summary and "p = " not in summary
    assert "two-proportion z-test" in summary


def test_report_of_single_trial(make_study, tmp_path):
    url, name = make_study([_trial(0.8, 2e-4, 0.9)])
    written = report.write_report(url, name, tmp_path / "one")
    summary = written["summary"].read_text()
    assert "importance needs ≥ 2 complete trials" in summary
    assert "needs ≥ 2 complete trials" in written["html"].read_text()
    assert "importance" not in written and "decay_lr_map" not in written
    assert {"accuracy_vs_decay", "lr_profile", "history", "learning_curves"} <= set(written)
    assert "has no control arm" in summary
    assert "ξ ∈ **[0.900, 0.900]**" in summary


def test_report_without_complete_trials(make_study, tmp_path, caplog):
    url, name = make_study([_trial(0.6, 1e-4, 0.5, TrialState.PRUNED, evals=2), {**_trial(None, 1e-4, 0.9, TrialState.FAIL), "user_attrs": {}}])
    out = tmp_path / "none"
    (out).mkdir()
    (out / "history.png").write_bytes(b"stale")
    written = report.write_report(url, name, out)
    summary = written["summary"].read_text()
    assert "No trial has completed yet" in summary
    assert "1 pruned" in summary and "1 failed" in summary
    assert "no reason recorded" in summary
    assert not (out / "history.png").exists()  # a stale figure from an earlier report is removed
    assert set(written) == {"html", "summary", "summary_json", "accuracy_vs_decay", "learning_curves"}
    _no_network(written["html"].read_text())
    assert "no complete trial" in caplog.text


def test_lr_profile_from_model_config_when_no_trial_stored_it(make_study, tmp_path, tiny_model_dir):
    trials = [{**_trial(0.8, 2e-4, 0.9), "user_attrs": {"n_validation": 60}}, {**_trial(0.7, 1e-4, 0.6), "user_attrs": {}}]
    url, name = make_study(trials, model=str(tiny_model_dir))
    written = report.write_report(url, name, tmp_path / "cfg")
    assert "lr_profile" in written  # 2 layers read from the tiny model's config.json
    assert "per-layer LR" not in written["summary"].read_text()


def test_report_uses_confirmation_results(make_study, tmp_path, monkeypatch):
    url, name = make_study(MIXED)
    rows = [conf(0, 0.9, 0.86, 0.01), conf(3, 0.8, 0.84, 0.01)]
    monkeypatch.setattr(confirm, "confirmation_summary", lambda storage, study: rows if study == name else None)
    summary = report.write_report(url, name, tmp_path / "conf")["summary"].read_text()
    assert "| 1 | 0 | 1.00e-04 | 1.00e-03 | 0.900 | 0.8600 ± 0.0100 | 3 | 0.8600 |" in summary
    assert "confirmation changed the winner" in summary
    assert "ξ ∈ **[0.800, 0.900]**" in summary  # t = 2.45 < 2.776 (df 4): the two tie
    assert "Welch's t-test" in summary


def test_cli_report(make_study, tmp_path, capsys):
    url, name = make_study(MIXED[:3])
    out = tmp_path / "cli-out"
    assert main(["report", "--storage", url, "--study", name, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    assert main(["report", "--storage", url, "--study", "nope", "--out", str(out)]) == 3
    assert "no study named 'nope'" in capsys.readouterr().err
