"""The study file is every command's handle: init -> run -> confirm -> report -> export -> train,
each given only the study file's path, as a new user types them (issue 24)."""

from __future__ import annotations

import json
import tomllib

import pytest
from conftest import write_toy_dataset

from llrd_search.cli import EPILOGS, build_parser, main
from llrd_search.cli.handle import HANDLE_COMMANDS


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_init_run_confirm_report_export_train_by_the_study_file_alone(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A few dozen rows and no test file: init carves a test split so the verdict is scored on held-out data.
    write_toy_dataset(tmp_path / "data", n_train=60, n_val=20)
    assert main(["init", "--model", str(tiny_model_dir), "--data", "data", "--out", "toy.toml"]) == 0
    text = (tmp_path / "toy.toml").read_text()
    assert "test_fraction = 0.1" in text and "held-out" in text
    # Smaller than written: 4 trials (3 LLRD + 1 control), one epoch.
    (tmp_path / "toy.toml").write_text(text.replace("n_trials = 20", "n_trials = 4").replace("epochs = 3", "epochs = 1")
                                       .replace("evals_per_epoch = 2", "evals_per_epoch = 1").replace('pruner = "hyperband"', 'pruner = "none"'))
    name = tomllib.loads((tmp_path / "toy.toml").read_text())["study"]["name"]
    capsys.readouterr()

    assert main(["run", "toy.toml", "--workers", "1", "--threads", "1"]) == 0
    out = _lines(capsys.readouterr().out)
    assert out[-3:] == ["next: llrd-search confirm toy.toml", "llrd-search report toy.toml", "llrd-search export toy.toml --out best.json"]

    assert main(["status", "toy.toml", "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["study"] == name and status["finished"] == status["budget"] == 4

    assert main(["confirm", "toy.toml", "--top", "2", "--seeds", "2", "--workers", "1", "--threads", "1"]) == 0
    out = _lines(capsys.readouterr().out)
    assert out[-2:] == ["next: llrd-search report toy.toml", "llrd-search export toy.toml --out best.json"]
    assert any(line.startswith("held-out test split") for line in out)  # init's test_fraction at work

    assert main(["report", "toy.toml"]) == 0
    capsys.readouterr()
    report = tmp_path / "toy-report"  # beside the study file
    summary = (report / "summary.md").read_text()
    assert "- trials: 4 (3 LLRD + 1 control) of budget 4" in summary
    assert "- data: `data`" in summary and str(tmp_path) not in summary  # relative to the study file
    assert json.loads((report / "summary.json").read_text())["study"] == name

    assert main(["export", "toy.toml", "--out", "best.json"]) == 0
    capsys.readouterr()
    best = json.loads((tmp_path / "best.json").read_text())

    assert main(["train", "toy.toml", "--train-limit", "30"]) == 0
    assert "saved the model to toy-model" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "toy-model" / "metrics.json").read_text())
    assert metrics["test_accuracy"] is not None  # the carved test split
    # The study file trains the configuration export wrote: the same LRs as best.json trains with.
    assert main(["train", "best.json", "--out", "from-json", "--train-limit", "30"]) == 0
    again = json.loads((tmp_path / "from-json" / "metrics.json").read_text())
    assert again["validation_accuracy"] == metrics["validation_accuracy"], (best["base_lr"], best["decay"])

    # --storage/--study win over the file: a study the file does not name is not found.
    assert main(["status", "toy.toml", "--study", "other"]) == 3
    assert "no study named 'other'" in capsys.readouterr().err


@pytest.mark.parametrize("command", HANDLE_COMMANDS)
def test_a_missing_study_file_is_one_line_naming_it(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: {tmp_path / 'nope.toml'}: file not found")


@pytest.mark.parametrize("command", ["status", "report", "confirm", "export", "worker"])
def test_neither_file_nor_flags_says_what_to_pass(command, capsys):
    assert main([command]) == 1
    assert capsys.readouterr().err.strip() == (
        f"Error: pass the study file, or --storage and --study (e.g. llrd-search {command} sst2.toml)")


def test_report_needs_out_without_a_study_file(tmp_path, capsys):
    assert main(["report", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--study", "x"]) == 1
    assert "--out: required unless a study file is given" in capsys.readouterr().err


def test_every_handle_commands_help_shows_the_study_file_form_first():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in [*HANDLE_COMMANDS, "train"]:
        first = next(line for line in EPILOGS[name].splitlines() if line.strip().startswith("llrd-search"))
        assert ".toml" in first.split()[2], f"'{name} --help': the first example does not pass a study file: {first}"
        assert "STUDY.toml" in sub.choices[name].format_usage()


def test_train_config_takes_no_storage_and_needs_out(tmp_path, capsys):
    best = tmp_path / "best.json"
    best.write_text("{}")
    assert main(["train", str(best)]) == 1
    assert "--out: required unless a study file is given" in capsys.readouterr().err
    assert main(["train", str(best), "--out", str(tmp_path / "m"), "--storage", "sqlite:///x.db"]) == 1
    assert "--storage/--study: only with a study file (.toml)" in capsys.readouterr().err


def test_next_lines_repeat_what_the_user_typed_without_a_password():
    from argparse import Namespace

    from llrd_search.cli.handle import next_lines

    typed = Namespace(study_file="my studies/a.toml", storage="postgresql+psycopg://u:secret@db/llrd", study=None,
                      typed={"storage": "postgresql+psycopg://u:secret@db/llrd", "study": None})
    assert next_lines(typed, "report", "export --out best.json") == [
        "next: llrd-search report 'my studies/a.toml' --storage postgresql+psycopg://u@db/llrd",
        "      llrd-search export 'my studies/a.toml' --storage postgresql+psycopg://u@db/llrd --out best.json",
    ]
    flags = Namespace(study_file=None, storage="sqlite:///s.db", study="s", typed={"storage": "sqlite:///s.db", "study": "s"})
    assert next_lines(flags, "report") == ["next: llrd-search report --storage sqlite:///s.db --study s"]
