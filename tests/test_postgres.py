"""PostgreSQL as the shared store: a fresh database per session on 127.0.0.1:5432 (see _pg.py).

These run in CI; an unreachable server fails them (LLRD_SKIP_POSTGRES=1 skips them on purpose).
"""

from __future__ import annotations

import threading
import time
import zlib

import pytest
from _fleet import finish, run_worker_threads, spawn, states, trials, wait_for
from _pg import ensure_server_running, pg_db, pg_url, private_server, restart_server, url_for  # noqa: F401 (fixtures)
from conftest import write_toy_dataset
from sqlalchemy import text

from llrd_search.cli import main
from llrd_search.engine.objective import suggest
from llrd_search.spec import load_spec
from llrd_search.study import compat
from llrd_search.study.storage import budget_lock, create_study, open_storage
from llrd_search.study.worker import run_worker

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("small"), n_train=64, n_val=16)


def test_run_on_postgres(write_study, pg_url, small):  # noqa: F811
    study = write_study(name="pg-run", n_trials=2, data=small)
    assert main(["run", str(study), "--storage", pg_url]) == 0
    assert states(pg_url, "pg-run") == {"COMPLETE": 2}


def test_many_threads_finish_the_exact_budget(write_study, pg_url):  # noqa: F811
    path = write_study(name="pg-threads", n_trials=24)
    create_study(load_spec(path), open_storage(pg_url))
    def factory(spec):
        def objective(trial):
            suggest(trial, spec.space)
            time.sleep(0.02)
            return 0.5

        return objective

    assert run_worker_threads(pg_url, "pg-threads", 6, factory) == []
    assert states(pg_url, "pg-threads") == {"COMPLETE": 24}


def test_budget_lock_is_held_and_released_when_the_holder_is_interrupted(write_study, pg_url):  # noqa: F811
    path = write_study(name="pg-lock", n_trials=1)
    study, _ = create_study(load_spec(path), open_storage(pg_url))
    key = zlib.crc32(f"llrd-search:{compat.study_id(study)}".encode())
    storage, other = open_storage(pg_url), open_storage(pg_url)

    def free() -> bool:
        with other.engine.connect() as conn:
            return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar())

    with pytest.raises(KeyboardInterrupt), budget_lock(storage, compat.study_id(study)):
        assert not free()  # held while inside
        raise KeyboardInterrupt
    assert free()  # released with its transaction
    storage.engine.dispose()
    other.engine.dispose()


def test_postgres_restart_mid_search_the_study_completes(write_study, pg_url, small, tmp_path):  # noqa: F811
    name = "pg-restart"
    # The default grace (30 s): the restart (a second or two) must be ridden out, not turned into reaped trials.
    path = write_study(name=name, n_trials=6, train={"epochs": 25}, data=small)
    assert main(["create", str(path), "--storage", pg_url]) == 0
    procs = [spawn(["worker", "--storage", pg_url, "--study", name, "--worker-index", str(i), "--threads", "1"], tmp_path / f"w{i}.log") for i in range(2)]
    try:
        wait_for(lambda: (s := states(pg_url, name))["COMPLETE"] >= 1 and s["RUNNING"] >= 1, 180, "one finished and one running trial")
        in_flight = {t.number for t in trials(pg_url, name) if t.state.name == "RUNNING"}
        restart_server()
        assert finish(procs, 240) == [0, 0]
    finally:
        ensure_server_running()
        for p in procs:
            p.kill()
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "Traceback" not in logs
    assert states(pg_url, name) == {"COMPLETE": 6}
    # The trials running through the restart finished themselves (no reap, no retry).
    assert {t.number: t.state.name for t in trials(pg_url, name) if t.number in in_flight} == dict.fromkeys(in_flight, "COMPLETE")
    assert sorted(t.number for t in trials(pg_url, name)) == list(range(6))


def test_too_many_clients_is_waited_out_not_fatal(write_study):
    """A full server ("sorry, too many clients already") delays a joining worker instead of killing it."""
    import psycopg

    with private_server("max_connections=3", "superuser_reserved_connections=0") as port:
        url = url_for("postgres", port=port)
        path = write_study(name="full", n_trials=3)
        storage = open_storage(url)
        create_study(load_spec(path), storage)
        storage.engine.dispose()
        hogs = [psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") for _ in range(3)]
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        release = threading.Timer(2.0, lambda: [h.close() for h in hogs])
        release.start()

        def factory(spec):
            return lambda trial: suggest(trial, spec.space) and 0.5

        assert run_worker(url, "full", objective_factory=factory) == 3
        release.join()
        assert states(url, "full") == {"COMPLETE": 3}
