"""The search layer's results calls (search.confirm, report, export, train) on the tiny model: typed
results, the same answers as the commands, and errors before anything is written."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from llrd_search import search
from llrd_search.cli import main
from llrd_search.console import ProgressConsole, RunConsole
from llrd_search.exceptions import LLRDSearchError
from llrd_search.records import ConfirmRow, PairedVerdict, SweepRow, Verdict
from llrd_search.results.export import render
from llrd_search.spec import load_spec
from llrd_search.study.storage import create_study, open_storage

DISTS = {"base_lr": FloatDistribution(1e-4, 1e-3, log=True), "head_lr": FloatDistribution(1e-3, 1e-2, log=True), "decay": FloatDistribution(0.5, 1.0)}


def _readme_api_example() -> str:
    """The Python reference's block that starts with ``from llrd_search import search`` (docs/reference/python.md)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "reference" / "python.md").read_text(encoding="utf-8"), re.S)
    (block,) = [b for b in blocks if b.startswith("from llrd_search import search\n")]
    return block


def test_readme_run_confirm_report_export_runs_and_matches_the_commands(write_study, tmp_path, monkeypatch, capsys):
    study = write_study(name="api", n_trials=3, study={"control_fraction": 0.34})
    code = _readme_api_example()
    assert '"studies/sst2-minilm.toml"' in code
    monkeypatch.chdir(tmp_path)  # the example writes reports/... and best.json where it runs
    names: dict = {}
    exec(compile(code.replace('"studies/sst2-minilm.toml"', repr(str(study))), "README.md", "exec"), names)
    c, r, e = names["c"], names["r"], names["e"]

    assert isinstance(c, search.Confirmation) and c.plan.study_name == "api.confirm" and c.plan.seeds == 3
    assert all(isinstance(row, ConfirmRow) and row.arm == "llrd" for row in c.configurations)
    assert isinstance(c.verdict, Verdict) and c.winner.source_trial == c.verdict.winner == c.configurations[0].source_trial
    assert c.winner.n == 3 and c.winner.mean == pytest.approx(sum(c.winner.accuracies) / 3)
    assert isinstance(c.control, ConfirmRow) and c.control.arm == "control" and c.control.params["decay"] == 1.0
    assert isinstance(c.paired, PairedVerdict) and c.paired.n_seeds == 3 and c.sweep is None
    # The command's JSON is the call's result, field for field (resuming runs nothing new).
    url, name = names["url"], names["name"]
    capsys.readouterr()
    assert main(["confirm", "--storage", url, "--study", name, "--top", "2", "--seeds", "3", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(c.as_dict()))

    assert isinstance(r, search.Report) and r.html == Path("reports", "sst2-minilm", "report.html")  # as given, like the command prints
    assert all(path.is_file() for path in r.files.values())
    summary = json.loads(r.files["summary_json"].read_text())
    assert r.summary == summary and r.metric == "accuracy"
    assert (r.verdict.gain, r.verdict.ci95, r.verdict.text) == tuple(summary["verdict"][k] for k in ("gain", "ci95", "text"))
    assert r.verdict.confirmed and r.verdict.n_seeds == 3
    assert [r.decay_interval.low, r.decay_interval.high] == summary["decay_interval"] and r.decay_interval.method == "seeds"

    assert isinstance(e, search.Exported) and e.out == Path("best.json") and e.format == "json"
    assert json.loads((tmp_path / "best.json").read_text()) == e.config and e.text == (tmp_path / "best.json").read_text()
    assert e.trial == c.verdict.winner and e.params == c.winner.params  # export takes the confirmed winner
    assert e.confirmed == {"mean": c.winner.mean, "std": c.winner.std, "n": 3, "accuracies": c.winner.accuracies}


class Recorder:
    """A search.Watcher that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def created(self, c) -> None:
        self.events.append(("created",))

    def started(self, launch) -> None:
        self.events.append(("started", launch.budget, launch.finished, launch.metric))

    def step(self, step: int, total: int) -> None:
        if not self.events or self.events[-1][0] != "step":  # one entry per run of steps
            self.events.append(("step",))

    def trial(self, study, trial) -> None:
        self.events.append(("trial", trial.user_attrs.get("llrd:sweep")))

    def close(self) -> None:
        self.events.append(("close",))


def test_confirm_with_a_decay_sweep_reports_each_round_to_its_watcher(write_study):
    path = write_study(n_trials=2)
    run = search.run(path, threads=1)
    url, name = run.created.url, run.created.study_name
    watch = Recorder()
    c = search.confirm(url, name, top=1, seeds=2, decay_sweep=[1.0], threads=1, watch=watch)

    assert c.control is None and c.paired is None
    own = c.configurations[0].params["decay"]
    assert [(r.decay, r.own, r.n) for r in c.sweep] == [(1.0, False, 2), (own, True, 2)] and isinstance(c.sweep[0], SweepRow)
    assert c.sweep[1].accuracies == c.configurations[0].accuracies  # the winner's own ξ is its confirmation runs
    # Round 1: the 2 confirmation runs; round 2: the 2 sweep runs at ξ = 1. Each round: started ... close.
    trial = [("step",), ("trial", None)]
    swept = [("step",), ("trial", 1.0)]
    assert watch.events == [("started", 2, 0, "accuracy"), *trial, *trial, ("close",),
                            ("started", 4, 2, "accuracy"), *swept, *swept, ("close",)]  # fmt: skip
    # The list and the command's text are the same sweep: asking again runs nothing.
    again = Recorder()
    assert search.confirm(url, name, top=1, seeds=2, decay_sweep="1.0", threads=1, watch=again).as_dict() == c.as_dict()
    assert again.events == []


def test_bad_arguments_fail_before_anything_is_written(tmp_path):
    db = tmp_path / "none.db"
    url = f"sqlite:///{db}"
    with pytest.raises(LLRDSearchError, match=r"^--top: must be >= 1 \(got 0\)$"):
        search.confirm(url, "x", top=0)
    with pytest.raises(LLRDSearchError, match=r"^--seeds: must be >= 1 \(got -1\)$"):
        search.confirm(url, "x", seeds=-1)
    with pytest.raises(LLRDSearchError, match=r"^--decay-sweep: ξ = 1.5 is out of range"):
        search.confirm(url, "x", decay_sweep=[0.9, 1.5])
    with pytest.raises(LLRDSearchError, match=r"^--format: 'xml' is not one of json, yaml$"):
        search.export(url, "x", format="xml")
    with pytest.raises(LLRDSearchError, match=r"^--out: folder .*nope does not exist$"):
        search.export(url, "x", out=tmp_path / "nope" / "best.json")
    with pytest.raises(LLRDSearchError, match=r"^--train-limit: must be >= 1 \(got 0\)$"):
        search.train(tmp_path / "best.json", tmp_path / "model", train_limit=0)
    assert not db.exists() and not (tmp_path / "model").exists()


@pytest.fixture
def finished(tmp_path, write_study) -> tuple[str, str]:
    """(url, name) of a study with two complete trials, made directly (no training)."""
    url = f"sqlite:///{tmp_path / 'done.db'}"
    storage = open_storage(url)
    study, _ = create_study(load_spec(write_study()), storage)
    for value, decay in ((0.8, 0.9), (0.7, 0.6)):
        study.add_trial(create_trial(params={"base_lr": 2e-4, "head_lr": 2e-3, "decay": decay}, distributions=DISTS, value=value))
    storage.engine.dispose()
    return url, "toy"


def test_export_report_and_train_of_a_finished_study(finished, tmp_path):
    url, name = finished
    e = search.export(url, name)  # no file: the document and its text
    assert e.out is None and e.format == "json" and e.text == render(e.config) and json.loads(e.text) == e.config
    assert (e.trial, e.validation_score, e.confirmed) == (0, 0.8, None)
    assert e.params == {"base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9}
    y = search.export(url, name, out=tmp_path / "best.yaml")  # the format follows the suffix
    assert y.format == "yaml" and y.config == e.config and (tmp_path / "best.yaml").read_text() == y.text == render(e.config, "yaml")

    r = search.report(url, name, tmp_path / "rep")
    assert r.study == name and r.storage == url and set(r.files) >= {"html", "summary", "summary_json", "history"}
    # No n_validation on these trials: no test is possible, the interval is the best ξ alone.
    assert (r.decay_interval.low, r.decay_interval.high, r.decay_interval.method) == (0.9, 0.9, "unknown-n")
    assert not r.verdict.confirmed and r.verdict.gain is None and r.verdict.text.startswith("unconfirmed")

    t = search.train(tmp_path / "best.yaml", tmp_path / "model", epochs=1, train_limit=40, threads=1)
    assert t.out == tmp_path / "model" and json.loads((t.out / "metrics.json").read_text()) == t.metrics
    assert t.metrics["n_train"] == 40 and 0.0 <= t.validation_accuracy <= 1.0 and t.test_accuracy is None


def test_rows_keep_the_key_order_confirm_printed_and_turn_nan_into_null():
    row = {"source_trial": 3, "arm": "llrd", "params": {"base_lr": 1e-4, "head_lr": 1e-3, "decay": 0.9}, "search_accuracy": 0.8,
           "accuracies": [], "by_seed": {}, "mean": math.nan, "std": math.nan, "n": 0, "n_planned": 2, "n_diverged": 0,
           "n_failed": 2, "test_by_seed": {}, "test_mean": None, "reused_from": None}  # fmt: skip
    data = ConfirmRow.of(row).as_dict()
    assert list(data) == list(row) and data["mean"] is None and data["std"] is None and data["n_failed"] == 2
    sweep = {"decay": 0.9, "base_lr": 1e-4, "head_lr": 1e-3, "winner": 3, "own": True, "accuracies": [0.8], "by_seed": {0: 0.8},
             "mean": 0.8, "std": 0.0, "n": 1, "n_planned": 2, "n_diverged": 1, "n_failed": 0, "test_by_seed": {0: 0.7}, "test_mean": 0.7, "reused_from": "control:0"}  # fmt: skip
    assert SweepRow.of(sweep).as_dict() == sweep and list(SweepRow.of(sweep).as_dict()) == list(sweep)
    assert SweepRow.of(sweep).n_text == "1 of 2, 1 diverged" and ConfirmRow.of(row).n_text == "0 of 2, 2 failed"
    with pytest.raises(TypeError):  # a key confirm adds must be added here too, not dropped
        ConfirmRow.of({**row, "p": 0.5})


def test_confirm_bar_names_the_metric_the_run_bar_shortens_it():
    launch = search.Launch(1, 1, "on cpu", budget=4, finished=1, best=None, metric="accuracy")
    quiet, loud = ProgressConsole(), RunConsole()
    quiet.started(launch)
    loud.started(launch)
    try:
        assert (quiet.progress.metric, quiet.progress.done, quiet.progress.total) == ("accuracy", 1, 4)
        assert loud.progress.metric == "acc"
    finally:
        quiet.close()
        loud.close()


def test_importing_the_library_leaves_matplotlib_alone():
    code = ("import sys, matplotlib; before = matplotlib.get_backend(); import llrd_search.results.report, llrd_search.search; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; assert matplotlib.get_backend() == before, before")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "svg"}, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
