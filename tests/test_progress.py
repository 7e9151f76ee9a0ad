"""The progress line: every finished trial printed once, with its own count (issue 12.11)."""

from __future__ import annotations

import re

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from llrd_search.console import Progress
from llrd_search.study.local_workers import _TrialMonitor, monitored
from llrd_search.study.storage import open_storage

DIST = {k: FloatDistribution(1e-6, 1.0) for k in ("base_lr", "head_lr", "decay")}


def _add(study, n, state=TrialState.COMPLETE):
    for i in range(n):
        value = 0.5 + i / 100 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, params={"base_lr": 1e-5, "head_lr": 1e-4, "decay": 0.9}, distributions=DIST))


def _counts(err: str) -> list[str]:
    return re.findall(r"^\[(\d+/\d+)\]", err, flags=re.M)


def test_trials_finishing_together_get_distinct_counts(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=open_storage(url), direction="maximize")
    _add(study, 7)
    progress = Progress(12, 7, None)
    with monitored(url, "p", progress.trial, every=3600):  # polls only when the block ends: deterministic
        _add(study, 2)  # two workers finish at once: one poll sees both
        _add(study, 1, TrialState.FAIL)  # printed, not counted
        _add(study, 1, TrialState.PRUNED)
    assert _counts(capsys.readouterr().err) == ["8/12", "9/12", "9/12", "10/12"]  # was 9, 9, 9, 10 (counted from storage)


def test_a_trial_reported_twice_is_printed_once(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=open_storage(url), direction="maximize")
    _add(study, 1)
    progress = Progress(3, 0, None)
    trial = study.get_trials()[0]
    progress.trial(study, trial)
    progress.trial(study, trial)
    assert _counts(capsys.readouterr().err) == ["1/3"]


def test_the_monitor_reports_a_trial_that_finished_before_its_thread_ran(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=open_storage(url), direction="maximize")
    seen = []
    real_start = _TrialMonitor.__init__

    def slow_thread(self, *a, **kw):
        real_start(self, *a, **kw)
        _add(study, 1)  # finishes right after the monitor was made, before its thread's first poll

    monkeypatch.setattr(_TrialMonitor, "__init__", slow_thread)
    with monitored(url, "p", lambda _s, t: seen.append(t.number), every=3600):
        pass
    assert seen == [0]
