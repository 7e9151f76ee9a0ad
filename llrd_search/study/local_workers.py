"""Workers on one machine: how many, with how many threads, and running them.

``run`` and ``confirm`` run worker 0 in their own process (with the model they already loaded) and
K - 1 ``llrd-search worker`` child processes beside it, all on the same storage; a thread reports
every finished trial. Defaults to one single-threaded worker per CPU core: see :func:`auto_workers`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llrd_search.exceptions import LLRDSearchError

log = logging.getLogger(__name__)

WORKERS_ENV = "LLRD_SEARCH_WORKERS"
MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset, cgroups' cpusets, Slurm's binding
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes a new process could take without swapping (Linux MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_memory(n_params: int) -> int:
    """What one worker holds at its peak: the template and the trial copy, gradients and AdamW's two
    moments (~6 fp32 copies of the weights), plus ~1.5 GB of torch runtime, data and activations
    (a MiniLM worker peaked at ~2 GB here)."""
    return 6 * 4 * n_params + 1_500_000_000


def auto_workers(n_params: int, *, cuda: bool, remaining: int, cores: int | None = None, memory: int | None = None) -> int:
    """The default of ``run --workers``: one single-threaded worker per core on a CPU, because the
    kernels of one small-batch step use one core better than two (2 workers x 1 thread trained
    25-26 % more examples/s than 1 x 2 threads on both CPUs in docs/performance.md). Bounded by
    memory, by the trials left (a worker with nothing to do only costs its start-up) and by
    MAX_AUTO_WORKERS (TPE learns less when many trials run at once). On a GPU machine ``run`` plans
    workers per GPU instead (study/gpus.py); this 1 is for a caller that did not."""
    if cuda:
        return 1
    cores = usable_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    by_memory = max(1, int(0.8 * memory) // worker_memory(n_params)) if memory else cores
    return max(1, min(cores, by_memory, max(1, remaining), MAX_AUTO_WORKERS))


def workers_from_env() -> int | None:
    """``LLRD_SEARCH_WORKERS``, the default for ``--workers`` when set (e.g. 1 in a job script)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise LLRDSearchError(f"{WORKERS_ENV}: must be a whole number >= 1 (got '{raw}'); unset it for one worker per core")
    return int(raw)


def threads_per_worker(workers: int, threads: int | None) -> int:
    """Intra-op threads per worker: K x threads never oversubscribes the cores."""
    return threads or max(1, usable_cores() // max(1, workers))


def choose_workers(requested: int | None, objective: Any, remaining: int) -> int:
    """``--workers``, else ``$LLRD_SEARCH_WORKERS``, else :func:`auto_workers` for the loaded model."""
    if requested:
        return requested
    env = workers_from_env()
    if env:
        return env
    n_params = sum(p.numel() for p in objective.template.model.parameters())
    return auto_workers(n_params, cuda=objective.device.type == "cuda", remaining=remaining)


@contextlib.contextmanager
def _env_set(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment for the block, then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_local_workers(
    url: str,
    name: str,
    workers: int,
    threads: int,
    on_trial: Callable[[Any, Any], None],
    in_process: Callable[[], Any] | None = None,
    objective: str | None = None,
    child_env: Sequence[Mapping[str, str]] | None = None,
) -> None:
    """``workers`` workers on this machine. With ``in_process``, worker 0 is that call, run here
    with what this process already loaded (no second start-up: ~4 s of import and model load), and
    ``workers - 1`` child processes join it; without, all are children. Finished trials of every
    worker go to ``on_trial(study, trial)`` from a thread that polls the storage. ``objective``
    (``module:function``) is passed on to the children as ``--objective``. ``child_env[i]``: what
    worker i's environment adds (its ``CUDA_VISIBLE_DEVICES`` on a GPU machine: study/gpus.py)."""
    from llrd_search.study.sampling import FLEET_ENV
    from llrd_search.study.storage import shareable_url

    # Every worker's TPE knows how many trials are sampled at once (its constant liar, sampling.py).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), FLEET_ENV: str(workers)}
    # The password goes to the workers through libpq's PGPASSWORD, not argv (which `ps` shows to every user).
    child_url, has_password = shareable_url(url)
    if has_password:
        from sqlalchemy.engine import make_url

        env["PGPASSWORD"] = str(make_url(url).password)
    first = 1 if in_process is not None else 0
    procs: list[subprocess.Popen] = []
    with monitored(url, name, on_trial):  # before any worker starts: it reports every trial they finish
        try:
            for i in range(first, workers):
                argv = ["worker", "--storage", child_url, "--study", name, "--worker-index", str(i), "--threads", str(threads), "--quiet"]
                argv += ["--objective", objective] if objective else []
                extra = child_env[i] if child_env is not None else {}
                procs.append(subprocess.Popen([sys.executable, "-m", "llrd_search", *argv], env={**env, **extra}))
            if in_process is not None:
                with _env_set(FLEET_ENV, str(workers)):
                    in_process()
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
        except BaseException:
            # Ctrl-C reached the children too, but `kill PID` / SIGTERM reached only us: pass it on, then
            # give them time to mark their trials FAIL (a second signal is harmless: they defer it). The
            # same when worker 0 stopped on an error (e.g. repeated failures): the others would too.
            _stop(procs, wait=30)
            raise
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise LLRDSearchError(f"{len(failed)} of {workers} workers exited with an error (see their messages above)")


def _stop(procs: list[subprocess.Popen], wait: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def monitored(url: str, name: str, on_trial: Callable[[Any, Any], None], every: float = 2.0) -> Iterator[_TrialMonitor]:
    """A :class:`_TrialMonitor` of study ``name`` for the block: on leaving it, a last poll reports
    what finished meanwhile, then the storage is closed."""
    from llrd_search.study.storage import opened_study

    with opened_study(url, name) as study:
        monitor = _TrialMonitor(study, on_trial, every)
        try:
            yield monitor
        finally:
            monitor.stop()


class _TrialMonitor:
    """Calls ``on_trial(study, trial)`` once for every trial that finishes after it was made,
    whichever worker ran it, in trial-number order within each poll."""

    def __init__(self, study: Any, on_trial: Callable[[Any, Any], None], every: float = 2.0):
        from llrd_search.study.arms import arm_trials

        self.on_trial, self.every = on_trial, every
        # The snapshot is taken here, not in the thread: a trial finishing before the thread first
        # ran would be in it and never reported.
        self._study = study
        self.seen = {(arm, t.number) for arm, ts in arm_trials(study).items() for t in ts if t.state.is_finished()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="llrd-trial-monitor")
        self._thread.start()

    def _run(self) -> None:
        from llrd_search.study.compat import rdb_of

        try:
            while True:
                stopping = self._stop.wait(self.every)
                try:
                    self._poll(self._study)
                except Exception as err:  # a storage hiccup: the workers ride it out, so do we
                    log.debug("trial poll failed: %s", err)
                if stopping:
                    return
        finally:
            rdb = rdb_of(self._study)
            if rdb is not None:
                rdb.remove_session()  # this thread's; the storage itself is closed by monitored()

    def _poll(self, study: Any) -> None:
        from llrd_search.study.arms import arm_trials

        # Both arms (the control arm's trials are numbered in their own study).
        new = [(arm, t) for arm, ts in arm_trials(study).items() for t in ts if t.state.is_finished() and (arm, t.number) not in self.seen]
        for arm, t in sorted(new, key=lambda x: (x[1].datetime_complete or x[1].datetime_start, x[0], x[1].number)):
            self.seen.add((arm, t.number))
            self.on_trial(study, t)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
