"""Bad input, as a corpus: each case is one bad key, file, URL or flag, and every one must exit
non-zero with exactly one ``Error: ...`` line on stderr that names the key, file or URL, print no
traceback, and write nothing: no new file in the test's folder, no new study or trial in a storage
there. A case about the study file is refused by ``validate`` as well as by ``create``/``run``:
validate checks everything create needs, before anything is written.

Run with LLRD_SHOW_ERRORS=1 to print every message (the table in docs/distributed.md comes from it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _fleet import cli
from _pg import pg_db, pg_url, scram_pg, url_for  # noqa: F401 (fixtures)

from llrd_search.cli import main


def _one_error(capsys, argv: list[str], *must: str, case: str = "", code: int | None = None) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if os.environ.get("LLRD_SHOW_ERRORS"):
        sys.__stdout__.write(f"\n| {case} | rc {rc} | {' / '.join(lines)} |\n")
    assert rc != 0
    assert code is None or rc == code, f"exit code {rc}, expected {code}: {err}"
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for text in must:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def _csv(folder: Path, split: str, header: list[str], rows: list[list]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return folder


ROWS = [["good great film", 1], ["bad awful film", 0]] * 8


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


# --------------------------------------------------------------------------- odd models


def _tokenizer_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, dst)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Tiny models that load but are not what a study can use: a Mamba/attention hybrid (Jamba), a
    decoder (GPT-2), an encoder-decoder (T5), each with the tiny BERT's tokenizer; and the tiny BERT
    without its tokenizer files."""
    import transformers

    configs = {
        "jamba": transformers.JambaConfig(
            vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=37,
            num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            mamba_d_state=4, mamba_d_conv=2, mamba_expand=1, pad_token_id=0,
        ),
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=60, n_positions=64, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "t5": transformers.T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=16, vocab_size=60, pad_token_id=0),
    }  # fmt: skip
    folders = {}
    for name, config in configs.items():
        folders[name] = tmp_path_factory.mktemp(name)
        transformers.AutoModel.from_config(config).save_pretrained(folders[name])
        _tokenizer_files(tiny_model_dir, folders[name])
    folders["no-tokenizer"] = tmp_path_factory.mktemp("no-tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folders["no-tokenizer"])
    return folders


# --------------------------------------------------------------------------- the corpus


@dataclass
class Kit:
    """What a case builds its bad input from, all under ``tmp`` (the folder compared before/after)."""

    tmp: Path
    write_study: Callable[..., Path]
    model: Path
    data: Path
    odd: dict[str, Path]

    @property
    def db(self) -> str:
        return f"sqlite:///{self.tmp / 'bad.db'}"

    def study(self, filename: str = "study.toml", **kw) -> Path:
        return self.write_study(filename, **kw)

    def edited(self, old: str, new: str, **kw) -> Path:
        return _edit(self.write_study(**kw), old, new)

    def folder(self, name: str, **splits: list[list]) -> Path:
        for split, rows in splits.items():
            _csv(self.tmp / name, split, ["text", "label"], rows)
        return self.tmp / name

    def finished(self, trials: int = 1) -> str:
        """The URL of a storage holding study 'toy' with ``trials`` finished trials (no training)."""
        from optuna.distributions import FloatDistribution
        from optuna.trial import create_trial

        from llrd_search.spec import load_spec
        from llrd_search.study.storage import create_study, opened_storage

        url = f"sqlite:///{self.tmp / 'done.db'}"
        with opened_storage(url) as storage:
            study, _ = create_study(load_spec(self.write_study("done.toml")), storage)
            dists = {"base_lr": FloatDistribution(1e-4, 1e-3, log=True), "head_lr": FloatDistribution(1e-3, 1e-2, log=True),
                     "decay": FloatDistribution(0.5, 1.0)}  # fmt: skip
            for _ in range(trials):
                study.add_trial(create_trial(params={"base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9}, distributions=dists, value=0.8))
        return url


@dataclass
class Bad:
    """One bad input: the commands that must each refuse it, and what their one line must name."""

    commands: list[list[str]]
    must: tuple[str, ...]


def checked(study: Path, *must: str, storage: str | None = None, command: str = "create") -> Bad:
    """A bad study file: ``validate`` refuses it as ``create`` (or ``run``) does."""
    flag = ["--storage", storage] if storage else []
    return Bad([["validate", str(study)], [command, str(study), *flag]], must)


def bad(argv: list[str], *must: str) -> Bad:
    return Bad([argv], must)


CASES: dict[str, Callable[[Kit], Bad]] = {}


def case(name: str):
    def register(make: Callable[[Kit], Bad]) -> Callable[[Kit], Bad]:
        assert name not in CASES
        CASES[name] = make
        return make

    return register


# --- the study file



@case("TOML syntax error")
def _(k: Kit) -> Bad:
    (k.tmp / "broken.toml").write_text("[study\nname = 'x'\n")
    return checked(k.tmp / "broken.toml", "TOML syntax error", str(k.tmp / "broken.toml"))


case("study file missing")(lambda k: checked(k.tmp / "nope.toml", str(k.tmp / "nope.toml"), "file not found"))
case("unknown key")(lambda k: checked(k.study(train={"epoch": 2}), "train.epoch", "did you mean 'epochs'"))
case("missing [model]")(lambda k: checked(k.edited("[model]", "[modelx]"), "model", "required key is missing"))

# (text in the valid study file, replacement, what the one line must name)
EDITS = {
    "low > high": ("base_lr = { low = 1e-4, high = 1e-3", "base_lr = { low = 1e-3, high = 1e-4", ("space.base_lr", "must be <=")),
    "negative LR": ("head_lr = { low = 1e-3,", "head_lr = { low = -1e-3,", ("space.head_lr", "> 0")),
    "zero LR": ("base_lr = { low = 1e-4, high = 1e-3, log = true }", "base_lr = [0.0, 1e-4]", ("space.base_lr", "> 0")),
    "decay > 1": ("decay = { low = 0.5, high = 1.0 }", "decay = { low = 0.5, high = 1.5 }", ("space.decay", "(0, 1]")),
    "decay = 0": ("decay = { low = 0.5, high = 1.0 }", "decay = [0.0, 0.9]", ("space.decay", "(0, 1]")),
    "n_trials <= 0": ("n_trials = 2", "n_trials = 0", ("study.n_trials", "must be > 0")),
    "n_trials a string": ("n_trials = 2", 'n_trials = "2"', ("study.n_trials", "whole number", "'2'")),
    "n_trials a float": ("n_trials = 2", "n_trials = 1e9", ("study.n_trials", "whole number")),
    "n_trials huge": ("n_trials = 2", "n_trials = 1000000000", ("study.n_trials", "1000000000", "at most 100000")),
    "seed = -1": ("seed = 0", "seed = -1", ("study.seed", ">= 0")),
    "study name with a space": ('name = "toy"', 'name = "my study"', ("study.name", "'my study'", "letters, digits")),
    "sampler unknown": ('sampler = "random"', 'sampler = "cmaes"', ("study.sampler", "'tpe'")),
    "grace <= heartbeat": ("grace_period = 30", "grace_period = 2", ("grace_period", "must exceed heartbeat_interval")),
    "grid with ranges": ('sampler = "random"', 'sampler = "grid"', ("study.sampler", "value lists")),
    "precision fp16": ('precision = "fp32"', 'precision = "fp16"', ("train.precision", "'bf16'")),
    "max_length = 0": ("max_length = 32", "max_length = 0", ("model.max_length", "> 0")),
    "validation_fraction > 1": ("[data]", "[data]\nvalidation_fraction = 1.5", ("data.validation_fraction", "< 1")),
    "grad_accum not dividing": ("batch_size = 16", "batch_size = 16\ngrad_accum = 3", ("train.grad_accum", "does not divide")),
    "objective malformed": ("batch_size = 16", 'batch_size = 16\nobjective = "not a path"', ("train.objective", "package.module:function")),
    "objective not importable": ("batch_size = 16", 'batch_size = 16\nobjective = "no_such_module_x:run"', ("train.objective", "no_such_module_x")),
    "pack with grad_accum": ("batch_size = 16", "batch_size = 16\ngrad_accum = 2\npack = 2", ("pack", "grad_accum")),
    "enqueue outside the space": ("[study]", "[study]\nenqueue = [{ base_lr = 1.0, head_lr = 1e-3, decay = 0.9 }]", ("study.enqueue.0", "outside")),
    "max_length above positions": ("max_length = 32", "max_length = 100", ("model.max_length", "100", "64 positions", "set model.max_length = 64")),
}  # fmt: skip
for _name, (_old, _new, _must) in EDITS.items():
    case(_name)(lambda k, old=_old, new=_new, must=_must: checked(k.edited(old, new), *must))


@case("TOML syntax error (run)")
def _(k: Kit) -> Bad:
    (k.tmp / "broken.toml").write_text("[study\nname = 'x'\n")
    return bad(["run", str(k.tmp / "broken.toml"), "--storage", k.db], "TOML syntax error")


@case("study file not UTF-8")
def _(k: Kit) -> Bad:
    study = k.study()
    study.write_bytes(study.read_text().replace('name = "toy"', 'name = "caf\xe9"').encode("latin-1"))
    return checked(study, str(study), "not UTF-8", "0xe9")


# --- data

case("missing data folder")(lambda k: checked(k.study(data=k.tmp / "no-such-data"), "data.path", str(k.tmp / "no-such-data"), "does not exist"))
case("missing split file")(lambda k: checked(k.study(data=k.folder("only-val", validation=ROWS)), "data.path", "'train'", "only-val"))
case("data.path is a file")(lambda k: checked(k.study(data=_csv(k.tmp / "f", "train", ["text", "label"], ROWS) / "train.csv"), "data.path", "not a folder"))
case("empty split")(lambda k: checked(k.study(data=k.folder("empty", train=[], validation=ROWS)), "train", "empty"))
case("single class")(lambda k: checked(k.study(data=k.folder("one", train=ROWS[::2], validation=ROWS[::2])), "data.label", "single label"))
case("binary f1 on 3 classes")(lambda k: checked(
    k.study(data=k.folder("three", train=[*ROWS, ["so so film", 2]] * 2, validation=[*ROWS, ["so so film", 2]]), train={"metric": "f1"}),
    "train.metric", "3 classes"))  # fmt: skip


@case("missing text column")
def _(k: Kit) -> Bad:
    for split in ("train", "validation"):
        _csv(k.tmp / "sentence-col", split, ["sentence", "label"], ROWS)
    return checked(k.study(data=k.tmp / "sentence-col"), "data.text", "'text'", "sentence")


@case("missing label column")
def _(k: Kit) -> Bad:
    for split in ("train", "validation"):
        _csv(k.tmp / "y-col", split, ["text", "y"], ROWS)
    return checked(k.study(data=k.tmp / "y-col"), "data.label", "'label'")


case("missing text_pair column")(lambda k: checked(
    k.edited("[data]", '[data]\ntext_pair = "hypothesis"', data=k.folder("nopair", train=ROWS, validation=ROWS)), "data.text_pair", "'hypothesis'"))
case("validation label unseen in train")(lambda k: checked(
    k.study(data=k.folder("unseen", train=ROWS, validation=[*ROWS, ["neutral film", 2]])), "data.label", "validation", "2"))


@case("empty label cells")
def _(k: Kit) -> Bad:
    gappy = [*ROWS[:2], ["fine film", ""], *ROWS[2:], ["dull film", ""]]
    folder = k.folder("gaps", train=gappy, validation=gappy)
    return checked(k.study(data=folder), "data.label", "train split", "row 3", "'label'", str(folder / "train.csv"), "2 rows")


@case("label with a trailing space")
def _(k: Kit) -> Bad:
    words = [[text, "pos" if y else "neg"] for text, y in ROWS]
    folder = k.folder("spaces", train=words, validation=[*words, ["awful film", "neg "]])
    return checked(k.study(data=folder), "data.label", "validation", "'neg '", "'neg'")


@case("latin-1 CSV")
def _(k: Kit) -> Bad:
    folder = k.folder("latin1", validation=ROWS)
    (folder / "train.csv").write_bytes("text,label\nun film na\u00efve,1\nun caf\u00e9 froid,0\n".encode("latin-1") * 4)
    return checked(k.study(data=folder), str(folder / "train.csv"), "not UTF-8", "iconv")


@case("symlink loop")
def _(k: Kit) -> Bad:
    folder = k.folder("loop", validation=ROWS)
    (folder / "train.csv").symlink_to(folder / "b.csv")
    (folder / "b.csv").symlink_to(folder / "train.csv")
    return checked(k.study(data=folder), "data.path", str(folder / "train.csv"), "symbolic links")


@case("train.csv and train.jsonl")
def _(k: Kit) -> Bad:
    folder = k.folder("two-trains", train=ROWS, validation=ROWS)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS))
    return checked(k.study(data=folder), "data.path", "train.csv", "train.jsonl", "keep one")


@case("TSV saved as .csv")
def _(k: Kit) -> Bad:
    folder = k.folder("tsv", validation=ROWS)
    (folder / "train.csv").write_text("text\tlabel\n" + "".join(f"{t}, really\t{y}\n" for t, y in ROWS))
    return checked(k.study(data=folder), "data.path", str(folder / "train.csv"), "tab-separated")


@case("CSV with an unclosed quote")
def _(k: Kit) -> Bad:
    folder = k.folder("quote", validation=ROWS)
    (folder / "train.csv").write_text('text,label\n"good film,1\nbad film,0\n')
    return checked(k.study(data=folder), "data.path", str(folder / "train.csv"), "EOF inside string")


@case("corrupt parquet")
def _(k: Kit) -> Bad:
    folder = k.folder("parquet", validation=ROWS)
    (folder / "train.parquet").write_bytes(os.urandom(300))
    return checked(k.study(data=folder), "data.path", str(folder / "train.parquet"), "Parquet magic bytes")


@case("stratified subsample empty")
def _(k: Kit) -> Bad:
    # one validation row for each of 100 classes: a stratified 10 keeps 0.1 of a row of each
    folder = k.folder("hundred", train=[[f"film number {i}", f"c{i % 100}"] for i in range(300)],
                      validation=[[f"film number {i}", f"c{i}"] for i in range(100)])
    return checked(k.edited("[data]", "[data]\nvalidation_limit = 10", data=folder), "data.validation_limit", "10", "100 classes", "at least 100")


@case("one row per class")
def _(k: Kit) -> Bad:
    folder = k.folder("thousand", train=[[f"film number {i}", f"c{i}"] for i in range(1000)], validation=[["film number 1", "c1"]] * 4)
    return checked(k.study(data=folder), "data.label", "1000 classes in 1000 train rows", "label column")


# --- model



@case("model path that is not a model")
def _(k: Kit) -> Bad:
    (k.tmp / "empty-model").mkdir()
    return checked(k.study(model=k.tmp / "empty-model"), "model.name", str(k.tmp / "empty-model"), "not a saved model")


case("unmappable encoder (Jamba)")(lambda k: checked(k.study(model=k.odd["jamba"]), "model.name", str(k.odd["jamba"]), "cannot map"))
case("decoder (GPT-2)")(lambda k: checked(k.study(model=k.odd["gpt2"]), "model.name", "gpt2", "decoder-only", "BERT"))
case("encoder-decoder (T5)")(lambda k: checked(k.study(model=k.odd["t5"]), "model.name", "t5", "encoder-decoder"))
case("no tokenizer files")(lambda k: checked(k.study(model=k.odd["no-tokenizer"]), "model.name", str(k.odd["no-tokenizer"]), "no tokenizer files"))

# --- storage: {port} a port nothing listens on

case("unreachable storage")(lambda k: bad(["run", str(k.study()), "--storage", f"postgresql+psycopg://llrd@127.0.0.1:{PORT}/llrd"],
                                          "--storage", f"127.0.0.1:{PORT}", "is PostgreSQL running"))  # fmt: skip
case("unreachable storage (worker)")(lambda k: bad(["worker", "--storage", f"postgresql+psycopg://llrd@127.0.0.1:{PORT}/llrd", "--study", "x"],
                                                   f"127.0.0.1:{PORT}"))  # fmt: skip
case("unreachable study.storage, no flag")(lambda k: bad(["create", str(k.study(study={"storage": f"postgresql+psycopg://llrd@127.0.0.1:{PORT}/llrd"}))],
                                                         "study.storage:", f"127.0.0.1:{PORT}"))  # fmt: skip
case("SQLite folder missing")(lambda k: bad(["run", str(k.study()), "--storage", f"sqlite:///{k.tmp}/nope/x.db"], "--storage", "nope"))
case("study.storage folder missing")(lambda k: checked(k.study(study={"storage": f"sqlite:///{k.tmp}/nope/x.db"}), "study.storage:", "nope"))
case("mysql without a driver")(lambda k: bad(["create", str(k.study()), "--storage", "mysql://u@127.0.0.1/db"], "--storage", "pymysql"))
case("study.storage mysql without a driver")(lambda k: checked(k.study(study={"storage": "mysql://u@127.0.0.1/db"}), "study.storage:", "pymysql"))
case("in-memory SQLite")(lambda k: bad(["create", str(k.study()), "--storage", "sqlite://"], "--storage", "in-memory"))
case("not a URL")(lambda k: bad(["create", str(k.study()), "--storage", "nonsense"], "--storage", "not a database URL"))
for _cmd in ("status", "worker", "export", "report", "confirm"):
    case(f"{_cmd} on a SQLite file that does not exist")(
        lambda k, cmd=_cmd: bad([cmd, "--storage", f"sqlite:///{k.tmp / 'missing.db'}", "--study", "toy", *(["--out", str(k.tmp / "r")] if cmd == "report" else [])],
                                "--storage", str(k.tmp / "missing.db"), "does not exist"))  # fmt: skip
case("status of an unknown study")(lambda k: bad(["status", "--storage", k.finished(), "--study", "nope"], "--study", "'nope'", "studies there: toy"))
case("export with no complete trial")(lambda k: bad(["export", "--storage", k.finished(trials=0), "--study", "toy"], "--study", "no complete trial"))


@case("study exists with a different spec")
def _(k: Kit) -> Bad:
    url = k.finished()
    return bad(["run", str(k.study("b.toml", train={"epochs": 2})), "--storage", url], "study.name", "'toy'", "train.epochs")


# --- flags

case("export --format xml")(lambda k: bad(["export", "--storage", k.finished(), "--study", "toy", "--format", "xml"],
                                          "--format", "'xml'", "llrd-search export --help"))  # fmt: skip
case("status --format csv")(lambda k: bad(["status", "--storage", k.finished(), "--study", "toy", "--format", "csv"], "--format", "'csv'"))
case("unknown command")(lambda k: bad(["rnu", str(k.study())], "'rnu'", "llrd-search --help"))
case("run without a study file")(lambda k: bad(["run"], "STUDY.toml", "llrd-search run --help"))
case("unknown flag")(lambda k: bad(["run", str(k.study()), "--bogus"], "--bogus"))
case("--workers 0")(lambda k: bad(["run", str(k.study()), "--workers", "0"], "--workers", ">= 1"))
case("--n-trials huge")(lambda k: bad(["create", str(k.study()), "--n-trials", "1000000000"], "--n-trials", "at most 100000"))
case("--threads not a number")(lambda k: bad(["run", str(k.study()), "--threads", "two"], "--threads", "'two'"))
case("confirm --seeds 2 --max-seeds 2")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "2", "--max-seeds", "2"],
                                                      "--max-seeds", "--seeds auto"))  # fmt: skip
