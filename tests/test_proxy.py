"""The storage proxy (``llrd-search proxy``, ``--storage grpc://HOST:PORT``): workers, the budget lock,
heartbeats and the read commands through it, and one-line refusals.

Each test starts the proxy in-process on a free port (port 0) and stops it at the end.
"""

from __future__ import annotations

import json

import optuna
import pytest
from _fleet import run_worker_threads, states, trials
from _pg import pg_db, pg_url  # noqa: F401
from conftest import STALE_FAST

from llrd_search.cli import main
from llrd_search.engine.space import suggest
from llrd_search.exceptions import StorageError
from llrd_search.spec import load_spec
from llrd_search.study import compat
from llrd_search.study.proxy_server import proxy_server
from llrd_search.study.storage import budget_lock, create_study, fail_stale, open_storage, opened_storage

pytest.importorskip("grpc")


@pytest.fixture
def proxy():
    """proxy(url) -> grpc://127.0.0.1:PORT serving ``url``, stopped when the test ends."""
    import contextlib

    with contextlib.ExitStack() as stack:

        def start(url: str) -> str:
            _server, port = stack.enter_context(proxy_server(url, "127.0.0.1", 0))
            return f"grpc://127.0.0.1:{port}"

        yield start


def _quick(spec):
    def objective(trial):
        suggest(trial, spec.space)
        trial.report(0.25, 1)
        return 0.5

    return objective


def test_two_workers_through_the_proxy_end_with_the_exact_budget(write_study, tmp_path, proxy):
    db = f"sqlite:///{tmp_path / 'p.db'}"
    url = proxy(db)
    path = write_study(name="proxied", n_trials=9, study={"control_fraction": 0.25})
    with opened_storage(url) as storage:
        create_study(load_spec(path), storage)
    assert run_worker_threads(url, "proxied", 2, _quick) == []
    # The budget counts both arms: 7 LLRD trials plus ceil(0.25 * 9) = 2 with ξ = 1 in the control arm.
    assert states(db, "proxied") == {"COMPLETE": 7}
    assert states(db, "proxied.control") == {"COMPLETE": 2}
    assert all(t.user_attrs["llrd:arm"] == "control" for t in trials(db, "proxied.control"))
    assert all(t.intermediate_values == {1: 0.25} for t in trials(db, "proxied"))


@pytest.mark.postgres
def test_workers_through_the_proxy_share_a_postgres_study_with_direct_ones(write_study, proxy, pg_url):  # noqa: F811
    url = proxy(pg_url)
    path = write_study(name="pg-proxied", n_trials=12, study={"control_fraction": 0.0})
    with opened_storage(pg_url) as storage:
        create_study(load_spec(path), storage)
    errors = run_worker_threads(url, "pg-proxied", 2, _quick) + run_worker_threads(pg_url, "pg-proxied", 1, _quick)
    assert errors == []
    assert states(pg_url, "pg-proxied") == {"COMPLETE": 12}


