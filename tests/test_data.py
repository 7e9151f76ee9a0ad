from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA, write_toy_dataset

from llrd_search.engine.data import Encoded, label_mapping, load_task_data, stratified_indices
from llrd_search.exceptions import DataError
from llrd_search.spec import DataSection


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_stratified_indices_keep_class_shares_and_are_seeded():
    labels = np.array([0] * 80 + [1] * 20)
    idx = stratified_indices(labels, 0.1, seed=3)
    assert len(idx) == 10
    assert (labels[idx] == 0).sum() == 8 and (labels[idx] == 1).sum() == 2
    assert np.array_equal(idx, stratified_indices(labels, 0.1, seed=3))
    assert not np.array_equal(idx, stratified_indices(labels, 0.1, seed=4))


def test_stratified_indices_keep_rare_class():
    labels = np.array([0] * 98 + [1] * 2)
    idx = stratified_indices(labels, 0.05, seed=0)
    assert 1 in labels[idx]


def test_label_mapping():
    assert label_mapping([1, 0, 1]) == {0: "0", 1: "1"}
    assert label_mapping(["NUM", "ABBR", "HUM"]) == {0: "ABBR", 1: "HUM", 2: "NUM"}
    assert label_mapping([-1, 1]) == {0: "-1", 1: "1"}


