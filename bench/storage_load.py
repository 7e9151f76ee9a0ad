"""Storage load: M worker processes with a trivial objective (no training) on one PostgreSQL study,
each talking to the database directly or through ``llrd-search proxy`` (``--via direct,proxy``).

Each worker is the real ``run_worker`` loop (budget lock, stale-trial reaping, heartbeat thread,
ask/report/tell); only the objective is a 0-10 ms sleep that reports two intermediate values.
Measured per M: trials/s over the whole run, p50/p95/p99 latency of

  ask    - the budget-locked section: lock wait + reap stale + count states + study.ask + first beat
  report - one trial.report() (an intermediate value; pruning checks read these)
  tell   - recording the outcome (attrs + study.tell)

plus errors (failed worker processes, FAIL trials), whether the study ended with exactly its budget,
storage retries ridden out, and the peak number of PostgreSQL connections held by llrd-search
(the proxy's included). Each row runs on a fresh database.

    python bench/storage_load.py                       # M = 1, 8, 32, 64, direct
    python bench/storage_load.py --workers 8 --trials-per-worker 50 --pool-size 2
    python bench/storage_load.py --workers 64,256 --via direct,proxy --trials-per-worker 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

ADMIN = "host={host} port={port} user={user} dbname=postgres"


def _spec(name: str, n_trials: int) -> dict:
    return {
        # Random sampler: its cost does not grow with the study, so what is measured is the storage.
        # One arm: the control arm's trials fix decay as a category, which the objective below does not expect.
        "study": {"name": name, "n_trials": n_trials, "sampler": "random", "pruner": "none", "control_fraction": 0.0},
        "model": {"name": "unused-by-this-benchmark"},
        "data": {"path": "unused-by-this-benchmark"},
        "space": {"base_lr": {"low": 1e-5, "high": 1e-4, "log": True}, "head_lr": {"low": 1e-4, "high": 1e-3, "log": True}, "decay": {"low": 0.5, "high": 1.0}},
    }


def _child(url: str, study: str, index: int, barrier, results, pool_size: int) -> None:
    from llrd_search.study import claims, resilience, storage, worker

    if pool_size != 1:
        base = storage.engine_kwargs
        storage.engine_kwargs = lambda u: {**base(u), "pool_size": pool_size}
    times: dict[str, list[float]] = {"ask": [], "report": [], "tell": []}

    real_lock, real_finish = claims.budget_lock, claims.finish

    @contextmanager
    def timed_lock(*args, **kwargs):
        t0 = time.perf_counter()
        with real_lock(*args, **kwargs):
            yield
        times["ask"].append(time.perf_counter() - t0)

    def timed_finish(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_finish(*args, **kwargs)
        finally:
            times["tell"].append(time.perf_counter() - t0)

    claims.budget_lock, claims.finish = timed_lock, timed_finish

    def factory(spec):
        rng = random.Random(index)

        def objective(trial):
            trial.suggest_float("base_lr", 1e-5, 1e-4, log=True)
            trial.suggest_float("head_lr", 1e-4, 1e-3, log=True)
            trial.suggest_float("decay", 0.5, 1.0)
            for step in (1, 2):
                time.sleep(rng.uniform(0, 0.005))
                t0 = time.perf_counter()
                trial.report(rng.random(), step)
                times["report"].append(time.perf_counter() - t0)
            return rng.random()

        return objective

    error = None
    barrier.wait()
    try:
        worker.run_worker(url, study, worker_index=index, objective_factory=factory, poll_seconds=0.05)
    except BaseException as err:  # counted, not raised: one failed worker must not hide the others' numbers
        error = f"{type(err).__name__}: {err}"[:300]
        if os.environ.get("BENCH_TRACEBACKS"):
            import traceback

            traceback.print_exc()
    results.put({"times": times, "error": error, "retries": resilience.RETRY_STATS["retries"]})


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000


def run_one(url: str, admin, m: int, per_worker: int, pool_size: int, worker_url: str | None = None) -> dict:
    """One fresh study of ``m`` workers on ``url``; the workers use ``worker_url`` (a proxy) when given."""
    from llrd_search.spec import parse_spec
    from llrd_search.study.storage import create_study, opened_storage

    name = f"load-m{m}-{uuid.uuid4().hex[:6]}"
    n_trials = m * per_worker
    with opened_storage(url) as storage:
        create_study(parse_spec(_spec(name, n_trials)), storage, n_trials)

    ctx = mp.get_context("fork")  # the parent imported everything: children start in milliseconds
    barrier, results = ctx.Barrier(m + 1), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(worker_url or url, name, i, barrier, results, pool_size)) for i in range(m)]
    for p in procs:
        p.start()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            n = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'llrd-search'").fetchone()[0]
            peak[0] = max(peak[0], n)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    barrier.wait()
    t0 = time.perf_counter()
    collected = [results.get(timeout=900) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=30)
    stop.set()

    import optuna

    with opened_storage(url) as storage:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "FAIL", "RUNNING", "WAITING")}
    merged = {k: [x for r in collected for x in r["times"][k]] for k in ("ask", "report", "tell")}
    return {
        "workers": m,
        "via": "proxy" if worker_url else "direct",
        "trials": states["COMPLETE"],
        "budget": n_trials,
        "wall_s": round(wall, 2),
        "trials_per_s": round(states["COMPLETE"] / wall, 1),
        **{f"{k}_p50_ms": round(_pct(v, 0.5), 1) for k, v in merged.items()},
        **{f"{k}_p95_ms": round(_pct(v, 0.95), 1) for k, v in merged.items()},
        **{f"{k}_p99_ms": round(_pct(v, 0.99), 1) for k, v in merged.items()},
        "worker_errors": sum(r["error"] is not None for r in collected),
        "first_error": next((r["error"] for r in collected if r["error"]), None),
        "fail_trials": states["FAIL"],
        "left_running": states["RUNNING"] + states["WAITING"],
        "exact_budget": "yes" if states["COMPLETE"] == n_trials and states["RUNNING"] + states["WAITING"] == 0 else "no",
        "retries": sum(r["retries"] for r in collected),
        "peak_connections": peak[0],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(url: str) -> tuple[subprocess.Popen, str]:
    """``llrd-search proxy`` for ``url`` in its own process, as a fleet would run it; its grpc:// URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llrd_search", "proxy", "--storage", url, "--port", str(port)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "storage proxy for" not in line:
        proc.kill()
        raise RuntimeError(f"the proxy did not start: {line!r}")
    return proc, f"grpc://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,8,32,64", help="comma-separated M values")
    parser.add_argument("--via", default="direct", help="comma-separated: direct (each worker on PostgreSQL), proxy (through llrd-search proxy)")
    parser.add_argument("--trials-per-worker", type=int, default=0, help="default: 150 for M=1, then 25, 8, 5")
    parser.add_argument("--pool-size", type=int, default=1, help="connections each direct worker keeps open (llrd-search's default 1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    import psycopg

    from llrd_search.study.storage import quiet_optuna

    quiet_optuna()  # as llrd-search's own entry points do: no Optuna INFO line per study and trial

    admin = psycopg.connect(ADMIN.format(host=args.host, port=args.port, user=args.user), autocommit=True)
    max_conn = admin.execute("SHOW max_connections").fetchone()[0]
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.python_version()}, PostgreSQL max_connections={max_conn}, pool_size={args.pool_size}")
    rows = []
    try:
        for m in (int(x) for x in args.workers.split(",")):
            for via in args.via.split(","):
                per = args.trials_per_worker or {1: 150, 8: 25, 32: 8}.get(m, 5)
                db = f"llrd_bench_{uuid.uuid4().hex[:8]}"  # a fresh database per row
                admin.execute(f'CREATE DATABASE "{db}"')
                url = f"postgresql+psycopg://{args.user}@{args.host}:{args.port}/{db}"
                proxy = None
                try:
                    worker_url = None
                    if via == "proxy":
                        proxy, worker_url = start_proxy(url)
                    rows.append(run_one(url, admin, m, per, args.pool_size, worker_url))
                    print(json.dumps(rows[-1]), flush=True)
                finally:
                    if proxy is not None:
                        proxy.terminate()
                        proxy.wait(timeout=30)
                    admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        admin.close()
    cols = ["workers", "via", "trials", "budget", "wall_s", "trials_per_s", "ask_p50_ms", "ask_p99_ms", "report_p50_ms", "report_p99_ms",
            "tell_p50_ms", "tell_p99_ms", "worker_errors", "fail_trials", "left_running", "exact_budget", "retries", "peak_connections"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
