"""``confirm --decay-sweep``: the paper's ξ table for the user's model, its interval, summary.json."""

from __future__ import annotations

import json

import pytest
from _fleet import trials
from scipy import stats as st

from llrd_search.cli import main
from llrd_search.stats import sweep_interval
from llrd_search.study.confirm import SWEEP_ATTR, parse_decays
from llrd_search.study.storage import open_storage

# --------------------------------------------------------------------------- pure pieces


def test_parse_decays_sorts_and_dedupes():
    assert parse_decays("1.0,0.95,0.9,0.8,0.7") == [1.0, 0.95, 0.9, 0.8, 0.7]
    assert parse_decays(" 0.9 , 1 ,0.9") == [1.0, 0.9]


@pytest.mark.parametrize("text", ["", " , ", "1.5", "0", "-0.2", "nan", "0.9,abc", "0.9,,1.2"])
def test_parse_decays_rejects_bad_values(text):
    with pytest.raises(Exception, match="^--decay-sweep: "):
        parse_decays(text)


def _row(decay: float, accs: list[float]) -> dict:
    return {"decay": decay, "by_seed": dict(enumerate(accs)), "n": len(accs), "mean": sum(accs) / len(accs)}


def test_sweep_interval_exact_values():
    rows = [
        _row(1.0, [0.79, 0.83, 0.82]),  # best minus it: +0.01, -0.01, +0.02 -> CI includes 0: ties
        _row(0.9, [0.80, 0.82, 0.84]),  # the best mean (0.82)
        _row(0.8, [0.78, 0.80, 0.83]),  # +0.02, +0.02, +0.01 -> CI [0.0023, 0.0310]: worse
        _row(0.7, [0.70, 0.72, 0.74]),  # +0.10 on every seed: zero spread, clearly worse
    ]
    iv = sweep_interval(rows)
    assert iv == {"low": 0.9, "high": 1.0, "best_decay": 0.9, "members": [1.0, 0.9], "compared": 4, "method": "sweep"}
    # The 0.8 verdict is scipy's paired t-test's, not a coincidence of the rule.
    assert st.ttest_rel([0.80, 0.82, 0.84], [0.78, 0.80, 0.83]).pvalue < 0.05 < st.ttest_rel([0.80, 0.82, 0.84], [0.79, 0.83, 0.82]).pvalue


def test_sweep_interval_unjudgeable_and_empty():
    # One shared seed: nothing tells 0.8 apart from the best, so it ties; a ξ with no run is not compared.
    rows = [_row(1.0, [0.9, 0.8]), _row(0.8, [0.5]), {"decay": 0.7, "by_seed": {}, "n": 0, "mean": float("nan")}]
    assert sweep_interval(rows) == {"low": 0.8, "high": 1.0, "best_decay": 1.0, "members": [1.0, 0.8], "compared": 2, "method": "sweep"}
    assert sweep_interval([{"decay": 0.7, "by_seed": {}, "n": 0, "mean": float("nan")}]) is None
    # Equal means: the larger ξ (less decay) is the best.
    assert sweep_interval([_row(0.9, [0.8, 0.9]), _row(1.0, [0.9, 0.8])])["best_decay"] == 1.0


# --------------------------------------------------------------------------- CLI


