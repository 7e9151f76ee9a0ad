"""Bad input: each case exits non-zero with exactly one ``Error: ...`` line on stderr that names the
key, file or URL, prints no traceback, and creates no study.

Run with LLRD_SHOW_ERRORS=1 to print every message (the table in docs/distributed.md comes from it).
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
from pathlib import Path

import optuna
import pytest
from _pg import pg_db, pg_url, scram_pg, url_for  # noqa: F401 (fixtures)

from llrd_search.cli import main


def _one_error(capsys, argv: list[str], *must: str, case: str = "") -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if os.environ.get("LLRD_SHOW_ERRORS"):
        sys.__stdout__.write(f"\n| {case} | rc {rc} | {' / '.join(lines)} |\n")
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for text in must:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def _no_study(db: Path) -> None:
    if db.exists():
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        assert optuna.get_all_study_summaries(storage) == []
        storage.engine.dispose()


def _run(capsys, study: Path, tmp_path: Path, *must: str, case: str) -> str:
    db = tmp_path / "bad.db"
    line = _one_error(capsys, ["run", str(study), "--storage", f"sqlite:///{db}"], *must, case=case)
    _no_study(db)
    return line


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def _csv(folder: Path, split: str, header: list[str], rows: list[list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


ROWS = [["good great film", 1], ["bad awful film", 0]] * 8


# --------------------------------------------------------------------------- the study file


def test_toml_syntax_error(capsys, tmp_path):
    study = tmp_path / "broken.toml"
    study.write_text("[study\nname = 'x'\n")
    _run(capsys, study, tmp_path, str(study), "TOML syntax error", case="TOML syntax error")


def test_unknown_key_suggests_the_closest(capsys, tmp_path, write_study):
    _run(capsys, write_study(train={"epoch": 2}), tmp_path, "train.epoch", "did you mean 'epochs'", case="unknown key")


def test_low_above_high(capsys, tmp_path, write_study):
    study = _edit(write_study(), "base_lr = { low = 1e-4, high = 1e-3", "base_lr = { low = 1e-3, high = 1e-4")
    _run(capsys, study, tmp_path, "space.base_lr", "must be <=", case="low > high")


def test_negative_lr(capsys, tmp_path, write_study):
    study = _edit(write_study(), "head_lr = { low = 1e-3,", "head_lr = { low = -1e-3,")
    _run(capsys, study, tmp_path, "space.head_lr", "> 0", case="negative LR")


def test_zero_lr(capsys, tmp_path, write_study):
    study = _edit(write_study(), "base_lr = { low = 1e-4, high = 1e-3, log = true }", "base_lr = [0.0, 1e-4]")
    _run(capsys, study, tmp_path, "space.base_lr", "> 0", case="zero LR")


def test_decay_above_one(capsys, tmp_path, write_study):
    study = _edit(write_study(), "decay = { low = 0.5, high = 1.0 }", "decay = { low = 0.5, high = 1.5 }")
    _run(capsys, study, tmp_path, "space.decay", "(0, 1]", case="decay > 1")


def test_decay_zero(capsys, tmp_path, write_study):
    study = _edit(write_study(), "decay = { low = 0.5, high = 1.0 }", "decay = [0.0, 0.9]")
    _run(capsys, study, tmp_path, "space.decay", "(0, 1]", case="decay = 0")


def test_n_trials_not_positive(capsys, tmp_path, write_study):
    _run(capsys, write_study(n_trials=0), tmp_path, "study.n_trials", "must be > 0", case="n_trials <= 0")


# --------------------------------------------------------------------------- data


def test_missing_data_folder(capsys, tmp_path, write_study):
    missing = tmp_path / "no-such-data"
    _run(capsys, write_study(data=missing), tmp_path, "data.path", str(missing), "does not exist", case="missing data folder")


def test_missing_split_file(capsys, tmp_path, write_study):
    folder = tmp_path / "only-val"
    _csv(folder, "validation", ["text", "label"], ROWS)
    _run(capsys, write_study(data=folder), tmp_path, "data.path", "'train'", str(folder), case="missing split file")


def test_missing_text_column(capsys, tmp_path, write_study):
    folder = tmp_path / "sentence-col"
    for split in ("train", "validation"):
        _csv(folder, split, ["sentence", "label"], ROWS)
    _run(capsys, write_study(data=folder), tmp_path, "data.text", "'text'", "sentence", case="missing text column")


def test_missing_label_column(capsys, tmp_path, write_study):
    folder = tmp_path / "y-col"
    for split in ("train", "validation"):
        _csv(folder, split, ["text", "y"], ROWS)
    _run(capsys, write_study(data=folder), tmp_path, "data.label", "'label'", case="missing label column")


def test_empty_split(capsys, tmp_path, write_study):
    folder = tmp_path / "empty-train"
    _csv(folder, "train", ["text", "label"], [])
    _csv(folder, "validation", ["text", "label"], ROWS)
    _run(capsys, write_study(data=folder), tmp_path, "train", "empty", case="empty split")


def test_validation_label_unseen_in_training(capsys, tmp_path, write_study):
    folder = tmp_path / "unseen"
    _csv(folder, "train", ["text", "label"], ROWS)
    _csv(folder, "validation", ["text", "label"], [*ROWS, ["neutral film", 2]])
    _run(capsys, write_study(data=folder), tmp_path, "data.label", "validation", "2", case="validation label unseen in train")


# --------------------------------------------------------------------------- model


def test_model_path_that_is_not_a_model(capsys, tmp_path, write_study):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    _run(capsys, write_study(model=empty), tmp_path, "model.name", str(empty), "not a saved model", case="model path that is not a model")


@pytest.fixture(scope="module")
def hybrid_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny Jamba (Mamba/attention hybrid): loads as a sequence classifier, but its layers are of
    two kinds, so no stack of identical blocks exists to decay over."""
    import transformers

    folder = tmp_path_factory.mktemp("jamba")
    config = transformers.JambaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37,
        num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=4, mamba_d_conv=2, mamba_expand=1, pad_token_id=0,
    )  # fmt: skip
    transformers.JambaModel(config).save_pretrained(folder)
    for path in tiny_model_dir.iterdir():  # the tokenizer files
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, folder)
    return folder


