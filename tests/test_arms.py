"""The LR-matched control arm (ξ = 1): shares of the budget, workers, the paired verdict, summary.json."""

from __future__ import annotations

import json
import time

import pytest
from _fleet import run_worker_threads, states, trials
from scipy import stats as st

from llrd_search.cli import main
from llrd_search.engine.objective import suggest
from llrd_search.spec import load_spec
from llrd_search.stats import paired_difference, verdict_text
from llrd_search.study import compat
from llrd_search.study.arms import CONTROL, LLRD, arm_of, choose_arm, control_spec, control_target
from llrd_search.study.storage import create_study, open_storage

# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(("fraction", "total", "want"), [(0.25, 2, 1), (0.34, 6, 2), (0.25, 12, 3), (0.0, 10, 0), (0.5, 5, 3), (0.25, 1, 0)])
def test_control_target_rounds_half_up(fraction, total, want):
    assert control_target(fraction, total) == want


def test_the_control_arm_queues_no_more_points_than_its_share():
    from llrd_search.spec import parse_spec

    spec = parse_spec({"study": {"name": "s", "n_trials": 12}, "model": {"name": "m"}, "data": {"path": "d"}})
    assert [p["decay"] for p in control_spec(spec, 12).study.enqueue] == [1.0]  # the paper's ξ = 1 point
    # a budget of 1: the control's share rounds to 0, so its point is not queued (it would run over budget)
    assert control_spec(spec, 1).study.enqueue == [] and control_target(0.25, 1) == 0


def _allocate(total: int, target: int, start: dict | None = None) -> list[str]:
    active = dict(start or {LLRD: 0, CONTROL: 0})
    seq = []
    while (arm := choose_arm(active, {}, total, target)) is not None:
        active[arm] += 1
        seq.append(arm)
    return seq


def test_choose_arm_keeps_the_share_at_every_moment_and_ends_exact():
    seq = _allocate(12, 3)
    assert [a[0] for a in seq] == list("lclllclllcll")
    for m in range(1, 13):  # after m allocations the control arm holds round(3 m / 12)
        assert seq[:m].count(CONTROL) == int(3 * m / 12 + 0.5)
    assert _allocate(8, 2) == [LLRD, CONTROL, LLRD, LLRD, LLRD, CONTROL, LLRD, LLRD]


def test_choose_arm_queued_first_full_budget_none_and_extension():
    assert choose_arm({LLRD: 1, CONTROL: 1}, {CONTROL: 1}, 4, 1) == CONTROL  # a retry holds its slot
    assert choose_arm({LLRD: 3, CONTROL: 1}, {}, 4, 1) is None
    # --n-trials 4 -> 8 with f = 0.5: the target grows from 2 to 4 and the control arm catches up.
    assert _allocate(8, 4, {LLRD: 2, CONTROL: 2}) == [CONTROL, LLRD, CONTROL, LLRD]
    assert _allocate(4, 0) == [LLRD] * 4


def test_paired_difference_matches_scipy():
    a, b = [0.90, 0.92, 0.88], [0.85, 0.90, 0.86]
    d = paired_difference(a, b)
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert d["mean"] == pytest.approx(0.03)
    assert d["ci"] == pytest.approx([ci.low, ci.high])
    assert d["ci"] == pytest.approx([0.03 - 4.302652729911275 * 0.01, 0.03 + 4.302652729911275 * 0.01])
    assert d["p"] == pytest.approx(ref.pvalue)
    assert paired_difference([0.9], [0.8])["ci"] is None
    assert paired_difference([0.9, 0.8], [0.8, 0.7])["ci"] == pytest.approx([0.1, 0.1])


def test_verdict_sentences():
    assert verdict_text(0.0123, [0.004, 0.02], 5) == "LLRD helps by +1.23 points (95 % CI [+0.40, +2.00], 5 paired seeds)"
    assert verdict_text(0.003, [-0.01, 0.016], 3) == "no evidence that LLRD helps here: +0.30 points (95 % CI [-1.00, +1.60] includes 0)"
    assert verdict_text(-0.02, [-0.03, -0.01], 3).startswith("LLRD hurts here: -2.00 points")