def test_bad_decay_sweep_is_a_one_line_error_and_writes_nothing(write_study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    path = write_study(name="bad", n_trials=1)
    assert main(["create", str(path), "--storage", url]) == 0
    capsys.readouterr()
    code = main(["confirm", "--storage", url, "--study", "bad", "--top", "1", "--seeds", "2", "--decay-sweep", "1.0,1.5"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("Error: --decay-sweep: ξ = 1.5 is out of range") and "\n" not in err
    storage = open_storage(url)
    try:
        assert [s.study_name for s in storage.get_all_studies()] == ["bad"]  # no linked study made
    finally:
        storage.engine.dispose()


def test_done_means_control_confirm_sweep_report(write_study, tmp_path, capsys):
    """The issue's scenario: control_fraction 0.34, confirm --top 1 --seeds 2 --decay-sweep 1.0,0.9, report."""
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    path = write_study(name="sweep", n_trials=3, study={"control_fraction": 0.34})
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    args = ["confirm", "--storage", url, "--study", "sweep", "--top", "1", "--seeds", "2", "--decay-sweep", "1.0,0.9", "--threads", "1"]
    assert main(args) == 0
    assert "decay sweep at base_lr=" in capsys.readouterr().out
    conf = trials(url, "sweep.confirm")
    swept = [t for t in conf if SWEEP_ATTR in t.user_attrs]
    winner = next(t for t in conf if t.user_attrs["llrd:arm"] == "llrd" and SWEEP_ATTR not in t.user_attrs)
    own = winner.params["decay"]
    want = sorted({1.0, 0.9, own}, reverse=True)
    control_run = next(t for t in conf if t.user_attrs["llrd:arm"] == "control")
    # Both arms' random samplers share the seed, so the control's trial sits at the winner's LRs:
    # ξ = 1 there is the control's confirmation runs, reused (issue 19.3), not trained again.
    shared = (control_run.params["base_lr"], control_run.params["head_lr"]) == (winner.params["base_lr"], winner.params["head_lr"])
    assert shared
    # The winner's own ξ is its confirmation runs; every other ξ is 2 sweep runs at the winner's LRs.
    assert sorted({t.user_attrs[SWEEP_ATTR] for t in swept}, reverse=True) == [x for x in want if x not in (own, 1.0)]
    assert all(t.state.name == "COMPLETE" and t.params["decay"] == t.user_attrs[SWEEP_ATTR] for t in swept)
    assert {(t.params["base_lr"], t.params["head_lr"]) for t in swept} == {(winner.params["base_lr"], winner.params["head_lr"])}
    # Paired: run i of every ξ (and of the confirmation runs) used the same seed.
    seeds = {t.user_attrs["llrd:confirm_rep"]: set() for t in conf}
    for t in conf:
        seeds[t.user_attrs["llrd:confirm_rep"]].add(t.user_attrs["llrd:seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len(seeds) == 2
    # Resuming (the same command) runs nothing more.
    assert main(args) == 0
    assert len(trials(url, "sweep.confirm")) == len(conf)
    out = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "sweep", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["decay"] for r in summary["decay_sweep"]] == want
    assert all(r["n"] == 2 and 0.0 <= r["mean"] <= 1.0 and r["std"] >= 0.0 for r in summary["decay_sweep"])
    assert summary["decay_interval_method"] == "sweep"
    lo, hi = summary["decay_interval"]
    assert lo <= hi and {lo, hi} <= set(want)
    v = summary["verdict"]
    assert v["confirmed"] is True and v["n_seeds"] == 2 and v["ci95"][0] <= v["gain"] <= v["ci95"][1]
    (control,) = [t for t in trials(url, "sweep.control") if t.state.name == "COMPLETE"]
    assert summary["best_control"]["trial"] == control.number and summary["best_control"]["decay"] == 1.0
    text = (out / "summary.md").read_text()
    assert "## Decay sweep" in text and "| 0.900 " in text and "5.52" in text  # the paper's ξ = 0.9 row beside ours
    assert (out / "decay_sweep.png").stat().st_size > 0 and "decay_sweep.png" in text


def test_a_sweep_point_equal_to_the_confirmed_control_is_reused_not_trained(write_study, tmp_path, capsys):
    """Issue 19.3: the control's best sits at the winner's LRs, so the sweep's ξ = 1 runs are its runs."""
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    at = {"base_lr": 3e-4, "head_lr": 3e-3}
    path = write_study(name="reuse", n_trials=2, study={"control_fraction": 0.5, "enqueue": [{**at, "decay": 0.9}, {**at, "decay": 1.0}]})
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    capsys.readouterr()
    args = ["confirm", "--storage", url, "--study", "reuse", "--top", "1", "--seeds", "2", "--decay-sweep", "1.0,0.9", "--threads", "1"]
    assert main(args + ["--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    conf = trials(url, "reuse.confirm")
    # 2 seeds of the winner and 2 of the control; no sweep run: ξ = 0.9 is the winner's, ξ = 1 the control's.
    assert len(conf) == 4 and not [t for t in conf if SWEEP_ATTR in t.user_attrs]
    control = data["control"]
    (xi1,) = [r for r in data["decay_sweep"] if r["decay"] == 1.0]
    assert xi1["reused_from"] == f"control:{control['source_trial']}" and control["reused_from"] is None
    assert (xi1["by_seed"], xi1["mean"], xi1["n"]) == (control["by_seed"], control["mean"], 2)  # the same numbers
    # Saved: the sweep's ξ = 1 and the verdict's second control (ξ = 1 at the winner's LRs), 2 seeds each.
    assert data["runs_saved"] == 4 and data["plain_at_winner_lrs"]["reused_from"] == xi1["reused_from"]
    assert main(args) == 0  # resuming trains nothing and says what it reused
    out = capsys.readouterr().out
    assert len(trials(url, "reuse.confirm")) == 4
    assert "(reused: the control's (trial 0) runs, same LRs, ξ and seeds)" in out
    assert "reused 4 finished or queued run(s) instead of training them again" in out
    report = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "reuse", "--out", str(report)]) == 0
    assert "| 1.000 (the control's runs, reused) |" in (report / "summary.md").read_text()
    assert json.loads((report / "summary.json").read_text())["decay_sweep"][0]["reused_from"] == "control:0"


def test_sweep_seeds_runs_the_sweep_on_the_first_n_of_the_winners_seeds(write_study, tmp_path, capsys):
    """``--sweep-seeds 2`` with ``--seeds 3``: each other ξ trains 2 runs, and every sweep row (the
    winner's own and ξ = 1's included) is read at runs 0 and 1, so its means are over the same seeds."""
    url = f"sqlite:///{tmp_path / 'few.db'}"
    path = write_study(name="few", n_trials=3, study={"control_fraction": 0.34})
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    base = ["confirm", "--storage", url, "--study", "few", "--top", "1", "--seeds", "3", "--threads", "1"]
    for extra, words in ((["--decay-sweep", "1.0,0.7", "--sweep-seeds", "4"], "--sweep-seeds: must be from 1 to --seeds (3)"),
                         (["--sweep-seeds", "2"], "--sweep-seeds: only with --decay-sweep")):
        capsys.readouterr()
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"Error: {words}") and "\n" not in err
    storage = open_storage(url)
    try:
        assert "few.confirm" not in {s.study_name for s in storage.get_all_studies()}  # nothing written
    finally:
        storage.engine.dispose()
    assert main([*base, "--decay-sweep", "1.0,0.7", "--sweep-seeds", "2", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    conf = trials(url, "few.confirm")
    swept = [t for t in conf if SWEEP_ATTR in t.user_attrs]
    assert {t.user_attrs[SWEEP_ATTR] for t in swept} == {0.7} and sorted(t.user_attrs["llrd:confirm_rep"] for t in swept) == [0, 1]
    assert out["configurations"][0]["n"] == 3  # the winner keeps its 3 seeds for the verdict
    rows = out["decay_sweep"]
    assert 0.7 in [r["decay"] for r in rows] and all(r["n"] == 2 and set(r["by_seed"]) == {"0", "1"} for r in rows)
    own = next(r for r in rows if r["own"])
    winner = out["configurations"][0]["by_seed"]
    assert own["mean"] == pytest.approx((winner["0"] + winner["1"]) / 2)
