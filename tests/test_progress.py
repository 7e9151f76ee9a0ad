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


def test_confirm_rounds_count_their_own_runs_and_say_so(tmp_path, capsys):
    # Round 2 of a sequential confirm: 4 runs done, 2 more queued. Counting the study's runs read
    # [5/6] after a round that ended at [4/4].
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=open_storage(url), direction="maximize")
    _add(study, 4)
    progress = Progress(6, 4, None, label="runs this round")
    _add(study, 2)
    for trial in study.get_trials()[4:]:
        progress.trial(study, trial)
    assert re.findall(r"^\[([^\]]+)\]", capsys.readouterr().err, flags=re.M) == ["1/2 runs this round", "2/2 runs this round"]


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


def _two_arms(tmp_path, llrd_values, control_values):
    """A search study and its control arm (``NAME.control``), with complete trials of these values."""
    from llrd_search.vocab import ARM_ATTR

    url = f"sqlite:///{tmp_path / 'arms.db'}"
    storage = open_storage(url)
    parent = optuna.create_study(study_name="arms", storage=storage, direction="maximize")
    control = optuna.create_study(study_name="arms.control", storage=storage, direction="maximize")
    for study, values, arm in ((parent, llrd_values, "llrd"), (control, control_values, "control")):
        for v in values:
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=v, params={"base_lr": 1e-5, "head_lr": 1e-4, "decay": 0.9},
                                         distributions=DIST, user_attrs={ARM_ATTR: arm}))
    return url, parent, control


def test_a_control_trial_that_beats_the_llrd_arm_is_the_best_on_the_progress_line(tmp_path, capsys):
    url, parent, control = _two_arms(tmp_path, [0.8274, 0.80], [0.8557])
    progress = Progress(3, 2, None)
    progress.trial(parent, control.get_trials()[0])  # the monitor hands on the parent study for either arm
    err = capsys.readouterr().err
    assert "best acc 0.8557 (ξ = 1 arm)" in err and "0.8274" not in err


def test_the_llrd_arm_holding_the_best_says_so(tmp_path, capsys):
    url, parent, control = _two_arms(tmp_path, [0.87], [0.8557])
    Progress(3, 1, None).trial(parent, parent.get_trials()[0])
    assert "best acc 0.8700 (LLRD arm)" in capsys.readouterr().err


def test_status_shows_the_best_over_both_arms_and_its_arm(tmp_path, capsys):
    from llrd_search.cli import main
    from llrd_search.search import status

    url, parent, control = _two_arms(tmp_path, [0.8274, 0.80], [0.8557])
    s = status(url, "arms")
    assert (s.best.value, s.best.arm, s.best.trial) == (0.8557, "control", 0)
    assert s.arms["llrd"]["best"] == 0.8274 and s.arms["control"]["best"] == 0.8557
    assert main(["status", "--storage", url, "--study", "arms"]) == 0
    out = capsys.readouterr().out
    assert "trial 0 of the control arm (ξ = 1): accuracy 0.8557" in out
