"""What the CLI says after Ctrl-C, and one exit code for "no complete trial" (issue 12.8)."""

from __future__ import annotations

import pytest

from llrd_search import search
from llrd_search.cli import main
from llrd_search.exceptions import NoCompleteTrialError
from llrd_search.results import report
from llrd_search.spec import load_spec
from llrd_search.study.storage import create_study, open_storage


def _interrupt(*_a, **_kw):
    raise KeyboardInterrupt


def _empty_study(write_study, tmp_path):
    path = write_study(n_trials=2)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    create_study(load_spec(path), open_storage(url))
    return url


def test_ctrl_c_during_create_does_not_claim_trials_were_marked(write_study, monkeypatch, capsys):
    monkeypatch.setattr(search, "preflight", _interrupt)
    assert main(["create", str(write_study())]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: no trial had started; run the same command again to finish creating the study"


def test_ctrl_c_during_report_says_the_report_may_be_incomplete(write_study, tmp_path, monkeypatch, capsys):
    url = _empty_study(write_study, tmp_path)
    monkeypatch.setattr(report, "write_report", _interrupt)
    assert main(["report", "--storage", url, "--study", "toy", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: the report may be incomplete; run the same command again to write it"


def test_ctrl_c_during_run_still_says_trials_were_marked(write_study, monkeypatch, capsys):
    from llrd_search.study import worker

    monkeypatch.setattr(worker, "run_worker", _interrupt)
    assert main(["run", str(write_study())]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "interrupted: running trials were marked FAIL and re-queued with their parameters; run the same command again to resume"
    )


@pytest.mark.parametrize(("marked", "said"), [
    ((2, 2), "its 2 running trials were marked FAIL and re-queued with their parameters"),
    ((1, 1), "its running trial was marked FAIL and re-queued with its parameters"),
    ((2, 1), "its 2 running trials were marked FAIL (1 re-queued with their parameters; 1 had used up study.max_retries)"),
    ((0, 0), "no trial was running"),
])
def test_ctrl_c_of_a_worker_counts_the_trials_it_marked(marked, said, write_study, tmp_path, monkeypatch, capsys):
    from llrd_search.study import worker

    def interrupted(*_a, **_kw):
        err = KeyboardInterrupt()
        err.trials_marked = marked  # what claims.fail_interrupted records on the interrupt it was given
        raise err

    url = _empty_study(write_study, tmp_path)
    monkeypatch.setattr(worker, "run_worker", interrupted)
    assert main(["worker", "--storage", url, "--study", "toy"]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: {said}; run the same command again to resume"


@pytest.mark.parametrize("command", [["export"], ["confirm", "--top", "1", "--seeds", "2"]])
def test_no_complete_trial_is_one_error_with_one_exit_code(command, write_study, tmp_path, capsys):
    url = _empty_study(write_study, tmp_path)
    code = main([*command[:1], "--storage", url, "--study", "toy", *command[1:]])
    assert code == NoCompleteTrialError.exit_code == 3  # export said 1, confirm 3
    assert capsys.readouterr().err.strip() == "Error: --study: 'toy' has no complete trial yet; run the search first"
