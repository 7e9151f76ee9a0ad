from __future__ import annotations

import json
import os

import optuna
import pytest
import torch
from conftest import SHARED_DATA, write_toy_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from llrd_search import load_config
from llrd_search.cli import main
from llrd_search.engine.objective import Objective
from llrd_search.engine.param_groups import build_param_groups, group_table
from llrd_search.engine.train import fresh_model, load_template
from llrd_search.exceptions import LLRDSearchError, ModelError, SpecError
from llrd_search.results.export import build_config, export_config, render
from llrd_search.spec import PACKAGED_MINILM, ModelSection, default_storage, load_spec, parse_spec
from llrd_search.study.storage import create_study, load_study, open_storage


def _search(path, n_trials: int = 2) -> tuple[str, optuna.Study]:
    """Run a small search directly with the objective (the worker is tested elsewhere)."""
    spec = load_spec(path)
    url = default_storage(path)
    storage = open_storage(url)
    try:
        study, _ = create_study(spec, storage)
        study.optimize(Objective(spec), n_trials=n_trials)
    finally:
        storage.engine.dispose()
    # a fresh in-memory copy: tests read it after the storage is closed
    return url, _read(url, spec.study.name)


def _read(url: str, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, direction="maximize")
    storage = open_storage(url)
    try:
        source = load_study(storage, name)
        for key, value in source.user_attrs.items():
            study.set_user_attr(key, value)
        study.add_trials(source.get_trials())
    finally:
        storage.engine.dispose()
    return study


@pytest.fixture(autouse=True)
def _one_thread():
    # Two torch threads on a busy shared 2-core machine spin-wait; one is several times faster here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def searched(write_study):
    return _search(write_study(n_trials=2))


def _tiny_classifier(model_dir, n_labels: int = 2):
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels)