case("confirm --seeds 1")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "1"], "--seeds", "3 or more"))
case("confirm --seeds abc")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "abc"], "--seeds", "'abc'"))
case("confirm --max-seeds 2 with auto")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "auto", "--max-seeds", "2"],
                                                      "--max-seeds", "3 to 30"))  # fmt: skip
case("confirm --max-seeds 31 with auto")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "auto", "--max-seeds", "31"],
                                                       "--max-seeds", "3 to 30"))  # fmt: skip
case("confirm --decay-sweep 1.5")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "2", "--decay-sweep", "1.0,1.5"],
                                                "--decay-sweep", "1.5"))  # fmt: skip
case("confirm --sweep-seeds alone")(lambda k: bad(["confirm", "--storage", k.finished(), "--study", "toy", "--seeds", "2", "--sweep-seeds", "2"],
                                                  "--sweep-seeds", "--decay-sweep"))  # fmt: skip

# --- results: export --out, train

case("export --out onto a folder")(lambda k: bad(["export", "--storage", k.finished(), "--study", "toy", "--out", str(k.tmp)], "--out", "is a folder"))
case("train config missing")(lambda k: bad(["train", str(k.tmp / "best.json"), "--out", str(k.tmp / "model")], str(k.tmp / "best.json")))

EXPORT = {
    "llrd_search_config": 1, "base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9, "seed": 0, "id2label": {"0": "0", "1": "1"},
    "groups": [{"name": "embeddings", "lr": 1.5e-4, "n_params": 10}, {"name": "head", "lr": 2e-3, "n_params": 4}],
    "model": {"name": "some-model", "max_length": 32}, "data": {"path": "some-data"}, "train": {"epochs": 1},
}  # fmt: skip
TAMPERED = {
    "data is a string": ("data", "oops", "data: must be a mapping"),
    "train is a number": ("train", 5, "train: must be a mapping"),
    "seed is a string": ("seed", "abc", "seed: must be a whole number"),
    "base_lr is a string": ("base_lr", "2e-5", "base_lr: must be a number"),
    "group lr is a string": ("groups", [{"name": "head", "lr": "fast", "n_params": 4}], "groups[0].lr"),
    "id2label is a list": ("id2label", ["neg", "pos"], "id2label"),
    "weight_decay is a string": ("train", {"weight_decay": "lots"}, "train.weight_decay"),
}
for _name, (_key, _value, _must) in TAMPERED.items():

    @case(f"tampered export: {_name}")
    def _(k: Kit, key=_key, value=_value, must=_must) -> Bad:
        config = k.tmp / "best.json"
        config.write_text(json.dumps({**EXPORT, key: value}))
        return bad(["train", str(config), "--out", str(k.tmp / "model")], str(config), must)


