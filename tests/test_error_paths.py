"""Error paths end to end: an interrupted confirm resumed, retries exhausted, a crashed child worker
of ``run --workers 2``, a sentence-pair dataset, and NaN/inf losses through the CLI's exit codes."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import signal
import threading

import optuna
import psutil
import pytest
import torch
from _fleet import (
    at_gate,
    budget_gate,
    finish,
    freeze_a_running_trial,
    printed_trials,
    running_trial_of,
    spawn,
    states,
    trials,
    wait_for,
)
from conftest import NEGATIVE, POSITIVE, STALE_FAST, write_toy_dataset
from sqlalchemy import create_engine, text

from llrd_search.cli import main
from llrd_search.engine import objective as objective_module
from llrd_search.engine.objective import suggest
from llrd_search.spec import default_storage, load_spec
from llrd_search.study import compat, confirm
from llrd_search.study.storage import create_study, open_storage
from llrd_search.study.worker import INTERRUPTED, run_worker

SLOW_EPOCHS = 25  # on 64 examples: a trial of a few seconds, long enough to be interrupted mid-trial


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("small"), n_train=64, n_val=16)


def _press_ctrl_c_when_running(url: str, name: str) -> threading.Thread:
    def press():
        wait_for(lambda: running_trial_of(url, name, [os.getpid()]), 120, f"a running trial of {name}")
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    return presser


def test_confirm_interrupted_then_resumed_runs_exactly_the_planned_trials(write_study, small, capsys):
    path = write_study(name="conf", n_trials=2, train={"epochs": SLOW_EPOCHS}, data=small)
    url = default_storage(path)
    assert main(["run", str(path)]) == 0
    linked = confirm.confirm_name("conf")

    presser = _press_ctrl_c_when_running(url, linked)
    assert main(["confirm", "--storage", url, "--study", "conf", "--top", "1", "--seeds", "2", "--threads", "1"]) == 130
    presser.join()
    assert "interrupted" in capsys.readouterr().err
    first = trials(url, linked)
    assert "RUNNING" not in {t.state.name for t in first}
    assert [t.user_attrs["fail_reason"] for t in first if t.state.name == "FAIL"] == [INTERRUPTED]

    assert main(["confirm", "--storage", url, "--study", "conf", "--top", "1", "--seeds", "2", "--threads", "1"]) == 0
    assert states(url, linked) == {"COMPLETE": 2, "FAIL": 1}  # the 2 planned runs, plus the interrupted one
    (row,) = confirm.confirmation_summary(url, "conf")
    assert row["n"] == 2 and row["n_failed"] == 0  # an interruption is not a failure of the configuration


def _abandon(study: optuna.Study, storage, url: str) -> int:
    """A worker that takes the next trial (the queued retry when there is one), beats once and dies;
    its heartbeat is then backdated past the grace period instead of waiting for it."""
    trial = study.ask({k: optuna.distributions.FloatDistribution(*b, log=True) for k, b in (("base_lr", (1e-4, 1e-3)), ("head_lr", (1e-3, 1e-2)))} | {"decay": optuna.distributions.FloatDistribution(0.5, 1.0)})
    trial.set_user_attr("worker", "gone:1")
    storage.record_heartbeat(compat.trial_id(trial))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = :i"), {"i": compat.trial_id(trial)})
    engine.dispose()
    return trial.number


def test_a_trial_whose_worker_dies_more_than_max_retries_times_ends_fail(write_study, tmp_path, caplog):
    from llrd_search.study.resilience import fail_stale

    path = write_study(name="doomed", n_trials=3, study={"max_retries": 2})
    url = f"sqlite:///{tmp_path / 'doomed.db'}"
    spec = load_spec(path)
    storage = open_storage(url, spec)
    study, _ = create_study(spec, storage)
    caplog.set_level(logging.WARNING, logger="llrd_search.study.resilience")
    # The first run and its 2 retries all lose their worker.
    deaths = [_abandon(study, storage, url)]
    for retry in (1, 2):
        assert fail_stale(study) == [deaths[-1]]
        assert caplog.messages[-1] == f"trial {deaths[-1]}: worker lost, marked FAIL and re-queued (retry {retry} of 2)"
        deaths.append(_abandon(study, storage, url))
    params = {n: study.trials[n].params for n in deaths}
    assert params[deaths[0]] == params[deaths[1]] == params[deaths[2]]  # retried with the same params
    storage.engine.dispose()

    def quick(spec):
        return lambda trial: suggest(trial, spec.space) and 0.5

    # A live worker reaps the third death and, retries exhausted, queues no fourth run.
    assert run_worker(url, "doomed", objective_factory=quick) == 3
    all_trials = trials(url, "doomed")
    assert states(url, "doomed") == {"COMPLETE": 3, "FAIL": 3}  # the budget is still exactly 3
    assert [all_trials[n].state.name for n in deaths] == ["FAIL"] * 3
    assert all(all_trials[n].user_attrs["fail_reason"].startswith("worker lost") for n in deaths)
    assert all_trials[deaths[2]].system_attrs["retry_history"] == deaths[:2]
    assert [t.number for t in all_trials if t.system_attrs.get("failed_trial") == deaths[0]] == deaths[1:]  # no 4th run
    # The log says so: no "re-queued" for the third death.
    lost = [m for m in caplog.messages if m.startswith(f"trial {deaths[2]}: worker lost")]
    assert lost == [f"trial {deaths[2]}: worker lost, marked FAIL; not re-queued: retries exhausted (study.max_retries = 2)"]


def test_a_child_worker_that_dies_makes_run_fail_without_losing_a_trial(write_study, tmp_path, small):
    name = "child"
    db = tmp_path / "child.db"
    url = f"sqlite:///{db}"
    # One live worker (in `run`) remains, and it reaps only between its own trials: a short grace
    # retries the dead child's trial soon and cannot hit a live one.
    # Trials of several seconds, and more of them than worker 0 can finish while the child starts.
    path = write_study(name=name, n_trials=6, train={"epochs": 4 * SLOW_EPOCHS}, data=small, study=STALE_FAST)
    proc = None
    try:
        proc = spawn(["run", str(path), "--workers", "2", "--storage", url], tmp_path / "run.log")
        # The child starts once `run` has created the study (under the budget lock); then hold that
        # lock until the child waits for it, so worker 0 cannot take every trial first.
        (child,) = wait_for(lambda: (c := psutil.Process(proc.pid).children()) and len(c) == 1 and c, 180, "the child worker")
        with budget_gate(db):
            wait_for(lambda: at_gate(db, [child.pid]), 180, "the child at the budget lock")
        # Frozen mid-trial first: the kill cannot land after the trial ended.
        _, victim = freeze_a_running_trial(url, name, [child.pid], timeout=180)
        child.kill()  # as the OOM killer would
        assert finish([proc], 300) == [1]
    finally:
        if proc is not None:
            proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert "Error: 1 of 2 workers exited with an error" in log
    assert "Traceback" not in log
    all_trials = trials(url, name)
    assert states(url, name) == {"COMPLETE": 6, "FAIL": 1}
    killed = all_trials[victim.number]
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"].startswith("worker lost")
    (retry,) = [t for t in all_trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert sorted(printed_trials(log)) == sorted(t.number for t in all_trials)


def test_sentence_pairs_run_end_to_end(write_study, tmp_path):
    # The label is in the second text only: a model that ignored text_pair could not learn it.
    rng = random.Random(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for split, n in (("train", 240), ("validation", 60)):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["premise", "hypothesis", "label"])
            for i in range(n):
                y = i % 2
                w.writerow(["the movie was a film", " ".join(rng.choices(POSITIVE if y else NEGATIVE, k=2)) + " plot", "yes" if y else "no"])
    path = write_study(
        name="pairs",
        n_trials=1,
        data=folder,
        train={"epochs": 6},
        space={"base_lr": "[3e-3]", "head_lr": "[3e-3]", "decay": "[1.0]"},
        study={"enqueue_paper_points": False},
    )
    path.write_text(path.read_text().replace("[data]\n", '[data]\ntext = "premise"\ntext_pair = "hypothesis"\n'))
    assert main(["run", str(path)]) == 0
    (t,) = trials(default_storage(path), "pairs")
    assert t.state.name == "COMPLETE" and t.value > 0.8
    task = objective_module.Objective(load_spec(path)).task
    assert task.id2label == {0: "no", 1: "yes"}
    # Both texts reach the model: [CLS] premise [SEP] hypothesis [SEP], the second as segment 1.
    first = task.validation.ids[task.validation.offsets[0] : task.validation.offsets[1]]
    assert list(first).count(3) == 2  # [SEP] is id 3 in the tiny vocabulary
    assert task.validation.type_ids is not None and task.validation.type_ids[: len(first)].max() == 1


def _poison_loss(monkeypatch, make_bad, only_trial: int | None = None):
    """Every trial's loss (or only ``only_trial``'s) turns non-finite from its 3rd step."""
    real = objective_module.fresh_model

    def fresh_model(template, seed):
        model = real(template, seed)
        calls = []

        def hook(module, args, kwargs, output):
            calls.append(1)
            if module.training and len(calls) >= 3 and (only_trial is None or seed == only_trial):
                output["loss"] = make_bad(output.loss)
            return output

        model.register_forward_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(objective_module, "fresh_model", fresh_model)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_in_every_trial_prunes_them_and_run_exits_1(write_study, monkeypatch, capsys, bad):
    # A non-finite loss is divergence: the trial ends PRUNED (its slot used, not refilled) with the
    # reason kept, and a search where nothing completed exits 1 saying so.
    _poison_loss(monkeypatch, lambda loss: loss * float("nan") if bad == "nan" else loss + float("inf"))
    path = write_study(name=f"loss-{bad}", n_trials=4)
    assert main(["run", str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "no trial completed"
    pruned = trials(default_storage(path), f"loss-{bad}")
    assert [t.state.name for t in pruned] == ["PRUNED"] * 4  # the budget, exactly
    assert all(t.user_attrs["diverged"].startswith(f"loss became {bad} at step 2") for t in pruned)


def test_non_finite_loss_in_one_trial_ends_that_trial_only(write_study, monkeypatch):
    _poison_loss(monkeypatch, lambda loss: loss * float("nan"), only_trial=1)
    path = write_study(name="loss-once", n_trials=3)
    assert main(["run", str(path)]) == 0
    all_trials = trials(default_storage(path), "loss-once")
    assert [t.state.name for t in all_trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert "loss became nan" in all_trials[1].user_attrs["diverged"]
    assert all(torch.isfinite(torch.tensor(t.value)) for t in all_trials if t.state.name == "COMPLETE")


def test_a_diverged_confirm_and_sweep_run_shows_in_n_everywhere(write_study, tmp_path, monkeypatch, capsys):
    # Run 1 of every LLRD configuration (ξ < 1) trains at an absurd LR and diverges (PRUNED, never
    # re-run); the control and the ξ = 1 sweep point, same seed, do not. n must say so, not just drop.
    real = objective_module.train_and_evaluate
    rep1_seed = 100_001  # study.seed 0 + trial_seed_offset 0 + confirm.SEED_OFFSET + run 1

    def absurd_for_rep1(model, task, groups, cfg, *, seed, **kw):
        if seed == rep1_seed and len({g["lr"] for g in groups if g["layer"] != "head"}) > 1:
            groups = [{**g, "lr": 10.0} for g in groups]
        return real(model, task, groups, cfg, seed=seed, **kw)

    monkeypatch.setattr(objective_module, "train_and_evaluate", absurd_for_rep1)
    url = f"sqlite:///{tmp_path / 'div.db'}"
    path = write_study(name="div", n_trials=3, study={"control_fraction": 0.34}, train={"epochs": 3})
    assert main(["run", str(path), "--storage", url, "--threads", "1"]) == 0
    capsys.readouterr()
    args = ["confirm", "--storage", url, "--study", "div", "--top", "1", "--seeds", "2", "--decay-sweep", "1.0", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    (diverged,) = [t for t in trials(url, "div.confirm") if t.state.name == "PRUNED"]
    assert diverged.user_attrs["diverged"].startswith("loss ") and diverged.user_attrs["llrd:confirm_rep"] == 1
    lines = out.splitlines()
    assert any(line.lstrip().startswith("trial ") and line.endswith("(n = 1 of 2, 1 diverged)") for line in lines), out
    assert any(line.lstrip().startswith("control ") and line.endswith("(n = 2)") for line in lines), out
    assert "ξ = 1.000" in out and any("(n = 1 of 2, 1 diverged)  (the winner" in line for line in lines), out
    assert "n = 1 of 2 paired seeds (1 diverged in the LLRD winner)" in out
    assert main(args) == 0  # resuming does not re-run a diverged run: it is a result, not a failure
    # 2 winner + 2 control runs: the control sits at the winner's LRs, so the sweep's ξ = 1 and the
    # ξ = 1 control at the winner's LRs are its runs, reused (issue 19.3), not 2 + 2 more.
    assert len(trials(url, "div.confirm")) == 4

    report_dir = tmp_path / "report"
    assert main(["report", "--storage", url, "--study", "div", "--out", str(report_dir)]) == 0
    summary = json.loads((report_dir / "summary.json").read_text())
    assert {k: summary["best"]["confirmed"][k] for k in ("n", "n_planned", "n_diverged")} == {"n": 1, "n_planned": 2, "n_diverged": 1}
    v = summary["verdict"]
    assert (v["n_seeds"], v["n_planned"], v["n_diverged"], v["confirmed"]) == (1, 2, {"llrd": 1, "control": 0}, False)
    by_decay = {r["decay"]: (r["n"], r["n_planned"], r["n_diverged"]) for r in summary["decay_sweep"]}
    assert by_decay[1.0] == (2, 2, 0) and sorted(by_decay.values()) == [(1, 2, 1), (2, 2, 0)]
    text = (report_dir / "summary.md").read_text()
    assert text.count("| 1 of 2, 1 diverged |") == 2  # the confirmation table and the sweep table
    assert "n = 1 of 2 paired seeds (1 diverged in the LLRD winner)" in text