def test_the_lock_through_the_proxy_is_the_databases_lock(write_study, tmp_path, proxy):
    db = tmp_path / "lock.db"
    url = proxy(f"sqlite:///{db}")
    with opened_storage(url) as storage:
        study, _ = create_study(load_spec(write_study(name="locked", n_trials=2)), storage)
        with budget_lock(storage, compat.study_id(study)):
            # A direct process cannot take the file lock while the proxy holds it for us.
            import fcntl

            with open(f"{db}.lock", "a+") as fh, pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with budget_lock(storage, compat.study_id(study)):  # re-entrant, as directly
                pass
        with open(f"{db}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_a_dead_workers_trial_is_reaped_and_retried_through_the_proxy(write_study, tmp_path, proxy):
    db = f"sqlite:///{tmp_path / 'dead.db'}"
    url = proxy(db)
    path = write_study(name="dead", n_trials=2, study=STALE_FAST)
    spec = load_spec(path)
    with opened_storage(url) as storage:
        create_study(spec, storage)
    storage = open_storage(url, spec)
    study = optuna.load_study(study_name="dead", storage=storage)
    trial = study.ask({"decay": optuna.distributions.FloatDistribution(0.5, 1.0)})
    storage.record_heartbeat(compat.trial_id(trial))
    # Backdate the heartbeat in the database: the proxy's stale query must see it as expired.
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = :i"), {"i": compat.trial_id(trial)})
    engine.dispose()
    assert fail_stale(study) == [trial.number]
    storage.close()
    failed = [t for t in trials(db, "dead") if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [trial.number]
    retry = [t for t in trials(db, "dead") if t.system_attrs.get("failed_trial") == trial.number]
    assert [t.state.name for t in retry] == ["WAITING"] and retry[0].params == trial.params


def test_status_report_and_export_read_through_the_proxy(write_study, tmp_path, proxy, capsys):
    db = f"sqlite:///{tmp_path / 'read.db'}"
    url = proxy(db)
    path = write_study(name="readme", n_trials=4, study={"control_fraction": 0.0})
    with opened_storage(url) as storage:
        create_study(load_spec(path), storage)
    assert run_worker_threads(url, "readme", 1, _quick) == []
    capsys.readouterr()
    assert main(["status", "--storage", url, "--study", "readme", "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["finished"] == 4 and status["storage"] == url
    assert main(["export", "--storage", url, "--study", "readme", "--out", str(tmp_path / "best.json")]) == 0
    exported = json.loads((tmp_path / "best.json").read_text())
    assert exported["study"] == "readme" and exported["storage"] == url and 0.5 <= exported["decay"] <= 1.0
    assert exported["proxied_storage"] == db  # what the proxy serves, beside grpc://...
    assert main(["report", "--storage", url, "--study", "readme", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "summary.md").exists()


def test_no_proxy_or_a_plain_optuna_proxy_is_refused_in_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["status", "--storage", f"grpc://127.0.0.1:{free}", "--study", "x"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no proxy answers at grpc://127.0.0.1:{free}" in err and "llrd-search proxy" in err

    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    rdb = open_storage(f"sqlite:///{tmp_path / 'plain.db'}")
    compat.grpc_storage_servicer(optuna.storages.get_storage(rdb), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(StorageError, match="plain Optuna proxy: llrd-search needs its budget lock"):
            open_storage(f"grpc://127.0.0.1:{port}")
    finally:
        server.stop(0).wait()
        rdb.engine.dispose()


@pytest.mark.parametrize("url", ["grpc://nohost", "grpc://h:12/x", "grpc://:13000"])
def test_a_malformed_proxy_url_is_named(url):
    with pytest.raises(StorageError, match="is not a proxy URL"):
        open_storage(url)


def test_the_proxy_serves_a_database_not_another_proxy(capsys):
    assert main(["proxy", "--storage", "grpc://127.0.0.1:13000", "--port", "0"]) != 0
    assert "serves a database URL" in capsys.readouterr().err


def test_a_second_proxy_on_a_busy_port_is_refused_naming_the_port_and_its_holder(tmp_path, capsys, monkeypatch):
    import os

    from llrd_search.study import proxy_server as server

    with proxy_server(f"sqlite:///{tmp_path / 'first.db'}", "127.0.0.1", 0) as (_server, port):
        second = f"sqlite:///{tmp_path / 'second.db'}"
        assert main(["proxy", "--storage", second, "--port", str(port)]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err
        assert f"held by process {os.getpid()}" in err and "pick another --port" in err
        assert not (tmp_path / "second.db").exists()  # refused before the database was opened
        # Without the check in front, gRPC itself refuses the port (no SO_REUSEPORT): never two listeners.
        monkeypatch.setattr(server, "_refuse_busy_port", lambda host, port: None)
        busy = f"cannot listen on 127.0.0.1:{port}, held by process {os.getpid()}"
        with pytest.raises(StorageError, match=busy), proxy_server(second, "127.0.0.1", port):
            pass


def test_a_lease_its_holder_did_not_release_in_time_is_taken_back(tmp_path, monkeypatch):
    from llrd_search.study import proxy as client
    from llrd_search.study import proxy_server as server

    rdb = open_storage(f"sqlite:///{tmp_path / 'lease.db'}")
    leases = server._Leases(rdb)
    try:
        first = leases.acquire(1)["token"]
        monkeypatch.setattr(server, "WAIT_SECONDS", 0.0)
        assert leases.acquire(1) == {"token": None, "busy": False}  # held, and the lease still runs
        monkeypatch.setattr(client, "LEASE_SECONDS", 0.0)
        leases.release(1, first)
        stale = leases.acquire(1)["token"]  # this lease expires at once
        second = leases.acquire(1)["token"]  # so the next caller takes it back
        assert second not in (None, stale)
        assert leases.release(1, stale) == {"held": False}  # its late holder is told
        assert leases.release(1, second) == {"held": True}
    finally:
        leases.close()
        rdb.engine.dispose()


def test_a_restarted_proxy_is_ridden_out(tmp_path):
    import threading

    from llrd_search.study.resilience import RETRY_STATS, is_transient

    db = f"sqlite:///{tmp_path / 'restart.db'}"
    with proxy_server(db, "127.0.0.1", 0) as (_server, port):
        storage = open_storage(f"grpc://127.0.0.1:{port}")
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "before")
    # The proxy is gone: a call now fails as an outage (not a wrong URL) and is retried until it is back.
    before, result = RETRY_STATS["retries"], []
    caller = threading.Thread(target=lambda: result.append(storage.get_study_id_from_name("before")))
    caller.start()
    caller.join(timeout=1.0)
    assert caller.is_alive()  # waiting for the proxy, not failed
    with proxy_server(db, "127.0.0.1", port):
        caller.join(timeout=60)
    storage.close()
    assert result == [1] and RETRY_STATS["retries"] > before

    class Unavailable(Exception):
        def code(self):
            import grpc

            return grpc.StatusCode.UNAVAILABLE

    assert is_transient(Unavailable()) and not is_transient(KeyError("no such study"))


def test_run_with_a_child_worker_and_confirm_through_the_proxy(write_study, tmp_path, proxy, capsys):
    db = f"sqlite:///{tmp_path / 'both.db'}"
    url = proxy(db)
    path = write_study(name="both", n_trials=3, study={"control_fraction": 0.34})
    # Worker 0 in this process, worker 1 an `llrd-search worker --storage grpc://...` child process.
    assert main(["run", str(path), "--storage", url, "--workers", "2"]) == 0
    assert states(db, "both") == {"COMPLETE": 2} and states(db, "both.control") == {"COMPLETE": 1}
    capsys.readouterr()
    assert main(["confirm", "--storage", url, "--study", "both", "--top", "1", "--seeds", "2", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"]["n"] == 2 and result["llrd_vs_control"]["n_seeds"] == 2
    assert states(db, "both.confirm") == {"COMPLETE": 4}


def test_without_grpcio_a_proxy_url_names_the_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    with pytest.raises(StorageError, match=r"need grpcio: pip install 'llrd-search\[grpc\]'"):
        open_storage("grpc://127.0.0.1:13000")
