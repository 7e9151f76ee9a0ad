"""The Hugging Face Trainer: PruningCallback ends trials PRUNED, the worked example runs through
`llrd-search worker --objective`, and exported groups keep their LRs under the Trainer's scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO, SHARED_DATA, study_toml
from optuna.trial import TrialState
from test_user_objective import _assert_budget_with_llrd_attrs, _cli, _main, _tiny_classifier

from llrd_search import load_config, suggest_param_groups
from llrd_search.exceptions import LLRDSearchError
from llrd_search.study.storage import load_study, open_storage

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from llrd_search.hf import PruningCallback  # noqa: E402

SPACE = {"base_lr": [1e-3], "head_lr": [1e-2], "decay": [0.8]}


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def _toy_dataset(model_dir, n: int = 32) -> tuple[list[dict], object]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = ["good great movie", "bad awful film", "a superb charming story", "dull boring flat plot"]
    rows = [{**tokenizer(texts[i % 4]), "labels": int(i % 2 == 0)} for i in range(n)]
    return rows, transformers.DataCollatorWithPadding(tokenizer)


def _trainer(model, args_kw: dict, data, collator, optimizer, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=args_kw.pop("output_dir"), per_device_train_batch_size=8, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, **args_kw,
    )

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    return transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], data_collator=collator,
        compute_metrics=accuracy, optimizers=(optimizer, None), callbacks=list(callbacks),
    )


def _objective(model_dir, tmp_path, metric: str = "eval_accuracy"):
    data, collator = _toy_dataset(model_dir)

    def objective(trial: optuna.Trial) -> float:
        model = _tiny_classifier(model_dir)
        optimizer = torch.optim.AdamW(suggest_param_groups(trial, model, space=SPACE))
        pruning = PruningCallback(trial, metric=metric)
        trainer = _trainer(model, {"output_dir": str(tmp_path / f"t{trial.number}"), "max_steps": 8, "eval_strategy": "steps", "eval_steps": 2},
                           data, collator, optimizer, [pruning])
        trainer.train()
        trial.set_user_attr("global_step", trainer.state.global_step)
        return pruning.best

    return objective


def test_pruning_callback_reports_every_evaluation(tiny_model_dir, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    study.optimize(_objective(tiny_model_dir, tmp_path), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE
    assert sorted(t.intermediate_values) == [1, 2, 3, 4]  # evaluation indices, like the built-in loop
    assert t.value == max(t.intermediate_values.values())
    assert [e["step"] for e in t.user_attrs["evals"]] == [2, 4, 6, 8]
    assert study.metric_names == ["eval_accuracy"]  # the dashboard and report label values by it


def test_pruning_callback_ends_the_trial_pruned_not_failed(tiny_model_dir, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    study.optimize(_objective(tiny_model_dir, tmp_path), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert list(t.intermediate_values) == [1]
    assert t.user_attrs["pruned_at_step"] == 2  # stopped at the first evaluation, not after 8 steps
    assert t.user_attrs["lr_groups"]


def test_pruning_callback_names_a_missing_metric(tiny_model_dir, tmp_path):
    study = optuna.create_study(direction="maximize")
    with pytest.raises(LLRDSearchError, match=r"metric='eval_f1'.*eval_accuracy"):
        study.optimize(_objective(tiny_model_dir, tmp_path, metric="eval_f1"), n_trials=1, catch=())


def _trec() -> str:
    for folder in (REPO / "studies" / "data" / "trec", SHARED_DATA / "trec"):
        if (folder / "train.csv").is_file():
            return str(folder)
    pytest.skip("TREC data not found")


def test_trainer_example_through_worker_objective(tiny_model_dir, tmp_path):
    trec = _trec()
    study_file = tmp_path / "trec.toml"
    text = study_toml(tiny_model_dir, trec, name="trec-tiny", n_trials=3, train={"epochs": 3, "evals_per_epoch": 1}, study={"pruner": "hyperband"})
    study_file.write_text(text.replace("[data]\n", "[data]\ntrain_limit = 40\n"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert _main("create", str(study_file), "--storage", url, cwd=tmp_path) == 0
    r = _cli("worker", "--storage", url, "--study", "trec-tiny", "--objective", "trainer_objective:objective", cwd=REPO / "examples",
             TREC_MODEL=str(tiny_model_dir), TREC_DATA=trec, TREC_LIMIT="40")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _assert_budget_with_llrd_attrs(url, "trec-tiny", 3)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.value == max(e["eval_f1"] for e in t.user_attrs["evals"]) and len(t.user_attrs["evals"]) == 3
    assert _main("report", "--storage", url, "--study", "trec-tiny", "--out", str(tmp_path / "report"), cwd=tmp_path) == 0
    assert "validation eval_f1" in (tmp_path / "report" / "summary.md").read_text()  # named by PruningCallback(metric="eval_f1")


# --------------------------------------------------------------------------- part 3: exported configs


def _exported_config(write_study, tmp_path) -> str:
    from llrd_search.study.worker import run_worker

    url = f"sqlite:///{tmp_path / 's.db'}"
    assert _main("create", str(write_study(n_trials=1)), "--storage", url, cwd=tmp_path) == 0
    run_worker(url, "toy")
    assert load_study(open_storage(url), "toy").best_trial.state == TrialState.COMPLETE
    out = tmp_path / "best.json"
    assert _main("export", "--storage", url, "--study", "toy", "--out", str(out), cwd=tmp_path) == 0
    return str(out)


def test_exported_groups_keep_their_lrs_under_the_trainer_scheduler(write_study, tiny_model_dir, tmp_path):
    best = _exported_config(write_study, tmp_path)
    table = {row["name"]: row["lr"] for row in json.loads(Path(best).read_text())["groups"]}
    assert len(set(table.values())) >= 3  # embeddings, layers and head differ: a real test of per-group LRs

    model = _tiny_classifier(tiny_model_dir)
    optimizer = torch.optim.AdamW(load_config(best).param_groups(model))  # the README's line
    seen: list[tuple[int, dict[str, float]]] = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen.append((state.global_step, {g["name"]: g["lr"] for g in optimizer.param_groups}))

    data, collator = _toy_dataset(tiny_model_dir)
    total, warmup = 8, 3
    trainer = _trainer(model, {"output_dir": str(tmp_path / "out"), "max_steps": total, "warmup_steps": warmup, "lr_scheduler_type": "linear"},
                       data, collator, optimizer, [Record()])
    trainer.train()
    assert [s for s, _ in seen] == list(range(1, total + 1))
    multipliers = []
    for step, lrs in seen:
        # the Trainer's linear schedule after `step` scheduler steps, computed independently
        m = step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
        multipliers.append(m)
        assert set(n.removesuffix(".no_decay") for n in lrs) == set(table)
        for name, lr in lrs.items():
            assert lr == pytest.approx(table[name.removesuffix(".no_decay")] * m, rel=1e-6, abs=1e-15), (step, name)
    assert max(multipliers) == 1.0 and multipliers[0] < 1.0 and multipliers[-1] == 0.0
