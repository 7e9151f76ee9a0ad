"""Workers that die, get interrupted or keep failing: no trial lost, none left RUNNING, none duplicated.

In-process tests use a trivial objective (no training); the process tests run real
``llrd-search`` workers on the tiny model against a SQLite study.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref

import optuna
import psutil
import pytest
from _fleet import (
    at_gate,
    budget_gate,
    finish,
    freeze_a_running_trial,
    printed_trials,
    run_worker_threads,
    running_trial_of,
    spawn,
    states,
    trials,
    wait_for,
)
from conftest import STALE_FAST, write_toy_dataset
from sqlalchemy import create_engine, text

from llrd_search.cli import main
from llrd_search.engine.objective import suggest
from llrd_search.engine.steps import step_callback, step_hook
from llrd_search.exceptions import RepeatedFailureError
from llrd_search.spec import load_spec
from llrd_search.study import compat
from llrd_search.study.claims import INTERRUPTED, FailureCounter, error_signature
from llrd_search.study.resilience import is_transient, retrying
from llrd_search.study.storage import create_study, open_storage
from llrd_search.study.worker import run_worker

# Trials on 64 examples: SLOW_EPOCHS makes one last a few seconds, long enough to be hit mid-trial.
SLOW_EPOCHS = 25


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("small"), n_train=64, n_val=16)


def _create(path, url: str) -> optuna.Study:
    storage = open_storage(url)
    study, _ = create_study(load_spec(path), storage)
    return study


def _quick(value: float = 0.5, pause: float = 0.0):
    """An objective factory whose trials sample the space and return at once (or after ``pause``)."""

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            time.sleep(pause)
            return value

        return objective

    return factory


# --------------------------------------------------------------------------- pure pieces


def test_error_signature_ignores_numbers_but_not_the_error():
    a = error_signature(RuntimeError("loss became nan at step 13 (lr 1.5e-3)"))
    b = error_signature(RuntimeError("loss became nan at step 40 (lr 2e-3)"))
    assert a == b
    assert a != error_signature(ValueError("loss became nan at step 13 (lr 1.5e-3)"))
    assert a != error_signature(RuntimeError("CUDA out of memory"))


def test_the_failure_counter_gives_up_at_the_limit_of_identical_errors_in_a_row():
    failures = FailureCounter(limit=3)
    nan = [RuntimeError(f"loss became nan at step {i}") for i in range(5)]
    assert [failures.record(e) for e in nan[:2]] == [False, False]
    assert not failures.record(ValueError("CUDA out of memory"))  # another error starts the count over
    assert [failures.record(e) for e in nan[:3]] == [False, False, True]
    assert failures.repeats == 3
    failures.reset()  # a trial that completed
    assert not failures.record(nan[4]) and failures.repeats == 1


def test_step_hooks_reach_only_their_block_and_thread():
    seen = []
    other_thread = []

    def own(step, _total):
        seen.append(("own", step))

    assert step_callback() is None and step_callback(own) is own
    with step_hook(lambda step, _t: seen.append(("outer", step))):
        with step_hook(lambda step, _t: seen.append(("inner", step))):
            step_callback(own)(1, 2)
            thread = threading.Thread(target=lambda: other_thread.append(step_callback()))
            thread.start()
            thread.join()
        step_callback()(2, 2)
    assert step_callback() is None
    assert seen == [("outer", 1), ("inner", 1), ("own", 1), ("outer", 2)]
    assert other_thread == [None]


def test_retrying_rides_out_transient_errors_only():
    from sqlalchemy.exc import OperationalError

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    assert retrying(flaky, lambda: 30)() == "ok"
    assert len(calls) == 3
    assert not is_transient(optuna.exceptions.StorageInternalError("value too long"))

    def broken():
        calls.append(1)
        raise ValueError("not a storage problem")

    calls.clear()
    with pytest.raises(ValueError):
        retrying(broken, lambda: 30)()
    assert len(calls) == 1


def test_every_storage_call_a_study_makes_is_retried():
    # A Study wraps the storage in Optuna's cache layer, which also calls private methods
    # (_create_new_trial, _set_trial_param, ...): each must ride out an outage too.
    import inspect
    import re

    import optuna.storages._cached_storage as cached

    from llrd_search.study.resilience import ResilientRDBStorage

    called = set(re.findall(r"self\._backend\.(\w+)", inspect.getsource(cached)))
    assert {"_create_new_trial", "set_trial_state_values", "record_heartbeat"} <= called
    unwrapped = {name for name in called if getattr(ResilientRDBStorage, name) is getattr(optuna.storages.RDBStorage, name)}
    assert unwrapped == set()


# --------------------------------------------------------------------------- in-process workers


def test_threads_share_the_budget_exactly(write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    _create(write_study(name="threads", n_trials=12), url)
    assert run_worker_threads(url, "threads", 4, _quick(pause=0.05)) == []
    assert states(url, "threads") == {"COMPLETE": 12}


def test_last_worker_waits_for_a_dead_workers_trial_and_retries_it(write_study, tmp_path):
    # One live worker, which reaps only between its own trials: a short grace cannot hit it.
    path = write_study(name="orphan", n_trials=3, study=STALE_FAST)
    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    _create(path, url)
    spec = load_spec(path)
    # A "dead worker": it asked for a trial with fixed params, beat once, and vanished.
    dead_storage = open_storage(url, spec)
    dead = optuna.load_study(study_name="orphan", storage=dead_storage)
    trial = dead.ask(
        {
            "base_lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True),
            "head_lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
            "decay": optuna.distributions.FloatDistribution(0.5, 1.0),
        }
    )
    trial.set_user_attr("worker", "gone:1")
    dead_storage.record_heartbeat(compat.trial_id(trial))
    dead_params = dict(trial.params)

    ran = run_worker(url, "orphan", objective_factory=_quick(), poll_seconds=0.5)

    all_trials = trials(url, "orphan")
    assert ran == 3  # two fresh trials, then the dead one's retry once its grace period expired
    assert states(url, "orphan") == {"COMPLETE": 3, "FAIL": 1}
    failed = next(t for t in all_trials if t.state.name == "FAIL")
    assert failed.number == trial.number
    assert failed.user_attrs["fail_reason"].startswith("worker lost")
    retry = next(t for t in all_trials if t.system_attrs.get("failed_trial") == trial.number)
    assert retry.state.name == "COMPLETE"
    assert retry.params == dead_params
    assert retry.system_attrs["retry_history"] == [trial.number]
    assert "fail_reason" not in retry.user_attrs  # the dead run's outcome is not inherited
    assert retry.user_attrs["llrd:retry_of"] == trial.number


def test_a_retry_trains_with_the_lost_trials_seed(write_study, tmp_path):
    from llrd_search.engine.user_objective import trial_seed

    # seed + trial_seed_offset + number gives every trial its own seed; a retry gets a new number.
    path = write_study(name="reseed", n_trials=2, study={**STALE_FAST, "seed": 7, "trial_seed_offset": 100})
    url = f"sqlite:///{tmp_path / 'reseed.db'}"
    _create(path, url)
    dead_storage = open_storage(url, load_spec(path))
    dead = optuna.load_study(study_name="reseed", storage=dead_storage)
    trial = dead.ask({"decay": optuna.distributions.FloatDistribution(0.5, 1.0)})
    lost_seed = trial_seed(trial)  # recorded in its "seed" attr, as the built-in loop does before training
    dead_storage.record_heartbeat(compat.trial_id(trial))
    seeds = {}

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            seeds[trial.number] = trial_seed(trial)
            return 0.5

        return objective

    run_worker(url, "reseed", objective_factory=factory, poll_seconds=0.5)
    retry = next(t for t in trials(url, "reseed") if t.system_attrs.get("failed_trial") == trial.number)
    assert lost_seed == 7 + 100 + trial.number
    assert retry.number != trial.number and seeds[retry.number] == lost_seed  # a rerun, not a new draw
    assert retry.user_attrs["llrd:seed"] == retry.user_attrs["seed"] == lost_seed
    fresh = [n for n in seeds if n != retry.number]
    assert fresh and all(seeds[n] == 7 + 100 + n for n in fresh)  # the others keep their own


@pytest.mark.parametrize(("queued", "signum"), [("paper", signal.SIGINT), ("enqueue", signal.SIGTERM), ("sampled", signal.SIGINT)])
def test_an_interrupted_trial_is_retried_with_its_parameters_and_seed(queued, signum, write_study, tmp_path):
    # The paper's point, a user's `enqueue` point and a sampled point alike (grid points: test_grid.py).
    point = {"paper": {"base_lr": 2e-5, "head_lr": 2e-5, "decay": 0.95}, "enqueue": {"base_lr": 3e-4, "head_lr": 3e-3, "decay": 0.8}}
    study = {"control_fraction": 0.5, "seed": 7, "enqueue_paper_points": queued == "paper", "enqueue": [point["enqueue"]] if queued == "enqueue" else []}
    space = {"base_lr": "{ low = 1e-5, high = 1e-3, log = true }", "head_lr": "{ low = 1e-5, high = 1e-2, log = true }"}
    url = f"sqlite:///{tmp_path / 'int.db'}"
    _create(write_study(name="int", n_trials=4, study=study, space=space), url)
    started = []

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            started.append(trial.number)
            if len(started) == 1:
                os.kill(os.getpid(), signum)
                time.sleep(5)
            return 0.5

        return objective

    with pytest.raises(KeyboardInterrupt):
        run_worker(url, "int", objective_factory=factory)
    run_worker(url, "int", objective_factory=_quick())
    both = trials(url, "int") + trials(url, "int.control")
    (lost,) = [t for t in both if t.state.name == "FAIL"]
    assert lost.user_attrs["fail_reason"] == INTERRUPTED
    if queued in point:
        assert lost.params == point[queued]  # the first trial was the queued point
    (retry,) = [t for t in both if t.system_attrs.get("failed_trial") == lost.number and t.user_attrs["llrd:arm"] == lost.user_attrs["llrd:arm"]]
    assert retry.state.name == "COMPLETE" and retry.params == lost.params
    assert retry.user_attrs["llrd:seed"] == 7 + lost.number  # study.seed + number: the seed the lost trial trained with
    arms = ["int.control", "int"] if lost.user_attrs["llrd:arm"] == "control" else ["int", "int.control"]  # a sampled first trial may be either
    assert states(url, arms[0]) == {"COMPLETE": 2, "FAIL": 1} and states(url, arms[1]) == {"COMPLETE": 2}  # the exact budget


def test_a_trial_reaped_while_it_ran_is_not_told_twice(write_study, tmp_path):
    # A storage outage longer than grace_period: another worker reaped this live trial and
    # re-queued it. Its own worker must drop the late result, not crash, and run the retry.
    from llrd_search.study.resilience import retry_stale_trial

    url = f"sqlite:///{tmp_path / 'late.db'}"
    _create(write_study(name="late", n_trials=2), url)
    calls = []

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            calls.append(trial.number)
            if len(calls) == 1:
                reaper = optuna.load_study(study_name="late", storage=open_storage(url))
                compat.storage_of(reaper).set_trial_state_values(compat.trial_id(trial), optuna.trial.TrialState.FAIL)
                retry_stale_trial(2)(reaper, compat.storage_of(reaper).get_trial(compat.trial_id(trial)))
            return 0.5

        return objective

    assert run_worker(url, "late", objective_factory=factory) == 3
    all_trials = trials(url, "late")
    assert states(url, "late") == {"COMPLETE": 2, "FAIL": 1}
    assert all_trials[0].state.name == "FAIL" and all_trials[0].value is None
    assert [t.system_attrs.get("failed_trial") for t in all_trials if t.state.name == "COMPLETE"].count(0) == 1


def test_heartbeatless_running_trial_is_reaped_once_old(write_study, tmp_path):
    from llrd_search.study.storage import fail_stale

    path = write_study(name="nobeat", n_trials=2)
    url = f"sqlite:///{tmp_path / 'nobeat.db'}"
    _create(path, url)
    study = optuna.load_study(study_name="nobeat", storage=open_storage(url, load_spec(path)))
    young = study.ask()
    old = study.ask()  # died between ask and its first heartbeat
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE trials SET datetime_start = '2000-01-01 00:00:00' WHERE trial_id = :i"), {"i": compat.trial_id(old)})
    engine.dispose()
    assert fail_stale(study) == [old.number]
    assert {t.number: t.state.name for t in trials(url, "nobeat")}[young.number] == "RUNNING"


def test_repeated_identical_failures_stop_the_worker(write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    _create(write_study(name="broken", n_trials=10), url)
    step = iter(range(100))

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            raise RuntimeError(f"loss became nan at step {next(step)}")

        return objective

    with pytest.raises(RepeatedFailureError, match="3 trials in a row failed"):
        run_worker(url, "broken", objective_factory=factory)
    failed = trials(url, "broken")
    assert [t.state.name for t in failed] == ["FAIL"] * 3  # not the whole budget of 10
    assert failed[0].user_attrs["fail_reason"] == "RuntimeError: loss became nan at step 0"


def test_a_success_resets_the_failure_count(write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'flaky.db'}"
    _create(write_study(name="flaky", n_trials=4), url)
    outcomes = iter([True, True, False, True, True, False, False, False, False, False])

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            if next(outcomes):
                raise RuntimeError("CUDA out of memory")
            return 0.5

        return objective

    run_worker(url, "flaky", objective_factory=factory)
    assert states(url, "flaky") == {"COMPLETE": 4, "FAIL": 4}


def test_interrupt_in_a_trial_marks_it_failed(write_study, tmp_path):
    url = f"sqlite:///{tmp_path / 'ctrlc.db'}"
    _create(write_study(name="ctrlc", n_trials=3), url)

    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM behaves like Ctrl-C
            time.sleep(5)
            return 0.5

        return objective

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as info:
        run_worker(url, "ctrlc", objective_factory=factory)
    assert info.value.trials_marked == (1, 1)  # what `llrd-search worker` says: 1 marked FAIL, 1 re-queued
    t, retry = trials(url, "ctrlc")
    assert t.state.name == "FAIL"
    assert t.user_attrs["fail_reason"] == INTERRUPTED
    # Re-queued like a dead worker's trial: its parameters, its seed, one retry of study.max_retries.
    assert retry.state.name == "WAITING" and retry.params == t.params
    assert retry.user_attrs["llrd:seed"] == 0 + 0 + t.number  # study.seed + trial_seed_offset + number: what it would have trained with
    assert retry.system_attrs["retry_history"] == [t.number]
    assert signal.getsignal(signal.SIGTERM) == before  # the worker's handler is gone with the worker


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_a_signal_whose_interrupt_python_dropped_still_stops_the_trial(write_study, tmp_path):
    # A KeyboardInterrupt raised by the handler while a weakref/GC callback runs is printed as
    # "Exception ignored" and lost; a child of `run` once ran on to the end of the study that way.
    url = f"sqlite:///{tmp_path / 'dropped.db'}"
    _create(write_study(name="dropped", n_trials=3), url)
    steps: list[int] = []

    class Objective:
        def __call__(self, trial):
            on_step = step_callback()  # what the built-in objective's training loop calls at each step
            suggest(trial, load_spec(write_study(name="dropped", n_trials=3)).space)
            target = type("Target", (), {})()
            ref = weakref.ref(target, lambda _r: signal.raise_signal(signal.SIGTERM))  # noqa: F841
            del target  # the callback runs now; the handler's KeyboardInterrupt is raised inside it and dropped
            for step in range(1, 51):
                time.sleep(0.01)
                steps.append(step)
                on_step(step, 50)
            return 0.5

    with pytest.raises(KeyboardInterrupt):
        run_worker(url, "dropped", objective_factory=lambda _spec: Objective())
    assert steps == [1]  # stopped at the first step after the signal, not at the end of the study
    t, retry = trials(url, "dropped")
    assert t.state.name == "FAIL" and t.user_attrs["fail_reason"] == INTERRUPTED and retry.state.name == "WAITING"


def test_the_built_in_objective_runs_the_installed_step_hooks_then_its_own(write_study):
    from llrd_search.engine.objective import Objective

    calls = []
    objective = Objective(load_spec(write_study(name="hooks", n_trials=1)), on_step=lambda step, _t: calls.append(("own", step)))
    with step_hook(lambda step, _t: calls.append(("hook", step))):
        objective(optuna.create_study(direction="maximize").ask())
    steps = [step for who, step in calls if who == "own"]
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert calls == [(who, step) for step in steps for who in ("hook", "own")]
    calls.clear()
    objective(optuna.create_study(direction="maximize").ask())  # the block has ended: its hook is gone
    assert calls and {who for who, _ in calls} == {"own"}


def test_interrupt_during_ask_leaves_no_running_trial(write_study, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'askint.db'}"
    _create(write_study(name="askint", n_trials=3), url)
    real_ask = optuna.Study.ask

    def ask_then_signal(self, *args, **kwargs):
        trial = real_ask(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # lands after the trial exists, before its first heartbeat
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_then_signal)
    with pytest.raises(KeyboardInterrupt):
        run_worker(url, "askint", objective_factory=_quick())
    t, retry = trials(url, "askint")
    assert t.state.name == "FAIL"
    assert t.user_attrs["fail_reason"] == INTERRUPTED
    assert retry.state.name == "WAITING" and set(retry.params) == {"base_lr", "head_lr", "decay"} and retry.params == t.params


# --------------------------------------------------------------------------- real worker processes


def test_every_parameter_is_sampled_before_the_trial_runs(write_study, tmp_path):
    # A worker killed at any moment of its trial must leave all three parameters for the retry.
    url = f"sqlite:///{tmp_path / 'ask.db'}"
    _create(write_study(name="ask", n_trials=3), url)
    seen = []

    def factory(spec):
        def objective(trial):
            seen.append(dict(trial.params))  # before the objective suggests anything
            return 0.5

        return objective

    run_worker(url, "ask", objective_factory=factory, poll_seconds=0.1)
    assert [set(p) for p in seen] == [{"base_lr", "head_lr", "decay"}] * 3


def test_sigkill_mid_trial_is_retried_with_the_same_params(write_study, tmp_path, small):
    name = "kill"
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    # Two survivors reap each other's trials: grace 10 s, so a live trial is reaped only if its
    # heartbeat thread starves for 10 s, while the dead one is retried soon enough.
    heartbeat = {"heartbeat_interval": 1, "grace_period": 10}
    assert main(["create", str(write_study(name=name, n_trials=6, train={"epochs": SLOW_EPOCHS}, data=small, study=heartbeat)), "--storage", url]) == 0
    procs = [spawn(["worker", "--storage", url, "--study", name, "--worker-index", str(i), "--threads", "1"], tmp_path / f"w{i}.log") for i in range(3)]
    try:
        pid, victim = freeze_a_running_trial(url, name, [p.pid for p in procs])
        os.kill(pid, signal.SIGKILL)
        survivors = [p for p in procs if p.pid != pid]
        assert finish(survivors, 240) == [0, 0]
    finally:
        for p in procs:
            p.kill()
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(3))
    assert "locked" not in logs
    all_trials = trials(url, name)
    assert states(url, name) == {"COMPLETE": 6, "FAIL": 1}
    killed = next(t for t in all_trials if t.number == victim.number)
    assert killed.state.name == "FAIL"
    assert killed.user_attrs["fail_reason"].startswith("worker lost")
    assert set(killed.params) == {"base_lr", "head_lr", "decay"}
    (retry,) = [t for t in all_trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state.name == "COMPLETE"
    assert retry.params == killed.params
    assert retry.system_attrs["retry_history"] == [victim.number]
    assert retry.user_attrs["seed"] == killed.user_attrs["seed"] != retry.number  # trained again with the lost run's seed


def test_four_sqlite_workers_no_lock_errors_no_lost_or_duplicate_trials(write_study, tmp_path, small):
    name = "four"
    db = tmp_path / "four.db"
    url = f"sqlite:///{db}"
    path = write_study(name=name, n_trials=8, train={"epochs": SLOW_EPOCHS}, data=small)
    # Worker 0 runs in `run` itself and could finish all 8 trials before the children have started:
    # once they exist (`run` created the study, under the budget lock), hold that lock until all
    # three wait for it, so every worker competes.
    proc = spawn(["run", str(path), "--workers", "4", "--storage", url], tmp_path / "run.log")
    try:
        children = wait_for(lambda: (c := psutil.Process(proc.pid).children()) and len(c) == 3 and c, 180, "3 child workers")
        with budget_gate(db):
            wait_for(lambda: at_gate(db, [c.pid for c in children]), 180, "3 children at the budget lock")
    except BaseException:
        proc.kill()
        raise
    assert finish([proc], 300) == [0]
    log = (tmp_path / "run.log").read_text()
    assert "locked" not in log.lower()
    assert "Traceback" not in log
    all_trials = trials(url, name)
    assert states(url, name) == {"COMPLETE": 8}
    assert sorted(t.number for t in all_trials) == list(range(8))
    assert len({tuple(sorted(t.params.items())) for t in all_trials}) == 8
    workers = {t.user_attrs["worker"] for t in all_trials}
    assert len(workers) == 4  # all four lined up at the lock: each took a trial while the others trained
    assert sorted(printed_trials(log)) == sorted(t.number for t in all_trials)  # every worker's trials printed once


def test_ctrl_c_on_run_fails_the_trial_and_a_second_run_resumes(write_study, tmp_path, capsys, small):
    name = "resume"
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    study = write_study(name=name, n_trials=1, train={"epochs": SLOW_EPOCHS}, data=small)

    def press_ctrl_c():
        wait_for(lambda: running_trial_of(url, name, [os.getpid()]), 120, "a running trial")
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    assert main(["run", str(study), "--storage", url]) == 130
    presser.join()
    assert "interrupted" in capsys.readouterr().err
    first = trials(url, name)
    assert "RUNNING" not in {t.state.name for t in first}
    assert [t.user_attrs.get("fail_reason") for t in first if t.state.name == "FAIL"] == [INTERRUPTED]

    assert main(["run", str(study), "--storage", url]) == 0
    assert states(url, name) == {"COMPLETE": 1, "FAIL": 1}


def test_ctrl_c_during_the_papers_point_then_a_resume_trains_it_and_its_control(write_study, tmp_path, capsys, small):
    name = "paper"
    url = f"sqlite:///{tmp_path / 'paper.db'}"
    paper = {"base_lr": 2e-5, "head_lr": 2e-5, "decay": 0.95}
    space = {"base_lr": "{ low = 1e-5, high = 1e-3, log = true }", "head_lr": "{ low = 1e-5, high = 1e-2, log = true }"}
    study = write_study(name=name, n_trials=2, study={"control_fraction": 0.5}, space=space, train={"epochs": SLOW_EPOCHS}, data=small)

    def press_ctrl_c():
        wait_for(lambda: running_trial_of(url, name, [os.getpid()]), 120, "the paper's point running")
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    assert main(["run", str(study), "--storage", url, "--workers", "1"]) == 130
    presser.join()
    assert "re-queued" in capsys.readouterr().err
    (lost,) = trials(url, name)[:1]
    assert lost.state.name == "FAIL" and lost.user_attrs["fail_reason"] == INTERRUPTED
    assert lost.params == paper and lost.user_attrs["llrd:enqueued"].startswith("paper")  # the first queued point

    assert main(["run", str(study), "--storage", url, "--workers", "1"]) == 0
    assert states(url, name) == {"COMPLETE": 1, "FAIL": 1} and states(url, f"{name}.control") == {"COMPLETE": 1}
    (retry,) = [t for t in trials(url, name) if t.state.name == "COMPLETE"]
    assert retry.params == paper and retry.user_attrs["llrd:retry_of"] == lost.number and retry.user_attrs["llrd:enqueued"] == lost.user_attrs["llrd:enqueued"]
    assert retry.user_attrs["seed"] == lost.user_attrs["seed"]  # trained again with the seed it was interrupted in
    (control,) = trials(url, f"{name}.control")
    assert control.params == {**paper, "decay": 1.0}  # the paper's control (ξ = 1) trained too


def test_run_defaults_to_one_single_threaded_worker_per_core(write_study, tmp_path, small, monkeypatch, capsys):
    import llrd_search.study.local_workers as lw

    monkeypatch.delenv("LLRD_SEARCH_WORKERS")
    monkeypatch.setattr(lw, "usable_cores", lambda: 2)
    name = "auto"
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    assert main(["run", str(write_study(name=name, n_trials=6, train={"epochs": SLOW_EPOCHS}, data=small)), "--storage", url]) == 0
    err = capsys.readouterr().err
    assert "2 workers x 1 thread on cpu" in err
    assert states(url, name) == {"COMPLETE": 6}
    assert sorted(printed_trials(err)) == list(range(6))  # each finished trial printed once, whichever worker ran it


def test_sigterm_on_run_with_workers_stops_the_children(write_study, tmp_path, small):
    name = "term"
    db = tmp_path / "term.db"
    url = f"sqlite:///{db}"
    path = write_study(name=name, n_trials=20, train={"epochs": SLOW_EPOCHS}, data=small)
    proc = None
    try:
        # worker 0 runs in the `run` process itself: --workers 3 starts two children (once the study
        # is created). Hold the budget lock until both wait for it: a child then surely gets a trial.
        proc = spawn(["run", str(path), "--workers", "3", "--storage", url], tmp_path / "run.log")
        children = wait_for(lambda: (c := psutil.Process(proc.pid).children()) and len(c) == 2 and c, 180, "2 children")
        with budget_gate(db):
            wait_for(lambda: at_gate(db, [c.pid for c in children]), 180, "2 children at the budget lock")
        wait_for(lambda: running_trial_of(url, name, [c.pid for c in children]), 120, "a running trial in a child")
        proc.send_signal(signal.SIGTERM)  # only the parent: as `kill PID`, Slurm or Kubernetes would
        # The parent gives its children up to 30 s to mark their trials, then kills them and exits:
        # waiting exactly 30 s here raced that on a loaded machine.
        assert proc.wait(timeout=90) == 130
    finally:
        if proc is not None:
            proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    all_trials = trials(url, name)
    assert "RUNNING" not in {t.state.name for t in all_trials}
    assert any(t.user_attrs.get("fail_reason") == INTERRUPTED for t in all_trials)


def test_processes_opening_a_fresh_storage_at_once_all_succeed(tmp_path):
    # `run` on several machines at once, or a progress reader beside a starting `run`, race to
    # create Optuna's tables in a new database.
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    barrier = threading.Barrier(6)
    errors = []

    def open_it():
        barrier.wait()
        try:
            open_storage(url).engine.dispose()
        except Exception as err:  # surfaced below
            errors.append(err)

    pool = [threading.Thread(target=open_it) for _ in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert errors == []
