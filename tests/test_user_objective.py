"""The user's own objective: suggest_param_groups, loading module:function objectives, running them
through `llrd-search worker --objective` / `[train] objective`, report on such a study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from conftest import REPO
from optuna.trial import TrialState

from llrd_search import build_param_groups, group_table, suggest_param_groups, trial_seed
from llrd_search.engine.user_objective import load_objective
from llrd_search.exceptions import ObjectiveError, SpecError
from llrd_search.spec import load_spec
from llrd_search.study.storage import create_study, load_study, open_storage

SPACE = {"base_lr": {"low": 1e-5, "high": 1e-4, "log": True}, "head_lr": [3e-4], "decay": {"low": 0.6, "high": 0.9}}

PLAIN_LOOP = '''
import os
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from llrd_search import suggest_param_groups, trial_seed

MODEL = os.environ["PLAIN_MODEL"]
tokenizer = AutoTokenizer.from_pretrained(MODEL)
texts = ["good great movie", "bad awful film", "a superb story", "dull boring plot"] * 4
labels = torch.tensor([1, 0, 1, 0] * 4)

def objective(trial):
    torch.manual_seed(trial_seed(trial))
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    optimizer = torch.optim.AdamW(suggest_param_groups(trial, model))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for step in range(1, 4):
        model.train()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
        trial.report(accuracy, step)
    return accuracy
'''


def _cli(*args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "llrd_search", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def _main(*args: str, cwd) -> int:
    """The CLI in this process (no interpreter start-up): for commands whose own process adds nothing."""
    from llrd_search.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(list(args))
    finally:
        os.chdir(old)


def _tiny_classifier(model_dir, n_labels: int = 2):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels)


# --------------------------------------------------------------------------- suggest_param_groups


def test_suggest_param_groups_samples_the_stored_space(write_study, tiny_model_dir, tmp_path):
    spec = load_spec(write_study())
    study, _ = create_study(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    trial = study.ask()
    model = _tiny_classifier(tiny_model_dir)
    groups = suggest_param_groups(trial, model, weight_decay=0.02)
    p = trial.params
    assert set(p) == {"base_lr", "head_lr", "decay"}
    assert 1e-4 <= p["base_lr"] <= 1e-3 and 1e-3 <= p["head_lr"] <= 1e-2 and 0.5 <= p["decay"] <= 1.0
    expected = build_param_groups(model, weight_decay=0.02, **p)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [(g["name"], g["lr"], g["weight_decay"]) for g in expected]
    stored = study.trials[0].user_attrs["lr_groups"]
    assert stored == group_table(groups)
    assert trial_seed(trial) == spec.study.seed + trial.number


def test_suggest_param_groups_with_space_argument(tiny_model_dir):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    suggest_param_groups(trial, _tiny_classifier(tiny_model_dir), space=SPACE)
    assert 1e-5 <= trial.params["base_lr"] <= 1e-4 and trial.params["head_lr"] == 3e-4 and 0.6 <= trial.params["decay"] <= 0.9
    with pytest.raises(SpecError, match=r"space\.decay"):
        suggest_param_groups(study.ask(), _tiny_classifier(tiny_model_dir), space={**SPACE, "decay": {"low": 0.5, "high": 1.5}})


def test_suggest_param_groups_without_a_space_says_how(tiny_model_dir):
    trial = optuna.create_study().ask()
    with pytest.raises(SpecError, match="llrd-search create"):
        suggest_param_groups(trial, _tiny_classifier(tiny_model_dir))


def test_control_arm_gets_decay_exactly_one(tiny_model_dir):
    trial = optuna.create_study(study_name="trec.control", direction="maximize").ask()
    groups = suggest_param_groups(trial, _tiny_classifier(tiny_model_dir), space=SPACE)
    assert trial.params["decay"] == 1.0
    assert {g["lr"] for g in groups if g["name"].startswith(("layer.", "embeddings"))} == {trial.params["base_lr"]}


# --------------------------------------------------------------------------- loading objectives


def test_load_objective_errors_name_the_source_and_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "userobj_ok.py").write_text("def objective(trial):\n    return 1.0\nNOT_CALLABLE = 3\n")
    (tmp_path / "userobj_dep.py").write_text("import no_such_dependency_xyz\n")
    assert load_objective("userobj_ok:objective")(None) == 1.0  # imported from the current directory
    cases = {
        "no_such_module_xyz:objective": "--objective: module 'no_such_module_xyz' not found",
        "userobj_ok:missing": "--objective: module 'userobj_ok' has no attribute 'missing'",
        "userobj_ok:NOT_CALLABLE": "--objective: 'userobj_ok:NOT_CALLABLE' is not callable",
        "userobj_ok": "must look like package.module:function",
        "userobj_dep:objective": "importing module 'userobj_dep' failed: No module named 'no_such_dependency_xyz'",
    }
    for path, message in cases.items():
        with pytest.raises(ObjectiveError, match=message.replace("(", r"\(")):
            load_objective(path)
    with pytest.raises(ObjectiveError, match="^train.objective: "):
        load_objective("userobj_ok:missing", "train.objective")


def test_worker_with_a_bad_objective_is_one_line_and_runs_nothing(write_study, tmp_path):
    study_file = write_study()
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert _main("create", str(study_file), "--storage", url, cwd=tmp_path) == 0
    r = _cli("worker", "--storage", url, "--study", "toy", "--objective", "nowhere_xyz:objective", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["Error: --objective: module 'nowhere_xyz' not found "
                                             f"(looked in the current directory {tmp_path} and sys.path)"]
    assert load_study(open_storage(url), "toy").get_trials() == []


def test_spec_objective_must_be_module_colon_function(write_study):
    with pytest.raises(SpecError, match="train.objective: 'plain' must look like package.module:function"):
        load_spec(write_study(train={"objective": "plain"}))


def test_create_refuses_a_study_whose_objective_does_not_import(write_study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert _main("create", str(write_study(train={"objective": "nowhere_xyz:objective"})), "--storage", url, cwd=tmp_path) == 2
    assert "Error: train.objective: module 'nowhere_xyz' not found" in capsys.readouterr().err
    assert "toy" not in [s.study_name for s in optuna.get_all_study_summaries(url)]


# --------------------------------------------------------------------------- whole searches


def _assert_budget_with_llrd_attrs(url: str, name: str, n: int) -> list:
    trials = load_study(open_storage(url), name).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert set(t.params) == {"base_lr", "head_lr", "decay"}
        assert t.user_attrs["lr_groups"] and {r["name"] for r in t.user_attrs["lr_groups"]} >= {"embeddings", "layer.0", "layer.1", "head"}
    return trials


def test_plain_pytorch_loop_through_worker_objective(write_study, tiny_model_dir, tmp_path):
    (tmp_path / "plainloop.py").write_text(PLAIN_LOOP)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert _main("create", str(write_study(n_trials=3, study={"pruner": "median"})), "--storage", url, cwd=tmp_path) == 0
    r = _cli("worker", "--storage", url, "--study", "toy", "--objective", "plainloop:objective", cwd=tmp_path, PLAIN_MODEL=str(tiny_model_dir))
    assert r.returncode == 0, r.stderr
    trials = _assert_budget_with_llrd_attrs(url, "toy", 3)
    assert all(t.intermediate_values for t in trials if t.state == TrialState.COMPLETE)
    assert _main("report", "--storage", url, "--study", "toy", "--out", str(tmp_path / "report"), cwd=tmp_path) == 0
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    assert _main("export", "--storage", url, "--study", "toy", "--out", str(tmp_path / "best.json"), cwd=tmp_path) == 0
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    assert json.loads((tmp_path / "best.json").read_text())["base_lr"] == best.params["base_lr"]
    os.environ["PLAIN_MODEL"] = str(tiny_model_dir)  # confirm runs the objective in this process
    try:
        assert _main("confirm", "--storage", url, "--study", "toy", "--top", "1", "--seeds", "2", "--objective", "plainloop:objective", cwd=tmp_path) == 0
    finally:
        del os.environ["PLAIN_MODEL"]
    runs = [t for t in load_study(open_storage(url), "toy.confirm").get_trials() if t.state == TrialState.COMPLETE]
    assert len(runs) == 2 and all(t.params == best.params for t in runs)
    assert len({t.user_attrs["seed"] for t in runs} | {best.user_attrs["seed"]}) == 3  # fresh seeds


def test_study_file_objective_is_the_default_of_run(write_study, tiny_model_dir, tmp_path):
    (tmp_path / "plainloop.py").write_text(PLAIN_LOOP)
    study_file = write_study(n_trials=2, train={"objective": "plainloop:objective"})
    url = f"sqlite:///{tmp_path / 's.db'}"
    r = _cli("run", str(study_file), "--storage", url, cwd=tmp_path, PLAIN_MODEL=str(tiny_model_dir))
    assert r.returncode == 0, r.stderr
    trials = _assert_budget_with_llrd_attrs(url, "toy", 2)
    # the built-in loop would have stored n_train and evals; the user loop stores neither
    assert not any("n_train" in t.user_attrs for t in trials)
    assert all("seed" in t.user_attrs for t in trials if t.state == TrialState.COMPLETE)