def test_overall_best_picks_the_arm_export_writes():
    from types import SimpleNamespace

    from llrd_search.study.arms import overall_best

    def t(number, value, decay):
        return SimpleNamespace(number=number, value=value, params={"base_lr": 1e-4, "head_lr": 1e-3, "decay": decay})

    def row(trial, mean, n=2, decay=0.9):
        return {"source_trial": trial, "mean": mean, "n": n, "search_accuracy": 0.5, "params": {"base_lr": 1e-4, "head_lr": 1e-3, "decay": decay}}

    llrd, control = t(4, 0.80, 0.9), t(1, 0.82, 1.0)
    pick = overall_best(llrd, control)
    assert (pick["arm"], pick["trial"], pick["selected_by"], pick["confirmed"]) == (CONTROL, 1, "search", None)
    assert overall_best(t(4, 0.82, 0.9), control)["arm"] == LLRD  # a tie: the control did not beat LLRD
    assert overall_best(llrd, None)["arm"] == LLRD and overall_best(None, control)["arm"] == CONTROL
    assert overall_best(None, None) is None
    # Confirmed means decide once an LLRD configuration has runs; the search bests no longer count.
    confirmed = [row(4, 0.85), row(2, 0.80)]
    assert overall_best(llrd, control, confirmed, row(1, 0.84, decay=1.0))["arm"] == LLRD
    assert overall_best(llrd, control, confirmed, row(1, 0.85, decay=1.0))["arm"] == LLRD  # a tie
    pick = overall_best(llrd, control, confirmed, row(1, 0.86, decay=1.0))
    assert (pick["arm"], pick["trial"], pick["selected_by"], pick["params"]["decay"]) == (CONTROL, 1, "confirmation", 1.0)
    assert overall_best(llrd, control, confirmed, row(1, float("nan"), n=0))["arm"] == LLRD  # every control run diverged
    assert overall_best(llrd, control, confirmed, None)["trial"] == 4  # confirmed before the arm had a complete trial
    # No LLRD run finished yet: back to the search bests.
    assert overall_best(llrd, control, [row(4, float("nan"), n=0)], row(1, 0.9, decay=1.0))["selected_by"] == "search"


# --------------------------------------------------------------------------- workers


def _quick(pause: float = 0.05, die_on_first_control: list | None = None):
    def factory(spec):
        def objective(trial):
            p = suggest(trial, spec.space)
            if die_on_first_control is not None and arm_of(trial) == CONTROL and not die_on_first_control:
                # A worker killed mid-trial: no tell, no more heartbeats; the thread just ends.
                die_on_first_control.append(trial.number)
                raise SystemExit
            time.sleep(pause)
            return 0.5 + p["base_lr"]

        return objective

    return factory


def _arms_study(write_study, tmp_path, name: str, n_trials: int, fraction: float, heartbeat: dict | None = None, **kw) -> str:
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    # conftest's generous heartbeat unless a test needs a dead worker's trial reaped soon.
    path = write_study(name=name, n_trials=n_trials, study={"control_fraction": fraction, "name": name, "n_trials": n_trials, **(heartbeat or {})}, **kw)
    assert main(["create", str(path), "--storage", url]) == 0
    return url


