"""Helpers for tests that run real worker processes: start them, watch the study, count states."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from llrd_search.study import compat
from llrd_search.vocab import PARAMS


def env() -> dict[str, str]:
    # The children share the session's tokenization cache (set by conftest) and stay offline.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``llrd-search ARGS`` as a child process; stdout+stderr go to ``log``."""
    fh = open(log, "w")  # noqa: SIM115 - closed by the OS when the child exits; read back by the test
    return subprocess.Popen([sys.executable, "-m", "llrd_search", *args], stdout=fh, stderr=subprocess.STDOUT, env=env())


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llrd_search", *args], capture_output=True, text=True, env=env(), timeout=timeout)


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def states(url: str, name: str) -> Counter:
    return Counter(t.state.name for t in trials(url, name))


# What a poll may meet before the thing it waits for exists: no database file or tables yet
# (OperationalError), the schema being made by the command under test while the poll's own
# RDBStorage makes it too (IntegrityError on alembic_version), no study yet (KeyError from
# Optuna), a child process gone or not yet listed.
EXPECTED_WHILE_WAITING: tuple[type[BaseException], ...] = (KeyError, OperationalError, IntegrityError, FileNotFoundError, psutil.NoSuchProcess)


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    poll: float = 0.3,
    expected: tuple[type[BaseException], ...] = EXPECTED_WHILE_WAITING,
) -> object:
    """Poll ``predicate`` until it returns something truthy. Only ``expected`` exceptions are
    retried (any other is a real error and propagates); a timeout names the last value or error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except expected as err:
            value, last = None, err
        else:
            last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(poll)


def _heartbeating(url: str) -> set[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(text("SELECT trial_id FROM trial_heartbeats"))}
    finally:
        engine.dispose()


def running_trial_of(url: str, name: str, pids: list[int]) -> tuple[int, optuna.trial.FrozenTrial] | None:
    """(pid, trial) of a RUNNING trial owned by one of ``pids`` (user attr ``worker`` = host:pid)
    that has sampled all three parameters and recorded a heartbeat: a signal sent now lands in its
    training, not between its ``suggest`` calls."""
    beating = None
    for t in trials(url, name):
        owner = str(t.user_attrs.get("worker", "")).rsplit(":", 1)[-1]
        if t.state.name != "RUNNING" or not owner.isdigit() or int(owner) not in pids or set(t.params) != set(PARAMS):
            continue
        beating = _heartbeating(url) if beating is None else beating
        if compat.trial_id(t) in beating:
            return int(owner), t
    return None


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def run_worker_threads(url: str, name: str, n: int, objective_factory: Callable, timeout: float = 120) -> list[Exception]:
    """Run ``n`` in-process workers on threads until the study's budget is spent; their errors."""
    from llrd_search.study.worker import run_worker

    errors: list[Exception] = []

    def work(i: int) -> None:
        try:
            run_worker(url, name, worker_index=i, objective_factory=objective_factory, poll_seconds=0.2)
        except Exception as err:  # returned to the test, which asserts there are none
            errors.append(err)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=timeout)
    return errors


@contextlib.contextmanager
def budget_gate(db: Path) -> Iterator[None]:
    """Hold a SQLite study's budget lock (the file ``resilience.budget_lock`` locks): while held, no
    worker can start a trial, so a test can let slow-starting workers line up before any begins."""
    with open(f"{db}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def at_gate(db: Path, pids: list[int]) -> bool:
    """Whether every process in ``pids`` has the budget lock file open, i.e. waits at the gate."""
    lock = os.path.realpath(f"{db}.lock")
    return all(any(f.path == lock for f in psutil.Process(pid).open_files()) for pid in pids)


def printed_trials(log: str) -> list[int]:
    """Trial numbers of the finished-trial lines ``run`` printed ("[k/N] trial 3 COMPLETE ...")."""
    return [int(m) for m in re.findall(r"^\[\d+/\d+\] trial (\d+) ", log, flags=re.M)]


def freeze_a_running_trial(url: str, name: str, pids: list[int], timeout: float = 300) -> tuple[int, optuna.trial.FrozenTrial]:
    """(pid, trial) of a worker stopped (SIGSTOP) while its trial is RUNNING: a kill that follows
    lands mid-trial wherever the worker was, because a frozen worker cannot finish the trial. A
    worker that finished its trial before the stop is resumed and the search goes on."""
    while True:
        pid, _ = wait_for(lambda: running_trial_of(url, name, pids), timeout, "a running trial", poll=0.1)  # start-up under load
        os.kill(pid, signal.SIGSTOP)
        found = running_trial_of(url, name, [pid])
        if found is not None:
            return found
        os.kill(pid, signal.SIGCONT)  # it finished that trial meanwhile: try again
