"""Storage safety: no password stored, fleets sample different points, an interrupted create is
completed, and storage mistakes (read-only file, in-memory database, a shrinking budget) are one
``Error:`` line instead of a long wait and a traceback."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from _pg import SECRET, scram_pg  # noqa: F401 (fixture)
from conftest import write_toy_dataset

from llrd_search.cli import main
from llrd_search.engine.objective import suggest
from llrd_search.exceptions import StorageError
from llrd_search.spec import load_spec
from llrd_search.study.storage import create_study, load_study, open_storage, spec_of
from llrd_search.vocab import SPEC_ATTR


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("small"), n_train=64, n_val=16)


def _one_error(capsys, argv: list[str], *must: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "Traceback" not in err, err
    for text in must:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- 12.1: no password stored


def test_stored_spec_holds_no_storage_url(write_study, tmp_path, caplog):
    pw = "pw-in-the-study-file"
    path = write_study(name="pw", study={"storage": f"postgresql+psycopg://root:{pw}@db-host/llrd"})
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study, created = create_study(load_spec(path), storage)
    assert created
    assert pw not in json.dumps(study.user_attrs)
    # Idempotent: the same file (password and all) resumes the study.
    again, created = create_study(load_spec(path), storage)
    assert not created and again.user_attrs[SPEC_ATTR] == study.user_attrs[SPEC_ATTR]


def _dump_database(url: str) -> str:
    """Every row of every table, as text."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url.replace("postgresql+psycopg", "postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            names = inspect(conn).get_table_names()
            assert "studies" in names and "study_user_attributes" in names
            return "\n".join(str(row) for name in names for row in conn.execute(text(f'SELECT * FROM "{name}"')))
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_password_in_the_study_file_never_reaches_the_database(capsys, caplog, write_study, scram_pg, small):  # noqa: F811
    name = "pw-in-file"
    study = write_study(name=name, n_trials=1, data=small, study={"storage": scram_pg["url"]})
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(study)]) == 0
    warned = [r.getMessage() for r in caplog.records if "PGPASSWORD" in r.getMessage()]
    assert len(warned) == 1 and SECRET not in warned[0]
    assert main(["confirm", "--storage", scram_pg["url"], "--study", name, "--top", "1", "--seeds", "2"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    dump = _dump_database(scram_pg["url"])
    assert f"{name}.confirm" in dump and "llrd:spec" in dump  # the dump does see the specs
    assert SECRET not in dump


# --------------------------------------------------------------------------- 12.3: fleets


def _ask(study: optuna.Study, spec) -> optuna.Trial:
    trial = study.ask()
    suggest(trial, spec.space)
    return trial


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_workers_started_alike_sample_different_first_points(write_study, tmp_path, sampler):
    path = write_study(name="fleet", n_trials=8, study={"sampler": sampler, "enqueue_paper_points": False})
    spec = load_spec(path)
    storage = open_storage(f"sqlite:///{tmp_path / 'f.db'}")
    create_study(spec, storage)
    # Two workers with the same command line: same spec, no worker index.
    a, b = (load_study(storage, "fleet", spec) for _ in range(2))
    ta, tb = _ask(a, spec), _ask(b, spec)
    assert ta.number != tb.number
    assert ta.params != tb.params


def _points(db: Path, spec, order: list[int]) -> dict[int, dict]:
    """Trials asked by the workers in ``order`` (worker ids), each told 0.5 at once."""
    storage = open_storage(f"sqlite:///{db}")
    create_study(spec, storage)
    workers = [load_study(storage, spec.study.name, spec) for _ in range(max(order) + 1)]
    out = {}
    for w in order:
        trial = _ask(workers[w], spec)
        workers[w].tell(trial, 0.5)
        out[trial.number] = trial.params
    storage.engine.dispose()
    return out


def test_trial_points_depend_on_the_trial_not_on_the_worker(write_study, tmp_path):
    spec = load_spec(write_study(name="repro", n_trials=8, study={"sampler": "tpe", "enqueue_paper_points": False}))
    one = _points(tmp_path / "a.db", spec, [0, 0, 0, 0])
    two = _points(tmp_path / "b.db", spec, [0, 1, 1, 0])
    three = _points(tmp_path / "c.db", spec, [1, 0, 0, 1])
    assert one == two == three  # start-up points: reproducible whichever worker asks
    assert len({json.dumps(p, sort_keys=True) for p in one.values()}) == 4


def test_trial_seeded_sampler_builds_a_fresh_sampler_per_trial():
    from llrd_search.study.sampling import TrialSeededSampler, trial_seed

    seeds = []
    sampler = TrialSeededSampler(lambda s: seeds.append(s) or optuna.samplers.RandomSampler(seed=s), seed=7)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert seeds == [7, trial_seed(7, 0), trial_seed(7, 1)]
    assert trial_seed(7, 0) != trial_seed(8, 0) != trial_seed(7, 1)


# --------------------------------------------------------------------------- 12.5: atomic create

POINT = {"base_lr": 2e-4, "head_lr": 2e-3, "decay": 0.9}


def _with_point(path: Path) -> Path:
    """The study file with ``study.enqueue = [POINT]`` (the tiny space holds no paper point)."""
    point = ", ".join(f"{k} = {v!r}" for k, v in POINT.items())
    path.write_text(path.read_text().replace("[study]\n", f"[study]\nenqueue = [{{ {point} }}]\n", 1))
    return path


def test_half_made_study_is_completed_by_the_next_create(capsys, caplog, write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'half.db'}"
    path = _with_point(write_study(name="half"))
    # What a Ctrl-C right after optuna.create_study leaves: the study row, nothing else.
    optuna.create_study(storage=url, study_name="half", direction="maximize")
    with caplog.at_level(logging.WARNING):
        assert main(["create", str(path), "--storage", url]) == 0
    assert any("half-made" in r.getMessage() for r in caplog.records)
    storage = open_storage(url)
    study = load_study(storage, "half")
    assert spec_of(study).study.name == "half"
    (waiting,) = study.get_trials(deepcopy=False)
    assert waiting.state == optuna.trial.TrialState.WAITING  # the enqueued point, once
    assert main(["create", str(path), "--storage", url]) == 0  # and again: nothing new
    assert len(load_study(storage, "half").get_trials(deepcopy=False)) == 1


def test_half_made_study_with_partial_writes_is_completed(write_study, tmp_path):
    spec = load_spec(_with_point(write_study(name="part")))
    storage = open_storage(f"sqlite:///{tmp_path / 'part.db'}")
    bare = optuna.create_study(storage=storage, study_name="part", direction="maximize")
    bare.set_user_attr("llrd:n_trials", 2)
    bare.enqueue_trial(POINT, user_attrs={"llrd:enqueued": "study.enqueue"})
    study, created = create_study(spec, storage)
    assert created
    assert len(study.get_trials(deepcopy=False)) == 1  # the point was not enqueued twice


@pytest.mark.parametrize("foreign", ["trial", "attr"])
def test_foreign_study_is_still_refused(capsys, write_study, tmp_path, foreign):
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    other = optuna.create_study(storage=url, study_name="taken", direction="maximize")
    if foreign == "trial":
        other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    else:
        other.set_user_attr("owner", "someone else")
    _one_error(capsys, ["create", str(write_study(name="taken")), "--storage", url], "'taken'", "was not made by llrd-search")
    assert SPEC_ATTR not in optuna.load_study(study_name="taken", storage=url).user_attrs


# --------------------------------------------------------------------------- 12.8: storage mistakes


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def read_only(tmp_path):
    """read_only(path): make a file or folder unwritable, even for root (chattr +i); undone after."""
    done: list[Path] = []

    def make(path: Path) -> None:
        path.chmod(0o555 if path.is_dir() else 0o444)
        if not _chattr("+i", path):
            import os

            if os.geteuid() == 0:
                pytest.skip("chattr +i unavailable: root ignores file modes")
        done.append(path)

    yield make
    for path in done:
        _chattr("-i", path)
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_read_only_sqlite_file_is_one_line_error(capsys, write_study, tmp_path, read_only):
    db = tmp_path / "ro" / "study.db"
    db.parent.mkdir()
    path = write_study(name="ro")
    assert main(["create", str(path), "--storage", f"sqlite:///{db}"]) == 0
    capsys.readouterr()
    read_only(db)
    line = _one_error(capsys, ["run", str(path), "--storage", f"sqlite:///{db}"], str(db), "read-only")
    assert "chmod" in line or "writable" in line


def test_read_only_sqlite_folder_is_one_line_error(capsys, write_study, tmp_path, read_only):
    folder = tmp_path / "rodir"
    folder.mkdir()
    read_only(folder)
    _one_error(capsys, ["create", str(write_study(name="ro")), "--storage", f"sqlite:///{folder / 'x.db'}"], str(folder), "writable")


def test_sqlite_file_made_read_only_under_a_worker_fails_fast(write_study, tmp_path, read_only):
    db = tmp_path / "late" / "study.db"
    db.parent.mkdir()
    spec = load_spec(write_study(name="late"))
    storage = open_storage(f"sqlite:///{db}")
    study, _ = create_study(spec, storage)
    storage.engine.dispose()  # the next write opens a new connection, on a read-only file
    read_only(db)
    with pytest.raises(StorageError, match="read-only"):
        study.set_user_attr("x", 1)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(capsys, write_study, url):
    _one_error(capsys, ["create", str(write_study(name="mem")), "--storage", url], "--storage", "in-memory")
    _one_error(capsys, ["worker", "--storage", url, "--study", "mem"], "--storage", "in-memory")


def test_budget_below_the_finished_trials_is_refused(capsys, write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    path = write_study(name="budget", n_trials=3)
    assert main(["create", str(path), "--storage", url]) == 0
    study = optuna.load_study(study_name="budget", storage=url)
    dist = optuna.distributions.FloatDistribution(0, 1)
    for v in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(params={"x": v}, distributions={"x": dist}, value=v))
    capsys.readouterr()
    _one_error(capsys, ["create", str(path), "--storage", url, "--n-trials", "1"], "--n-trials", "study.n_trials", "2")
    assert optuna.load_study(study_name="budget", storage=url).user_attrs["llrd:n_trials"] == 3
    assert main(["create", str(path), "--storage", url, "--n-trials", "2"]) == 0  # equal is fine: the study is done


def test_a_budget_below_both_arms_finished_trials_is_refused_before_any_write(capsys, write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'arms.db'}"
    path = write_study(name="arms", n_trials=8, study={"control_fraction": 0.25})
    assert main(["create", str(path), "--storage", url]) == 0
    dist = optuna.distributions.FloatDistribution(0, 1)
    for name, n in (("arms", 3), ("arms.control", 2)):
        study = optuna.load_study(study_name=name, storage=url)
        for v in range(n):
            study.add_trial(optuna.trial.create_trial(params={"x": v / 10}, distributions={"x": dist}, value=v / 10))
    capsys.readouterr()
    # 5 covers the 5 finished trials, but gives the control arm a share of 1 (0.25 * 5, rounded) below its 2: 6 is the least.
    line = _one_error(capsys, ["create", str(path), "--storage", url, "--n-trials", "5"], "--n-trials", "5 trials (3 LLRD + 2 control)",
                      "a share of 1, below its 2", "pass --n-trials 6 or more")
    assert "arms.control" not in line  # one budget, the study's, not an arm's share
    _one_error(capsys, ["create", str(path), "--storage", url, "--n-trials", "4"], "5 trials (3 LLRD + 2 control)", "pass --n-trials 6 or more")
    assert optuna.load_study(study_name="arms", storage=url).user_attrs["llrd:n_trials"] == 8  # the failing commands wrote nothing
    assert main(["create", str(path), "--storage", url, "--n-trials", "6"]) == 0
    assert optuna.load_study(study_name="arms", storage=url).user_attrs["llrd:n_trials"] == 6


def test_smallest_budget_is_the_least_valid_one():
    from llrd_search.study.arms import control_target, smallest_budget

    for fraction in (0.0, 0.1, 0.25, 0.34, 0.5, 0.9):
        for llrd in range(6):
            for control in range(6 if fraction else 1):
                least = smallest_budget(fraction, llrd, control)
                valid = [n >= llrd + control and control_target(fraction, n) >= control for n in range(least + 20)]
                assert valid == [False] * least + [True] * 20, (fraction, llrd, control)


def test_budget_lock_is_reentrant_in_one_thread(tmp_path):
    """Creating the control arm takes the lock inside a section that holds it: on SQLite (one lock
    file per database) a second flock from the same thread used to wait for itself forever."""
    import threading

    from llrd_search.study.resilience import budget_lock
    from llrd_search.study.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'lock.db'}")
    done = threading.Event()

    def nested() -> None:
        with budget_lock(storage, 1), budget_lock(storage, 2):
            done.set()

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert done.is_set()
    storage.engine.dispose()


# --------------------------------------------------------------------------- no import-time side effects


def test_importing_the_library_changes_no_global_setting():
    # A script importing llrd_search keeps Optuna's logging and its warnings filters as they were;
    # only a process entry point (main, a worker) quiets Optuna, and says so by calling quiet_optuna.
    code = """
import sys, warnings, optuna
before = (optuna.logging.get_verbosity(), list(warnings.filters))
import llrd_search.cli, llrd_search.results.dashboard, llrd_search.study.local_workers, llrd_search.search, llrd_search.study.storage, llrd_search.study.worker
assert (optuna.logging.get_verbosity(), list(warnings.filters)) == before, "changed on import"
llrd_search.study.storage.quiet_optuna()
assert optuna.logging.get_verbosity() == optuna.logging.WARNING
assert any(f[0] == "ignore" and f[1] is not None and f[1].pattern.startswith("Heartbeat of storage") for f in warnings.filters)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