def test_three_workers_keep_the_arms_at_their_share(write_study, tmp_path):
    url = _arms_study(write_study, tmp_path, "share", 8, 0.25)
    assert run_worker_threads(url, "share", 3, _quick()) == []
    llrd, control = trials(url, "share"), trials(url, "share.control")
    assert states(url, "share") == {"COMPLETE": 6} and states(url, "share.control") == {"COMPLETE": 2}
    assert {t.params["decay"] for t in control} == {1.0} and all(t.params["decay"] < 1.0 for t in llrd)
    assert {arm_of(t) for t in llrd} == {LLRD} and {arm_of(t) for t in control} == {CONTROL}
    # Trial ids are global to the storage: in ask order the arms follow choose_arm's sequence.
    order = [arm_of(t) for t in sorted(llrd + control, key=lambda t: compat.trial_id(t))]
    assert order == [LLRD, CONTROL, LLRD, LLRD, LLRD, CONTROL, LLRD, LLRD]
    out = main(["status", "--storage", url, "--study", "share", "--format", "json"])
    assert out == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the "killed" thread's SystemExit
def test_a_killed_workers_control_trial_is_retried_in_its_arm(write_study, tmp_path, capsys):
    # Short grace: the one live worker reaps only between its own trials, so no live trial is reaped.
    url = _arms_study(write_study, tmp_path, "killarm", 6, 0.34, heartbeat={"heartbeat_interval": 1, "grace_period": 3})
    died: list[int] = []
    # Worker threads 0-1; the one that dies leaves a RUNNING control trial for the other to reap.
    assert run_worker_threads(url, "killarm", 2, _quick(die_on_first_control=died), timeout=180) == []
    assert len(died) == 1
    assert states(url, "killarm") == {"COMPLETE": 4}
    assert states(url, "killarm.control") == {"COMPLETE": 2, "FAIL": 1}
    control = trials(url, "killarm.control")
    killed = next(t for t in control if t.number == died[0])
    retry = next(t for t in control if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.params == killed.params and arm_of(retry) == CONTROL
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "killarm", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arms"]["control"]["finished"] == 2 and data["arms"]["llrd"]["finished"] == 4 and data["finished"] == 6


def test_paper_control_point_goes_to_the_control_arm(write_study, tmp_path):
    path = write_study(name="paper", n_trials=4, study={"control_fraction": 0.25})
    path.write_text(path.read_text().replace("[study]\n", "[study]\nenqueue = [{ base_lr = 2e-4, head_lr = 2e-3, decay = 1.0 }]\n"))
    spec = load_spec(path)
    assert spec.initial_points() == [] and spec.control_points() == [{"base_lr": 2e-4, "head_lr": 2e-3, "decay": 1.0}]
    url = f"sqlite:///{tmp_path / 'paper.db'}"
    assert main(["create", str(path), "--storage", url]) == 0
    (queued,) = trials(url, "paper.control")
    assert queued.state.name == "WAITING" and trials(url, "paper") == []
    storage = open_storage(url)
    study, created = create_study(spec, storage)  # resuming creates nothing twice
    assert not created
    assert main(["create", str(path), "--storage", url]) == 0
    assert len(trials(url, "paper.control")) == 1


# --------------------------------------------------------------------------- the scenario


def test_search_confirm_report_give_a_confirmed_paired_verdict(write_study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'done.db'}"
    path = write_study(name="done", n_trials=3, study={"control_fraction": 0.34})
    assert main(["run", str(path), "--storage", url]) == 0
    assert states(url, "done") == {"COMPLETE": 2} and states(url, "done.control") == {"COMPLETE": 1}
    out = tmp_path / "before"
    assert main(["report", "--storage", url, "--study", "done", "--out", str(out)]) == 0
    before = json.loads((out / "summary.json").read_text())
    assert before["verdict"]["confirmed"] is False and before["verdict"]["text"].startswith("unconfirmed")
    text = (out / "summary.md").read_text()
    assert "unconfirmed" in text and "p = " not in text
    assert main(["confirm", "--storage", url, "--study", "done", "--top", "1", "--seeds", "2"]) == 0
    conf = trials(url, "done.confirm")
    seeds = {(t.user_attrs["llrd:arm"], t.user_attrs["llrd:confirm_rep"]): t.user_attrs["llrd:seed"] for t in conf}
    assert seeds[(LLRD, 0)] == seeds[(CONTROL, 0)] != seeds[(LLRD, 1)] == seeds[(CONTROL, 1)]  # paired seeds
    said = capsys.readouterr().out
    # --top 1: one LLRD configuration, compared with the control; never "nothing to compare it with".
    assert "one LLRD configuration was confirmed (no LLRD runner-up to rank it against); it is compared with the control below" in said
    assert "nothing to compare it with" not in said and "LLRD vs the better control" in said
    out = tmp_path / "after"
    assert main(["report", "--storage", url, "--study", "done", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (control_trial,) = [t for t in trials(url, "done.control") if t.state.name == "COMPLETE"]
    assert summary["best_control"]["trial"] == control_trial.number and summary["best_control"]["decay"] == 1.0
    v = summary["verdict"]
    assert v["confirmed"] is True and v["n_seeds"] == 2
    assert v["ci95"][0] <= v["gain"] <= v["ci95"][1]
    assert ("LLRD helps" in v["text"]) or ("no evidence" in v["text"]) or ("hurts" in v["text"])
    assert summary["decay_sweep"] == [] and summary["best"]["decay"] < 1.0
    assert summary["decay_interval"] is not None and summary["decay_interval_method"]
    assert v["text"] in (out / "summary.md").read_text()


# --------------------------------------------------------------------------- studies from before the control arm


def test_stored_spec_without_control_fraction_reads_as_no_control_arm():
    from llrd_search.study.storage import stored_spec_data
    from llrd_search.vocab import CONTROL_STUDY_ATTR

    old = {"study": {"name": "old", "n_trials": 4}}
    assert stored_spec_data(old, {})["study"]["control_fraction"] == 0.0
    assert "control_fraction" not in old["study"]  # the stored dict itself is left alone
    # Such a study that a worker already gave an arm (reading the default) keeps that arm's fraction.
    assert stored_spec_data(old, {CONTROL_STUDY_ATTR: "old.control"}) is old
    assert stored_spec_data({"study": {"control_fraction": 0.3}}, {})["study"]["control_fraction"] == 0.3


def test_a_study_from_before_the_control_arm_resumes_without_one(write_study, tmp_path, capsys):
    import optuna

    from llrd_search.study.storage import spec_of

    url = f"sqlite:///{tmp_path / 'old.db'}"
    path = write_study(name="old", n_trials=2)
    assert main(["create", str(path), "--storage", url]) == 0
    storage = open_storage(url)
    study = optuna.load_study(study_name="old", storage=storage)
    stored = json.loads(study.user_attrs["llrd:spec"])
    del stored["study"]["control_fraction"]  # what a version from before the control arm stored
    study.set_user_attr("llrd:spec", json.dumps(stored))
    assert spec_of(study).study.control_fraction == 0.0 and not spec_of(study).has_control_arm
    storage.engine.dispose()
    # Its study file, unchanged since: no control_fraction line, which a new study reads as 0.25.
    path.write_text(path.read_text().replace("control_fraction = 0.0\n", ""))
    assert load_spec(path).study.control_fraction == 0.25
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    assert states(url, "old") == {"COMPLETE": 2}  # the whole budget in its one arm, as planned
    storage = open_storage(url)
    try:
        assert [s.study_name for s in storage.get_all_studies()] == ["old"]  # no old.control made
    finally:
        storage.engine.dispose()
    out = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "old", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control_arm"] == "predates" and summary["best_control"] is None
    assert "The control arm was not part of this study" in (out / "summary.md").read_text()
    # Asking for the arm explicitly changes the spec: a one-line conflict, never an arm added mid-study.
    path.write_text(path.read_text().replace("[study]\n", "[study]\ncontrol_fraction = 0.25\n"))
    capsys.readouterr()
    assert main(["create", str(path), "--storage", url]) != 0
    assert "study.control_fraction was 0.0, now 0.25" in capsys.readouterr().err
