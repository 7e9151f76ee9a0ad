"""Issue 17: the verdict's control had its chance (17.3), a held-out test split beside validation
that never feeds a choice (17.2), and ``confirm --seeds auto`` end to end (17.1; the design itself:
tests/test_sequential.py)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import write_toy_dataset

from llrd_search.cli import main
from llrd_search.sequential import REASONS
from llrd_search.study.controls import CONTROL_ARM, WINNER_LRS, pick_control
from llrd_search.study.rounds import judged


def _row(by_seed: dict[int, float]) -> dict:
    vals = list(by_seed.values())
    return {"by_seed": by_seed, "n": len(vals), "mean": sum(vals) / len(vals) if vals else float("nan")}


def test_the_verdicts_control_is_the_better_of_two_candidates():
    arm = _row({0: 0.80, 1: 0.82, 2: 0.81})
    plain = _row({0: 0.83, 1: 0.84, 2: 0.82})
    assert pick_control(arm, plain) == (plain, WINNER_LRS)
    assert pick_control(plain, arm)[1] == CONTROL_ARM  # the first is always the control arm's best
    assert pick_control(arm, _row({0: 0.81, 1: 0.82, 2: 0.80})) == (arm, CONTROL_ARM)  # a tie keeps the arm's best
    assert pick_control(arm, None) == (arm, CONTROL_ARM) and pick_control(None, plain) == (plain, WINNER_LRS)
    assert pick_control(_row({}), plain) == (plain, WINNER_LRS) and pick_control(None, None) == (None, None)
    # Means over the seeds both finished: a seed one of them lost does not decide.
    lost = _row({0: 0.85, 1: 0.70, 2: 0.70})
    assert pick_control(_row({0: 0.80, 1: 0.90, 2: 0.90}), _row({0: 0.85}))[1] == WINNER_LRS
    assert pick_control(lost, _row({0: 0.84}))[1] == CONTROL_ARM


def _searched(write_study, tmp_path, data):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    path = write_study(name="v", n_trials=3, data=data, study={"control_fraction": 0.34})
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    return url


def test_confirm_seeds_auto_two_controls_and_the_test_split(write_study, tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data", n_test=40, seed=3)
    url = _searched(write_study, tmp_path, data)
    clean = tmp_path / "clean.db"
    shutil.copy(tmp_path / "v.db", clean)
    capsys.readouterr()
    args = ["confirm", "--study", "v", "--top", "2", "--seeds", "auto", "--max-seeds", "4", "--threads", "1", "--format", "json"]
    assert main([*args[:1], "--storage", url, *args[1:]]) == 0
    out = json.loads(capsys.readouterr().out)
    v = out["llrd_vs_control"]
    seq = v["sequential"]
    assert seq["looks"] == [3, 4] and seq["reason"] in REASONS and v["n_seeds"] in (3, 4) and v["p"] is None
    assert v["control_source"] in (CONTROL_ARM, WINNER_LRS)
    plain = out["plain_at_winner_lrs"]
    winner = out["configurations"][0]
    assert plain["params"] == {**winner["params"], "decay": 1.0} and plain["source_trial"] == winner["source_trial"]
    assert plain["n"] == winner["n"] == v["n_seeds"]  # both controls on the winner's paired seeds
    assert all(r["n"] == 3 for r in out["configurations"][1:])  # the runner-up stops at the first look
    assert winner["test_mean"] is not None and set(winner["test_by_seed"]) == set(winner["by_seed"])
    assert v["test"]["n_seeds"] == v["n_seeds"]
    assert main([*args[:1], "--storage", url, *args[1:-2]]) == 0  # the table (resuming trains nothing)
    said = capsys.readouterr().out
    assert "LLRD vs the better control (ξ = 1, " in said and "sequential confirmation: " in said and "ξ = 1 at winner" in said
    assert "held-out test split (never used for a choice): LLRD " in said
    report = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "v", "--out", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    stopped = summary["verdict"]["stopped"]
    assert stopped["seeds_run"] == v["n_seeds"] and stopped["reason"] == seq["reason"] and stopped["futility"] == 0.10
    # The conditional power is recorded when the last look has not come (it is the futility stop's reading).
    assert (stopped["conditional_power"] is None) == (v["n_seeds"] == 4 or seq["reason"] in ("helps", "hurts", "no_difference"))
    assert summary["test"]["verdict"]["gain"] == v["test"]["gain"] and summary["verdict"]["control_source"] == v["control_source"]
    assert "| held-out test |" in (report / "summary.md").read_text()

    # The test split never feeds a choice: flip every test label and confirm the same search again.
    rows = list(csv.reader((data / "test.csv").open()))
    with (data / "test.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *([text, str(1 - int(label))] for text, label in rows[1:])])
    capsys.readouterr()
    assert main([*args[:1], "--storage", f"sqlite:///{clean}", *args[1:]]) == 0
    poisoned = json.loads(capsys.readouterr().out)
    pv = poisoned["llrd_vs_control"]
    assert [r["source_trial"] for r in poisoned["configurations"]] == [r["source_trial"] for r in out["configurations"]]
    assert [r["by_seed"] for r in poisoned["configurations"]] == [r["by_seed"] for r in out["configurations"]]
    assert (pv["control_source"], pv["n_seeds"], pv["gain"], pv["sequential"]["reason"]) == (
        v["control_source"], v["n_seeds"], v["gain"], seq["reason"])
    # ... while the test scores did see the flipped labels (2 classes: accuracy becomes 1 - accuracy).
    assert abs(poisoned["configurations"][0]["test_mean"] - (1.0 - winner["test_mean"])) < 1e-9



# Paired differences (LLRD winner − control, per seed): undecided at looks 3 and 5 of [3, 5, 7] (seed 4
# pulls look 5 back), "helps" at 7. Judged on other seeds at a look they say otherwise: all 7 at look 0
# are "futile", 7 at look 1 "help" (and 4 at look 0 "help").
_GAIN = [0.0225, 0.025, 0.0125, 0.0175, -0.005, 0.02, 0.0125]


def _sequential(url: str, study: str, stop_at: tuple[str, int] | None = None) -> dict:
    """``confirm --top 1 --seeds auto --max-seeds 7`` with a fake objective (no training): the winner
    scores 0.78 + _GAIN[seed], the control arm 0.78, ξ = 1 at the winner's LRs 0.70. ``stop_at``
    (source kind, seed): Ctrl-C there. Returns :func:`rounds.judged`."""
    from llrd_search.engine.objective import suggest
    from llrd_search.study import confirm
    from llrd_search.study.worker import run_worker

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            src, rep = str(trial.user_attrs["llrd:confirm_of"]), int(trial.user_attrs["llrd:confirm_rep"])
            kind = src.split(":")[0] if ":" in src else "llrd"
            if (kind, rep) == stop_at:
                raise KeyboardInterrupt
            return {"llrd": 0.78 + _GAIN[rep], "control": 0.78, "plain": 0.70}[kind]

        return objective

    def run_workers(linked: str) -> None:
        run_worker(url, linked, objective_factory=factory, on_trial_end=confirm.retry_hook(url, linked))

    confirm.run_confirmation(url, study, 1, "auto", run_workers, max_seeds=7)
    return judged(url, study)


def _decision(v: dict) -> tuple:
    seq = v["sequential"]
    return seq["look"], seq["reason"], seq["n"], v["n_seeds"], v["gain"], v["ci95"], v["control_source"], v["text"]


def test_a_resumed_or_repeated_sequential_confirmation_decides_as_an_uninterrupted_one(write_study, tmp_path):
    """Each look judges exactly its first looks[k] paired seeds, however often the command ran: a
    resume after an interruption, or a rerun of a finished confirmation, decides at the same look as one
    uninterrupted run (the group-sequential level holds only that way), and records that look."""
    url = _searched(write_study, tmp_path, write_toy_dataset(tmp_path / "data", seed=3))
    shutil.copy(tmp_path / "v.db", tmp_path / "cut.db")
    once = _sequential(url, "v")
    assert _decision(once)[:4] == (2, "helps", 7, 7) and once["control_source"] == CONTROL_ARM
    assert _decision(_sequential(url, "v")) == _decision(once)  # a rerun of the finished confirmation
    report = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "v", "--out", str(report)]) == 0
    stopped = json.loads((report / "summary.json").read_text())["verdict"]["stopped"]
    assert (stopped["reason"], stopped["seeds_run"]) == ("helps", 7)

    # Ctrl-C in the last look's round, with 6 pairs stored: the record and its reading stay at the second look ...
    cut = f"sqlite:///{tmp_path / 'cut.db'}"
    with pytest.raises(KeyboardInterrupt):
        _sequential(cut, "v", stop_at=("control", 6))
    early = judged(cut, "v")
    assert (early["sequential"]["look"], early["sequential"]["n"], early["sequential"]["reason"], early["n_seeds"]) == (1, 5, None, 5)
    # ... and the resumed command decides as the uninterrupted one did.
    assert _decision(_sequential(cut, "v")) == _decision(once)