# --- init

case("init --out exists")(lambda k: bad(["init", "--model", str(k.model), "--data", str(k.data), "--out", str(k.study())], "--out", "--force"))
case("init --data not a folder")(lambda k: bad(["init", "--model", str(k.model), "--data", str(k.tmp / "nope"), "--out", str(k.tmp / "s.toml")],
                                               "--data", "not a folder"))  # fmt: skip
case("init with a decoder")(lambda k: bad(["init", "--model", str(k.odd["gpt2"]), "--data", str(k.data), "--out", str(k.tmp / "s.toml")],
                                          "--model", "decoder-only"))  # fmt: skip
case("init with no tokenizer files")(lambda k: bad(["init", "--model", str(k.odd["no-tokenizer"]), "--data", str(k.data), "--out", str(k.tmp / "s.toml")],
                                                   "no tokenizer files"))  # fmt: skip


@case("init with a symlink loop")
def _(k: Kit) -> Bad:
    folder = k.folder("init-loop", validation=ROWS)
    (folder / "train.csv").symlink_to(folder / "b.csv")
    (folder / "b.csv").symlink_to(folder / "train.csv")
    return bad(["init", "--model", str(k.model), "--data", str(folder), "--out", str(k.tmp / "s.toml")], str(folder / "train.csv"), "symbolic links")


