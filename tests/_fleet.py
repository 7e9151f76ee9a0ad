"""Helpers for tests that run real worker processes: start them, watch the study, count states."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna


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


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # the study may not exist yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def running_trial_of(url: str, name: str, pids: list[int]) -> tuple[int, optuna.trial.FrozenTrial] | None:
    """(pid, trial) of a RUNNING trial owned by one of ``pids`` (user attr ``worker`` = host:pid)."""
    for t in trials(url, name):
        owner = str(t.user_attrs.get("worker", ""))
        if t.state.name == "RUNNING" and owner.rsplit(":", 1)[-1].isdigit() and int(owner.rsplit(":", 1)[-1]) in pids:
            return int(owner.rsplit(":", 1)[-1]), t
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
    from llrd_search.worker import run_worker

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
