"""train.metric: exact scores on hand-checked examples, the real evaluate() path, the refusal of a
binary-only metric on a multi-class task, and the metric's name in the study, report and export."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch

from llrd_search.cli import main
from llrd_search.engine.data import Encoded
from llrd_search.engine.metrics import check_metric, score, study_metric_name
from llrd_search.engine.train import evaluate
from llrd_search.exceptions import DataError
from llrd_search.spec import load_spec
from llrd_search.study.storage import open_storage

# 3 classes, 6 examples: 4 correct.
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array([0, 1, 1, 1, 2, 0])


def test_multiclass_scores_match_hand_computation():
    assert score("accuracy", P3, Y3) == pytest.approx(4 / 6)
    # per-class F1: class 0 (tp 1, fp 1, fn 1) 1/2; class 1 (tp 2, fp 1, fn 0) 4/5; class 2 (tp 1, fp 0, fn 1) 2/3
    assert score("f1_macro", P3, Y3) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # Gorodkin's R_K: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c=4, s=6, t=(2,2,2), p=(2,3,1)
    assert score("mcc", P3, Y3) == pytest.approx((4 * 6 - 12) / math.sqrt((36 - 14) * (36 - 12)))


def test_binary_scores_match_hand_computation():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([1, 1, 0, 0, 1])  # tp 2, tn 1, fp 1, fn 1
    assert score("f1", p, y) == pytest.approx(2 / 3)
    assert score("mcc", p, y) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert score("f1", np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0  # never predicts the positive class


def test_binary_only_metric_on_a_multiclass_task_is_refused():
    check_metric("f1", 2)
    check_metric("f1_macro", 6)
    with pytest.raises(DataError, match=r"^train\.metric: 'f1' needs a binary task but the data has 6 classes; use 'f1_macro'"):
        check_metric("f1", 6)


class _FirstTokenModel(torch.nn.Module):
    """Predicts the class written in each example's first token id (ids 10, 11, 12 -> 0, 1, 2)."""

    def forward(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 0] - 10, 3).float())


def test_evaluate_scores_predictions_against_the_right_labels():
    # Lengths differ, so evaluate's length sort reorders the examples: labels must follow.
    lengths = np.array([5, 1, 4, 2, 6, 3])
    ids = np.concatenate([[10 + p] + [99] * (n - 1) for p, n in zip(P3, lengths, strict=True)]).astype(np.int32)
    data = Encoded(ids=ids, offsets=np.concatenate([[0], np.cumsum(lengths)]), labels=Y3.copy())
    kw = {"pad_id": 0, "batch_size": 4, "device": torch.device("cpu"), "dtype": None}
    model = _FirstTokenModel()
    assert evaluate(model, data, **kw) == pytest.approx(4 / 6)
    assert evaluate(model, data, metric="mcc", **kw) == pytest.approx(score("mcc", P3, Y3))
    assert evaluate(model, data, metric="f1_macro", **kw) == pytest.approx(score("f1_macro", P3, Y3))


def _three_class_data(folder):
    folder.mkdir()
    words = {"ABBR": "good great fine", "DESC": "bad awful dull", "NUM": "the a movie"}
    for split, n in (("train", 60), ("validation", 15)):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for i in range(n):
                label = list(words)[i % 3]
                w.writerow([words[label], label])
    return folder


def test_create_refuses_f1_on_three_classes_and_writes_nothing(write_study, tmp_path, capsys):
    path = write_study(data=_three_class_data(tmp_path / "three"), train={"metric": "f1"})
    db = tmp_path / "s.db"
    assert main(["create", str(path), "--storage", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "Error: train.metric: 'f1' needs a binary task but the data has 3 classes; use 'f1_macro' or 'mcc' (or 'accuracy')"
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []


def test_a_macro_f1_study_reports_names_and_exports_its_metric(write_study, tmp_path, capsys):
    path = write_study(n_trials=2, data=_three_class_data(tmp_path / "three"), train={"metric": "f1_macro", "evals_per_epoch": 2})
    assert main(["run", str(path)]) == 0
    url = "sqlite:///" + str(path.with_suffix(".db"))
    study = optuna.load_study(study_name="toy", storage=open_storage(url))
    assert study.metric_names == ["f1_macro"] and study_metric_name(study) == "f1_macro"
    for t in study.trials:
        evals = t.user_attrs["evals"]
        assert [set(e) for e in evals] == [{"eval", "step", "f1_macro"}] * 2
        assert [e["f1_macro"] for e in evals] == [t.intermediate_values[i] for i in (1, 2)]
        assert t.value == max(e["f1_macro"] for e in evals)
    assert "f1_macro" in capsys.readouterr().out  # "best: trial N f1_macro 0.xxxx"

    assert main(["report", "--storage", url, "--study", "toy", "--out", str(tmp_path / "rep")]) == 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "validation f1_macro **" in summary and "| trial | f1_macro |" in summary
    assert "accuracy" not in summary.replace("accuracy_vs_decay.png", "")  # file stems stay fixed
    assert main(["export", "--storage", url, "--study", "toy", "--out", str(tmp_path / "best.json")]) == 0
    doc = json.loads((tmp_path / "best.json").read_text())
    assert doc["metric"] == "f1_macro" and doc["validation_score"] == study.best_value and doc["validation_accuracy"] is None
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "toy", "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["metric"] == "f1_macro" and status["best"]["value"] == study.best_value


def test_default_metric_is_accuracy_and_a_study_made_without_names_reads_its_spec(write_study, tmp_path):
    spec = load_spec(write_study())
    assert spec.train.metric == "accuracy"
    legacy = optuna.create_study(storage=f"sqlite:///{tmp_path / 'old.db'}", study_name="old", direction="maximize")
    assert study_metric_name(legacy) == "accuracy"
    legacy.set_user_attr("llrd:spec", json.dumps({"train": {"metric": "mcc"}}))
    assert study_metric_name(legacy) == "mcc"