PORT = _closed_port()

# The exit code of each case (llrd_search/exceptions.py): 2, the input (study file, data, model, an
# argument), unless listed here: 3 the storage, 1 what a command cannot do (a bad --out, a flag value
# the library refuses).
STORAGE = [n for n in CASES if "storage" in n or "SQLite" in n or "mysql" in n or n == "not a URL"]
EXIT_CODES = {
    **dict.fromkeys(STORAGE, 3),
    "status of an unknown study": 3, "export with no complete trial": 3, "study exists with a different spec": 3,
    "export --out onto a folder": 1, "init --out exists": 1,
    "confirm --max-seeds 2 with auto": 1, "confirm --max-seeds 31 with auto": 1, "confirm --decay-sweep 1.5": 1, "confirm --sweep-seeds alone": 1,
}  # fmt: skip


def _written(tmp: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The folder's listing, and (studies, trials) of every SQLite database in it (read-only)."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    counts = {}
    for db in tmp.rglob("*.db"):
        # immutable: a read-only connection to a WAL database would itself leave -wal and -shm files behind
        con = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
        try:
            counts[db.name] = tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("studies", "trials"))
        finally:
            con.close()
    return files, counts


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, capfd, tmp_path, write_study, tiny_model_dir, toy_data_dir, odd_models):
    bad_input = CASES[name](Kit(tmp_path, write_study, tiny_model_dir, toy_data_dir, odd_models))
    for argv in bad_input.commands:
        before = _written(tmp_path)
        capfd.readouterr()  # capfd, not capsys: a library's log handler holding the real stderr shows up too
        _one_error(capfd, argv, *bad_input.must, case=f"{name} ({argv[0]})", code=EXIT_CODES.get(name, 2))
        assert _written(tmp_path) == before, f"{argv[0]} wrote something"