def test_encoder_the_param_group_builder_cannot_map(capsys, tmp_path, write_study, hybrid_model_dir):
    _run(capsys, write_study(model=hybrid_model_dir), tmp_path, "model.name", str(hybrid_model_dir), "cannot map", case="unmappable encoder (Jamba)")


# --------------------------------------------------------------------------- storage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_unreachable_storage_names_host_and_port(capsys, write_study):
    port = _closed_port()
    url = f"postgresql+psycopg://llrd@127.0.0.1:{port}/llrd"
    _one_error(capsys, ["run", str(write_study()), "--storage", url], "--storage", f"127.0.0.1:{port}", "is PostgreSQL running", case="unreachable storage")


def test_unreachable_storage_for_a_worker(capsys):
    port = _closed_port()
    url = f"postgresql+psycopg://llrd@127.0.0.1:{port}/llrd"
    _one_error(capsys, ["worker", "--storage", url, "--study", "x"], f"127.0.0.1:{port}", case="unreachable storage (worker)")


def test_missing_sqlite_folder(capsys, tmp_path, write_study):
    _one_error(capsys, ["run", str(write_study()), "--storage", f"sqlite:///{tmp_path}/nope/x.db"], "--storage", "nope", case="SQLite folder missing")


@pytest.mark.postgres
def test_wrong_password(capsys, write_study, scram_pg):  # noqa: F811
    line = _one_error(capsys, ["run", str(write_study()), "--storage", scram_pg["bad_url"]], "password authentication failed", "llrd_secret", case="wrong password")
    assert "wrong-password" not in line


@pytest.mark.postgres
def test_nonexistent_database(capsys, write_study, pg_url):  # noqa: F811 (pg_url: the server must be up)
    _one_error(capsys, ["run", str(write_study()), "--storage", url_for("llrd_no_such_db_x")], "llrd_no_such_db_x", "createdb", case="database does not exist")


@pytest.mark.postgres
def test_nonexistent_role(capsys, write_study, pg_url):  # noqa: F811
    _one_error(capsys, ["run", str(write_study()), "--storage", url_for("postgres", user="llrd_no_such_role")], "llrd_no_such_role", case="role does not exist")


def test_study_name_exists_with_a_different_spec(capsys, tmp_path, write_study):
    db = tmp_path / "conflict.db"
    assert main(["create", str(write_study("a.toml", name="same")), "--storage", f"sqlite:///{db}"]) == 0
    capsys.readouterr()
    changed = write_study("b.toml", name="same", train={"epochs": 2})
    _one_error(capsys, ["run", str(changed), "--storage", f"sqlite:///{db}"], "study.name", "'same'", "train.epochs", case="study exists with a different spec")
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 0  # nothing was run or written into the existing study
    storage.engine.dispose()
