"""`llrd-search init`: a study file from a data folder and a model, that validates and runs as is."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from conftest import SHARED_DATA

from llrd_search.cli import main
from llrd_search.exceptions import DataError
from llrd_search.scaffold import inspect_data
from llrd_search.spec import SpaceSection, load_spec


@pytest.mark.skipif(not (SHARED_DATA / "trec").is_dir(), reason="TREC copy not present")
def test_init_on_trec_writes_a_study_that_validates_and_runs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "trec.toml"
    assert main(["init", "--model", str(tiny_model_dir), "--data", str(SHARED_DATA / "trec"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train 5452, test 500 rows" in printed and "label 'label' (6 classes); no validation split" in printed
    text = out.read_text()
    assert "[space]\n" not in text.replace("# [space]\n", "")  # the defaults apply
    spec = load_spec(out)
    assert spec.data.path == str((SHARED_DATA / "trec").resolve()) and spec.data.label == "label" and spec.data.text == "text"
    assert spec.data.validation_fraction == 0.1 and spec.data.text_pair is None
    assert spec.model.max_length <= 64  # the tiny model's max_position_embeddings
    assert spec.train.metric == "f1_macro"  # TREC's coarse classes run from 86 (ABBR) to 1,250 (ENTY) rows
    assert spec.study.name.startswith("trec-")
    assert main(["validate", str(out)]) == 0

    # Run as written, only smaller: a tiny train_limit and one trial.
    out.write_text(text.replace("train_limit = 0 ", "train_limit = 60").replace("epochs = 3", "epochs = 1"))
    assert main(["run", str(out), "--n-trials", "1"]) == 0
    url = "sqlite:///" + str(out.with_suffix(".db"))
    study = optuna.load_study(study_name=spec.study.name, storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert study.metric_names == ["f1_macro"]
    stored = json.loads(study.user_attrs["llrd:spec"])
    assert stored["space"] == SpaceSection().model_dump(mode="json")  # the defaults, stored like any spec
    assert stored["space"]["base_lr"] == {"low": 5e-6, "high": 2e-4, "log": True}


def test_init_refuses_to_overwrite_without_force(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    out = tmp_path / "study.toml"
    out.write_text("# mine\n")
    args = ["init", "--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--out", str(out)]
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == f"Error: --out: {out} exists; pick another --out or pass --force to overwrite it"
    assert out.read_text() == "# mine\n"
    assert main([*args, "--force"]) == 0
    spec = load_spec(out)
    assert spec.data.text == "text" and spec.train.metric == "accuracy"
    assert "validation_fraction" not in out.read_text()  # the toy data has a validation split


def test_init_needs_a_data_folder(tmp_path, tiny_model_dir, capsys):
    assert main(["init", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "s.toml")]) == 2
    assert "Error: --data:" in capsys.readouterr().err
    assert not (tmp_path / "s.toml").exists()


def _pairs(folder, label_column: str):
    folder.mkdir()
    for split in ("train", "dev"):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "sentence1", "sentence2", label_column])
            for i in range(10):
                w.writerow([i, f"a man plays {i}", f"someone plays {i}", ["entailment", "neutral", "contradiction"][i % 3]])
    return folder


def test_inspect_finds_a_dev_split_and_sentence_pairs(tmp_path):
    info = inspect_data(_pairs(tmp_path / "nli", "label"))
    assert (info.text, info.text_pair, info.label) == ("sentence1", "sentence2", "label")
    assert info.validation_split == "dev" and info.rows == {"train": 10, "dev": 10} and info.num_classes == 3
    with pytest.raises(DataError, match=r"^--data: no label column in .*train.csv \(columns: id, sentence1, sentence2, gold\); name it 'label'"):
        inspect_data(_pairs(tmp_path / "gold", "gold"))