def test_the_corpus_is_large():
    assert len(CASES) >= 60


def test_validate_spec_only_reads_the_study_file_alone(capsys, write_study, tmp_path):
    study = write_study(data=tmp_path / "no-such-data")
    assert main(["validate", study.as_posix(), "--spec-only"]) == 0, capsys.readouterr().err
    assert "ok (study 'toy'" in capsys.readouterr().out
    assert main(["validate", study.as_posix()]) == 2  # without it, the data is checked as create checks it
    assert "data.path" in capsys.readouterr().err


def test_study_file_with_a_bom_loads(capsys, write_study):
    study = write_study()
    study.write_bytes(b"\xef\xbb\xbf" + study.read_bytes())  # what Notepad writes
    assert main(["validate", str(study)]) == 0, capsys.readouterr().err
    assert "ok (study 'toy'" in capsys.readouterr().out


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


# --------------------------------------------------------------------------- needs a PostgreSQL server or a read-only folder


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


@pytest.fixture
def finished(tmp_path, write_study) -> tuple[str, str]:
    """(url, name) of a study with one finished trial (made directly: no training)."""
    return Kit(tmp_path, write_study, Path(), Path(), {}).finished(), "toy"


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


@pytest.mark.parametrize(
    ("command", "name"),
    [pytest.param("export", "best.json", id="export --out read-only"), pytest.param("report", "", id="report --out read-only")],
)
def test_out_into_a_read_only_folder(capsys, finished, readonly_dir, request, command, name):
    url, study = finished
    out = readonly_dir / name  # report: the folder itself
    _one_error(capsys, [command, "--storage", url, "--study", study, "--out", str(out)], "--out", str(out), "cannot write", case=request.node.callspec.id)