def test_export_then_load_config_gives_the_search_groups(searched, tiny_model_dir, tmp_path):
    url, study = searched
    best = study.best_trial
    out = tmp_path / "best.json"
    assert main(["export", "--storage", url, "--study", "toy", "--out", str(out)]) == 0

    doc = json.loads(out.read_text())
    assert doc["trial"] == best.number and doc["validation_accuracy"] == best.value
    assert doc["groups"] == best.user_attrs["lr_groups"]  # the table the search trained with
    assert [g["name"] for g in doc["groups"]] == ["embeddings", "layer.0", "layer.1", "head"]
    assert doc["id2label"] == {"0": "0", "1": "1"} and doc["confirmed"] is None
    assert set(doc["versions"]) >= {"llrd-search", "torch", "transformers", "optuna"}
    assert "base_lr * decay ** (L - 1 - i)" in doc["convention"]

    cfg = load_config(out)
    model = _tiny_classifier(tiny_model_dir)
    mine = cfg.param_groups(model)
    ref = build_param_groups(model, weight_decay=cfg.train["weight_decay"], **{k: best.params[k] for k in ("base_lr", "head_lr", "decay")})
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in mine] == [(g["name"], g["lr"], g["weight_decay"]) for g in ref]
    assert [[id(p) for p in g["params"]] for g in mine] == [[id(p) for p in g["params"]] for g in ref]
    assert group_table(mine) == doc["groups"]
    # the documented one-liner works and steps
    optimizer = torch.optim.AdamW(load_config(out).param_groups(model))
    model(input_ids=torch.tensor([[2, 5, 3]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()


def test_yaml_export_round_trips(searched, tiny_model_dir, tmp_path):
    url, study = searched
    out = tmp_path / "best.yaml"
    assert main(["export", "--storage", url, "--study", "toy", "--out", str(out)]) == 0  # format from the suffix
    assert out.read_text().startswith("llrd_search_config: 1")
    cfg = load_config(out)
    assert (cfg.base_lr, cfg.head_lr, cfg.decay) == tuple(study.best_trial.params[k] for k in ("base_lr", "head_lr", "decay"))
    assert cfg.id2label == {0: "0", 1: "1"}
    cfg.param_groups(_tiny_classifier(tiny_model_dir))  # verifies against the file's table


def test_export_to_stdout(searched, capsys):
    url, _ = searched
    assert main(["export", "--storage", url, "--study", "toy"]) == 0
    assert json.loads(capsys.readouterr().out)["study"] == "toy"


def test_load_config_refuses_a_different_model(searched, tmp_path):
    url, _ = searched
    out = tmp_path / "best.json"
    out.write_text(render(export_config(url, "toy")))
    cfg = load_config(out)
    deeper = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ModelError, match=r"layer\.2"):
        cfg.param_groups(deeper)
    wider = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ModelError, match="parameters here"):
        cfg.param_groups(wider)
    assert len(cfg.param_groups(wider, check=False)) > 0


def test_export_never_contains_the_password(searched):
    _, study = searched
    secret_url = "postgresql+psycopg://alice:s3cr3t-pw@db.example:5432/llrd"
    config = build_config(study, secret_url)
    for fmt in ("json", "yaml"):
        text = render(config, fmt)
        assert "s3cr3t-pw" not in text
        assert "alice:***@db.example" in text


def test_export_prefers_the_confirmation_winner(searched):
    url, study = searched
    worst = min(study.trials, key=lambda t: t.value)
    summary = [{"source_trial": worst.number, "n": 3, "mean": 0.7, "std": 0.01, "accuracies": [0.69, 0.7, 0.71]}]
    config = build_config(study, url, summary)
    assert config["trial"] == worst.number and config["base_lr"] == worst.params["base_lr"]
    assert config["confirmed"] == {"mean": 0.7, "std": 0.01, "n": 3, "accuracies": [0.69, 0.7, 0.71]}
    assert config["selected_by"].startswith("confirmation")


def test_load_config_errors_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"base_lr": -1, "decay": 2}')
    with pytest.raises(SpecError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "base_lr: must be a number > 0" in msg and "decay: must lie in (0, 1]" in msg and "head_lr: required key is missing" in msg
    (tmp_path / "x.yaml").write_text("base_lr: [1,\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_train_writes_a_loadable_trained_model(tmp_path, write_study, tiny_model_dir):
    data = write_toy_dataset(tmp_path / "data", n_train=120, n_val=40, n_test=40)
    url, _ = _search(write_study(n_trials=1, data=data), n_trials=1)
    config = tmp_path / "best.json"
    assert main(["export", "--storage", url, "--study", "toy", "--out", str(config)]) == 0
    out = tmp_path / "model"
    assert main(["train", str(config), "--out", str(out), "--epochs", "1"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["validation_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["n_train"] == 120 and metrics["n_test"] == 40 and metrics["steps"] == 8  # 120 / batch 16
    assert metrics["config"]["base_lr"] == load_config(config).base_lr
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    with torch.no_grad():
        logits = model(**tokenizer(["a good lovely film", "a dull boring plot"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
    # The saved weights were trained: every LR group differs from where training started (the
    # pretrained backbone, the head as drawn for the config's seed).
    cfg = load_config(config)
    start = fresh_model(load_template(ModelSection(name=str(tiny_model_dir), max_length=32), {0: "0", 1: "1"}), cfg.seed).state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_param_groups(model, base_lr=cfg.base_lr, decay=cfg.decay, head_lr=cfg.head_lr)
    unchanged = [g["name"] for g in groups if all(torch.equal(p, start[names[id(p)]]) for p in g["params"])]
    assert unchanged == []
    assert {n for n in start} == set(model.state_dict())  # same layout: the comparison saw every tensor
    # a second run refuses to overwrite the model unless asked
    assert main(["train", str(config), "--out", str(out), "--epochs", "1"]) != 0
    assert main(["train", str(config), "--out", str(out), "--epochs", "1", "--train-limit", "60", "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_train"] == 60


@pytest.mark.integration
def test_train_packaged_minilm_on_sst2_slice(tmp_path):
    """Export from a study on the packaged MiniLM, then `train` on 200 SST-2 rows for 1 epoch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = parse_spec(
        {
            "study": {"name": "sst2-mini", "n_trials": 1, "sampler": "random", "pruner": "none"},
            "model": {"name": PACKAGED_MINILM, "max_length": 64},
            "data": {"path": str(SHARED_DATA / "sst2"), "train_limit": 200},
            "train": {"epochs": 1, "batch_size": 16, "evals_per_epoch": 1},
            "space": {"base_lr": {"low": 1e-5, "high": 1e-4}, "head_lr": {"low": 1e-4, "high": 1e-3}, "decay": {"low": 0.8, "high": 1.0}},
        }
    )
    url = f"sqlite:///{tmp_path / 'sst2.db'}"
    storage = open_storage(url)
    study, _ = create_study(spec, storage)
    dist = optuna.distributions.FloatDistribution
    study.add_trial(
        optuna.trial.create_trial(
            value=0.8,
            params={"base_lr": 5e-5, "head_lr": 5e-4, "decay": 0.9},
            distributions={"base_lr": dist(1e-5, 1e-4), "head_lr": dist(1e-4, 1e-3), "decay": dist(0.8, 1.0)},
        )
    )
    storage.engine.dispose()
    config = tmp_path / "best.json"
    assert main(["export", "--storage", url, "--study", "sst2-mini", "--out", str(config)]) == 0
    doc = json.loads(config.read_text())
    assert [g["name"] for g in doc["groups"]] == ["embeddings", *(f"layer.{i}" for i in range(6)), "head"]
    assert doc["groups"][0]["lr"] == pytest.approx(5e-5 * 0.9**6)

    out = tmp_path / "model"
    assert main(["train", str(config), "--out", str(out), "--train-limit", "200", "--epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 200 and metrics["n_validation"] == 872 and metrics["n_test"] == 1821
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    with torch.no_grad():
        logits = model(**tokenizer(["a gorgeous , moving film .", "a dull , lifeless mess ."], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)


def test_export_without_a_complete_trial_says_so(searched):
    _, study = searched
    empty = optuna.create_study(study_name="toy", direction="maximize")
    for key, value in study.user_attrs.items():
        empty.set_user_attr(key, value)
    with pytest.raises(LLRDSearchError, match="no complete trial"):
        build_config(empty, "sqlite:///x.db")


# --------------------------------------------------------------------------- when the ξ = 1 control arm wins


def _two_arm_search(write_study, tmp_path, control_value: float) -> str:
    """A 3-trial study with a control arm (2 LLRD trials, 1 control) where every LLRD trial scores 0.7
    and the control ``control_value``; no training (the objective only samples)."""
    from llrd_search.engine.objective import suggest
    from llrd_search.study.arms import CONTROL, arm_of
    from llrd_search.study.worker import run_worker

    url = f"sqlite:///{tmp_path / 'arms.db'}"
    path = write_study(name="arms", n_trials=3, study={"control_fraction": 0.34})
    assert main(["create", str(path), "--storage", url]) == 0

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            return control_value if arm_of(trial) == CONTROL else 0.7

        return objective

    assert run_worker(url, "arms", objective_factory=factory) == 3
    return url


def test_export_says_so_and_exports_plain_fine_tuning_when_the_control_arm_wins(write_study, tmp_path, tiny_model_dir, capsys):
    url = _two_arm_search(write_study, tmp_path, control_value=0.8)
    control = optuna.load_study(study_name="arms.control", storage=url)
    (best_control,) = control.get_trials(deepcopy=False)
    out = tmp_path / "best.json"
    capsys.readouterr()
    assert main(["export", "--storage", url, "--study", "arms", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: exporting trial {best_control.number} of 'arms.control'" in err and "control arm beat the LLRD arm" in err
    doc = json.loads(out.read_text())
    assert (doc["arm"], doc["arm_study"], doc["trial"], doc["decay"]) == ("control", "arms.control", best_control.number, 1.0)
    assert doc["base_lr"] == best_control.params["base_lr"] and doc["validation_score"] == 0.8
    assert doc["selected_by"].startswith("search") and "plain fine-tuning (decay 1.0)" in doc["selected_by"]
    assert len({g["lr"] for g in doc["groups"] if g["name"] != "head"}) == 1  # every encoder layer at base_lr: no decay
    cfg = load_config(out)
    assert cfg.arm == "control" and cfg.decay == 1.0
    cfg.param_groups(_tiny_classifier(tiny_model_dir))  # checks against the file's table
    # The report names the same configuration as the best overall.
    assert main(["report", "--storage", url, "--study", "arms", "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert {k: summary["winner"][k] for k in ("arm", "trial", "selected_by", "decay")} == {
        "arm": "control", "trial": best_control.number, "selected_by": "search", "decay": 1.0}
    assert summary["best"]["decay"] < 1.0  # `best` stays the LLRD arm's best
    assert "LLRD did not beat it, and `llrd-search export` exports it" in (tmp_path / "rep" / "summary.md").read_text()


@pytest.mark.parametrize(("llrd_runs", "control_runs", "arm"), [(0.9, 0.6, "llrd"), (0.7, 0.75, "control")])
def test_export_follows_the_confirmed_means_over_the_search_bests(write_study, tmp_path, llrd_runs, control_runs, arm):
    from llrd_search.study import confirm

    url = _two_arm_search(write_study, tmp_path, control_value=0.8)  # the search's bests: control 0.8, LLRD 0.7
    plan = confirm.prepare(url, "arms", top=1, seeds=2)
    linked = optuna.load_study(study_name=plan.study_name, storage=url)
    for _ in range(4):
        trial = linked.ask()
        linked.tell(trial, control_runs if trial.user_attrs["llrd:arm"] == "control" else llrd_runs)
    config = export_config(url, "arms")
    assert config["arm"] == arm and config["selected_by"].startswith("confirmation (best mean over 2 seeds)")
    assert config["confirmed"] == {"mean": pytest.approx(max(llrd_runs, control_runs)), "std": 0.0, "n": 2,
                                   "accuracies": [max(llrd_runs, control_runs)] * 2}
    if arm == "control":
        assert (config["arm_study"], config["decay"]) == ("arms.control", 1.0) and "control arm beat the LLRD arm" in config["selected_by"]
    else:
        assert (config["arm_study"], config["trial"]) == ("arms", plan.sources[0]) and config["decay"] < 1.0
