"""Bad input: each case exits non-zero with exactly one ``Error: ...`` line on stderr that names the
key, file or URL, prints no traceback, and creates no study.

Run with LLRD_SHOW_ERRORS=1 to print every message (the table in docs/distributed.md comes from it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from _fleet import cli
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


# (text in the valid study file, replacement, what the one line must name)
BAD_VALUES = [
    pytest.param("base_lr = { low = 1e-4, high = 1e-3", "base_lr = { low = 1e-3, high = 1e-4", ("space.base_lr", "must be <="), id="low > high"),
    pytest.param("head_lr = { low = 1e-3,", "head_lr = { low = -1e-3,", ("space.head_lr", "> 0"), id="negative LR"),
    pytest.param("base_lr = { low = 1e-4, high = 1e-3, log = true }", "base_lr = [0.0, 1e-4]", ("space.base_lr", "> 0"), id="zero LR"),
    pytest.param("decay = { low = 0.5, high = 1.0 }", "decay = { low = 0.5, high = 1.5 }", ("space.decay", "(0, 1]"), id="decay > 1"),
    pytest.param("decay = { low = 0.5, high = 1.0 }", "decay = [0.0, 0.9]", ("space.decay", "(0, 1]"), id="decay = 0"),
    pytest.param("n_trials = 2", "n_trials = 0", ("study.n_trials", "must be > 0"), id="n_trials <= 0"),
]


@pytest.mark.parametrize(("old", "new", "must"), BAD_VALUES)
def test_bad_value_in_the_study_file(capsys, tmp_path, write_study, request, old, new, must):
    _run(capsys, _edit(write_study(), old, new), tmp_path, *must, case=request.node.callspec.id)


def test_study_file_that_is_not_utf8(capsys, tmp_path, write_study):
    study = write_study()
    study.write_bytes(study.read_text().replace('name = "toy"', 'name = "caf\xe9"').encode("latin-1"))
    _run(capsys, study, tmp_path, str(study), "not UTF-8", "0xe9", case="study file not UTF-8")


def test_study_file_with_a_bom_loads(capsys, write_study):
    study = write_study()
    study.write_bytes(b"\xef\xbb\xbf" + study.read_bytes())  # what Notepad writes
    assert main(["validate", str(study)]) == 0, capsys.readouterr().err
    assert "ok (study 'toy'" in capsys.readouterr().out


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


def test_empty_label_cells(capsys, tmp_path, write_study):
    folder = tmp_path / "gaps"
    gappy = [*ROWS[:2], ["fine film", ""], *ROWS[2:], ["dull film", ""]]
    for split in ("train", "validation"):
        _csv(folder, split, ["text", "label"], gappy)
    _run(capsys, write_study(data=folder), tmp_path, "data.label", "train split", "row 3", "'label'", str(folder / "train.csv"), "2 rows",
         case="empty label cells")  # fmt: skip


def test_label_values_are_shown_with_repr(capsys, tmp_path, write_study):
    folder = tmp_path / "spaces"
    words = [[text, "pos" if y else "neg"] for text, y in ROWS]
    _csv(folder, "train", ["text", "label"], words)
    _csv(folder, "validation", ["text", "label"], [*words, ["awful film", "neg "]])
    line = _run(capsys, write_study(data=folder), tmp_path, "data.label", "validation", "'neg '", case="label with a trailing space")
    assert "'neg'" in line  # the labels train has, to compare with


def test_latin1_csv_names_the_file_and_the_cause(capsys, tmp_path, write_study):
    folder = tmp_path / "latin1"
    _csv(folder, "validation", ["text", "label"], ROWS)
    (folder / "train.csv").write_bytes("text,label\nun film na\u00efve,1\nun caf\u00e9 froid,0\n".encode("latin-1") * 4)
    _run(capsys, write_study(data=folder), tmp_path, str(folder / "train.csv"), "not UTF-8", "iconv", case="latin-1 CSV")


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


def test_max_length_above_the_models_positions(capsys, tmp_path, write_study):
    study = _edit(write_study(), "max_length = 32", "max_length = 100")  # the tiny BERT has 64 positions
    _run(capsys, study, tmp_path, "model.max_length", "100", "64 positions", "set model.max_length = 64", case="max_length above positions")


def test_position_limit_of_model_families():
    from transformers import BertConfig, DebertaV2Config, RobertaConfig

    from llrd_search.engine.train import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # ids start after padding
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # relative positions only


def test_trust_remote_code_warns_at_create(tmp_path, write_study):
    study = _edit(write_study(), "max_length = 32", "max_length = 32\ntrust_remote_code = true")
    done = cli(["create", str(study), "--storage", f"sqlite:///{tmp_path / 'trc.db'}"])
    assert done.returncode == 0, done.stderr
    assert "trust_remote_code = true" in done.stderr and "runs Python code from the repository" in done.stderr, done.stderr


# --------------------------------------------------------------------------- storage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


# (storage URL, command, what the one line must name); {port}: a port nothing listens on, {tmp}: tmp_path
BAD_STORAGE = [
    pytest.param("postgresql+psycopg://llrd@127.0.0.1:{port}/llrd", "run", ("--storage", "127.0.0.1:{port}", "is PostgreSQL running"),
                 id="unreachable storage"),
    pytest.param("postgresql+psycopg://llrd@127.0.0.1:{port}/llrd", "worker", ("127.0.0.1:{port}",), id="unreachable storage (worker)"),
    pytest.param("sqlite:///{tmp}/nope/x.db", "run", ("--storage", "nope"), id="SQLite folder missing"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "command", "must"), BAD_STORAGE)
def test_storage_that_cannot_be_opened(capsys, tmp_path, write_study, request, url, command, must):
    fill = {"port": _closed_port(), "tmp": tmp_path}
    url = url.format(**fill)
    argv = ["run", str(write_study()), "--storage", url] if command == "run" else ["worker", "--storage", url, "--study", "x"]
    _one_error(capsys, argv, *(m.format(**fill) for m in must), case=request.node.callspec.id)


@pytest.mark.postgres
def test_wrong_password(capsys, write_study, scram_pg):  # noqa: F811
    line = _one_error(capsys, ["run", str(write_study()), "--storage", scram_pg["bad_url"]], "password authentication failed", "llrd_secret", case="wrong password")
    assert "wrong-password" not in line


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("where", "must"),
    [
        pytest.param({"db": "llrd_no_such_db_x"}, ("llrd_no_such_db_x", "createdb"), id="database does not exist"),
        pytest.param({"db": "postgres", "user": "llrd_no_such_role"}, ("llrd_no_such_role",), id="role does not exist"),
    ],
)
def test_nonexistent_database_or_role(capsys, write_study, pg_url, request, where, must):  # noqa: F811 (pg_url: the server must be up)
    _one_error(capsys, ["run", str(write_study()), "--storage", url_for(**where)], *must, case=request.node.callspec.id)


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


# --------------------------------------------------------------------------- results: export, report, train


@pytest.fixture
def finished(tmp_path, write_study) -> tuple[str, str]:
    """(url, name) of a study with one finished trial (made directly: no training)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from llrd_search.spec import load_spec
    from llrd_search.study.storage import create_study, open_storage

    url = f"sqlite:///{tmp_path / 'done.db'}"
    storage = open_storage(url)
    study, _ = create_study(load_spec(write_study()), storage)
    dists = {"base_lr": FloatDistribution(1e-4, 1e-3, log=True), "head_lr": FloatDistribution(1e-3, 1e-2, log=True), "decay": FloatDistribution(0.5, 1.0)}
    study.add_trial(create_trial(params={"base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9}, distributions=dists, value=0.8))
    storage.engine.dispose()
    return url, "toy"


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A folder that refuses new files, even to root (who ignores chmod): sysfs then."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no folder here refuses writes")


def test_export_out_onto_a_folder(capsys, tmp_path, finished):
    url, name = finished
    _one_error(capsys, ["export", "--storage", url, "--study", name, "--out", str(tmp_path)], "--out", str(tmp_path), "is a folder", case="export --out onto a folder")


@pytest.mark.parametrize(
    ("command", "name"),
    [pytest.param("export", "best.json", id="export --out read-only"), pytest.param("report", "", id="report --out read-only")],
)
def test_out_into_a_read_only_folder(capsys, finished, readonly_dir, request, command, name):
    url, study = finished
    out = readonly_dir / name  # report: the folder itself
    _one_error(capsys, [command, "--storage", url, "--study", study, "--out", str(out)], "--out", str(out), "cannot write", case=request.node.callspec.id)


EXPORT = {
    "llrd_search_config": 1, "base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9, "seed": 0, "id2label": {"0": "0", "1": "1"},
    "groups": [{"name": "embeddings", "lr": 1.5e-4, "n_params": 10}, {"name": "head", "lr": 2e-3, "n_params": 4}],
    "model": {"name": "some-model", "max_length": 32}, "data": {"path": "some-data"}, "train": {"epochs": 1},
}  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "must"),
    [
        pytest.param("data", "oops", "data: must be a mapping", id="data is a string"),
        pytest.param("train", 5, "train: must be a mapping", id="train is a number"),
        pytest.param("seed", "abc", "seed: must be a whole number", id="seed is a string"),
        pytest.param("base_lr", "2e-5", "base_lr: must be a number", id="base_lr is a string"),
        pytest.param("groups", [{"name": "head", "lr": "fast", "n_params": 4}], "groups[0].lr", id="group lr is a string"),
        pytest.param("id2label", ["neg", "pos"], "id2label", id="id2label is a list"),
        pytest.param("train", {"weight_decay": "lots"}, "train.weight_decay", id="weight_decay is a string"),
    ],
)
def test_tampered_export_file(capsys, tmp_path, request, key, value, must):
    config = tmp_path / "best.json"
    config.write_text(json.dumps({**EXPORT, key: value}))
    _one_error(capsys, ["train", str(config), "--out", str(tmp_path / "model")], str(config), must, case=f"tampered export: {request.node.callspec.id}")
    assert not (tmp_path / "model").exists()