def test_batch_pads_dynamically():
    enc = Encoded(ids=np.arange(1, 7, dtype=np.int32), offsets=np.array([0, 1, 4, 6]), labels=np.array([0, 1, 0]))
    b = enc.batch([1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[2, 3, 4], [1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    assert "token_type_ids" not in b
    assert enc.batch(np.array([2, 0]), pad_id=0)["input_ids"].tolist() == [[5, 6], [1, 0]]  # as wide as its longest


def test_load_splits_and_cache(toy_data_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLRD_SEARCH_CACHE", str(tmp_path / "cache"))
    task = load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 32, seed=0)
    assert (len(task.train), len(task.validation), task.test) == (240, 60, None)
    assert task.id2label == {0: "0", 1: "1"}
    assert not task.validation_from_train
    files = list((tmp_path / "cache" / "tokenized").glob("*.npz"))
    assert len(files) == 1
    again = load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 32, seed=0)
    assert again.fingerprint == task.fingerprint
    assert np.array_equal(again.train.ids, task.train.ids) and np.array_equal(again.validation.labels, task.validation.labels)
    other = load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 8, seed=0)
    assert other.fingerprint != task.fingerprint and other.train.lengths.max() == 8


def test_no_validation_split_carves_stratified(tmp_path, tokenizer):
    folder = write_toy_dataset(tmp_path / "d", n_train=200, n_val=0, labels=("neg", "pos"))
    task = load_task_data(DataSection(path=str(folder), validation_fraction=0.25), tokenizer, 32, seed=0)
    assert task.validation_from_train
    assert (len(task.train), len(task.validation)) == (150, 50)
    assert task.id2label == {0: "neg", 1: "pos"}
    assert sorted(np.bincount(task.validation.labels)) == [25, 25]


def test_train_limit_is_stratified_subsample(toy_data_dir, tokenizer):
    task = load_task_data(DataSection(path=str(toy_data_dir), train_limit=40, validation_limit=10), tokenizer, 32, seed=0)
    assert len(task.train) == 40 and len(task.validation) == 10
    assert np.bincount(task.train.labels).tolist() == [20, 20]


def test_unseen_validation_label(tmp_path, tokenizer):
    folder = write_toy_dataset(tmp_path / "d", n_train=20, n_val=10)
    text = (folder / "validation.csv").read_text().replace(",1\n", ",7\n", 1)
    (folder / "validation.csv").write_text(text)
    with pytest.raises(DataError, match=r"data.label: validation has label\(s\) 7 never seen in train"):
        load_task_data(DataSection(path=str(folder)), tokenizer, 32, seed=0)


def test_missing_column_named(toy_data_dir, tokenizer):
    with pytest.raises(DataError, match=r"data.text: column 'sentence' not in the train split \(columns: text, label\)"):
        load_task_data(DataSection(path=str(toy_data_dir), text="sentence"), tokenizer, 32, seed=0)


def test_missing_folder_and_split(tmp_path, tokenizer):
    with pytest.raises(DataError, match="is not a folder"):
        load_task_data(DataSection(path=str(tmp_path / "nope")), tokenizer, 32, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no 'train' split file"):
        load_task_data(DataSection(path=str(tmp_path / "empty")), tokenizer, 32, seed=0)


def test_empty_split(tmp_path, tokenizer):
    folder = write_toy_dataset(tmp_path / "d", n_train=20, n_val=10)
    (folder / "validation.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="validation split is empty"):
        load_task_data(DataSection(path=str(folder)), tokenizer, 32, seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "trec").is_dir(), reason="shared datasets not present")
def test_real_trec_string_labels(tokenizer):
    task = load_task_data(DataSection(path=str(SHARED_DATA / "trec"), train_limit=300), tokenizer, 32, seed=0)
    assert task.id2label == {0: "ABBR", 1: "DESC", 2: "ENTY", 3: "HUM", 4: "LOC", 5: "NUM"}
    assert task.validation_from_train and len(task.validation) == 546 and len(task.test) == 500


def test_integral_float_labels_are_int_classes(tmp_path, tokenizer):
    # pandas reads a label column written as 1.0 / 0.0 (or an int column with a gap) as float
    folder = write_toy_dataset(tmp_path / "d", n_train=20, n_val=10, labels=("0.0", "1.0"))
    task = load_task_data(DataSection(path=str(folder)), tokenizer, 32, seed=0)
    assert task.id2label == {0: "0", 1: "1"}
    # non-integral floats stay what they are: classes named by their value
    folder = write_toy_dataset(tmp_path / "h", n_train=20, n_val=10, labels=("0.5", "1.5"))
    assert load_task_data(DataSection(path=str(folder)), tokenizer, 32, seed=0).id2label == {0: "0.5", 1: "1.5"}


@pytest.mark.parametrize("damage", ["truncated", "junk", "empty"])
def test_unreadable_cache_file_is_rebuilt_with_a_warning(toy_data_dir, tokenizer, tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("LLRD_SEARCH_CACHE", str(tmp_path / "cache"))
    task = load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 32, seed=0)
    (path,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    good = path.read_bytes()
    path.write_bytes({"truncated": good[: len(good) // 2], "junk": b"not a zip file at all", "empty": b""}[damage])
    with caplog.at_level("WARNING", logger="llrd_search"):
        again = load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 32, seed=0)
    assert np.array_equal(again.train.ids, task.train.ids) and again.id2label == task.id2label
    assert any(str(path) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llrd_search"):
        load_task_data(DataSection(path=str(toy_data_dir)), tokenizer, 32, seed=0)
    assert not caplog.records  # rebuilt in place: the next load is a clean cache hit


def _examples(enc: Encoded) -> list[tuple[int, ...]]:
    return [tuple(enc.ids[enc.offsets[i]:enc.offsets[i + 1]]) for i in range(len(enc))]


def test_test_fraction_carves_a_stratified_seeded_test_split_disjoint_from_validation(tmp_path, tokenizer):
    folder = write_toy_dataset(tmp_path / "d", n_train=200, n_val=0, labels=("neg", "pos"))
    before = load_task_data(DataSection(path=str(folder), validation_fraction=0.25), tokenizer, 32, seed=0)
    task = load_task_data(DataSection(path=str(folder), validation_fraction=0.25, test_fraction=0.2), tokenizer, 32, seed=0)
    assert before.test is None and (len(task.train), len(task.validation), len(task.test)) == (120, 50, 30)
    assert sorted(np.bincount(task.test.labels)) == [15, 15]  # stratified
    assert _examples(task.validation) == _examples(before.validation)  # the search's validation split is untouched
    train, val, test = (set(_examples(s)) for s in (task.train, task.validation, task.test))
    assert not test & train and not test & val and (test | train) == set(_examples(before.train))
    again = load_task_data(DataSection(path=str(folder), validation_fraction=0.25, test_fraction=0.2), tokenizer, 32, seed=0, use_cache=False)
    assert _examples(again.test) == _examples(task.test)  # seeded
    shipped = write_toy_dataset(tmp_path / "t", n_train=100, n_val=20, n_test=40)
    limited = load_task_data(DataSection(path=str(shipped), test_fraction=0.2, test_limit=10), tokenizer, 32, seed=0)
    assert len(limited.test) == 10 and len(limited.train) == 100  # a shipped test split wins over carving
