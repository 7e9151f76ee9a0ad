"""The storage proxy, proxy side: ``llrd-search proxy --storage URL`` (the worker side: proxy.py).

Optuna's gRPC storage service for the database, plus the ``llrd_search.Fleet`` service (JSON
messages, on the same port) with what a worker runs as SQL beside the storage API: the budget lock
(as a lease), heartbeats, the stale-trial query and state counts, run on the database by the same
code a direct worker runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.exceptions import StorageError
from llrd_search.study import proxy as client
from llrd_search.study.proxy import FLEET, dumps, is_proxy_url, loads, require_grpc

log = logging.getLogger(__name__)

WAIT_SECONDS = 2.0  # one Lock call waits this long in the proxy, then the client asks again
# A worker waiting for the budget lock waits in one of these threads (cheaply: on a condition), so
# there are more than a large fleet has workers; a full waiting room answers "busy" and the client
# asks again a moment later.
SERVER_THREADS = 512
WAITING_ROOM = SERVER_THREADS - 64  # the rest serve the lock holder's and everyone else's calls
DB_POOL = 16  # connections the proxy keeps to the database, whatever the number of workers


class _Leases:
    """Budget locks held for clients, one per lock scope (a study on PostgreSQL, the file on SQLite)."""

    def __init__(self, rdb: optuna.storages.RDBStorage):
        from sqlalchemy.engine import make_url

        self.rdb, self.url = rdb, make_url(rdb.url)
        self.per_study = self.url.get_backend_name() == "postgresql"
        self._mutex = threading.Lock()
        self._conds: dict[int | None, threading.Condition] = {}  # one per lock scope, all on _mutex
        self._held: dict[int | None, tuple[str, float, contextlib.ExitStack | None]] = {}
        self._waiters = threading.BoundedSemaphore(WAITING_ROOM)

    def acquire(self, study_id: int) -> dict[str, Any]:
        from llrd_search.study.resilience import acquired_lock

        if not self._waiters.acquire(blocking=False):
            return {"token": None, "busy": True}
        key = study_id if self.per_study else None
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            cond = self._cond(key)
            with cond:
                while key in self._held:
                    _token, expires, _stack = self._held[key]
                    now = time.monotonic()
                    if now >= expires:
                        log.warning("budget lock of study %s: its holder did not release it within %.0fs (died?); taken back", study_id, client.LEASE_SECONDS)
                        self._drop(key)
                        break
                    if now >= deadline:
                        cond.notify()  # a wake-up this thread may have taken as it timed out goes on
                        return {"token": None, "busy": False}
                    cond.wait(min(deadline, expires) - now)
                token = uuid.uuid4().hex
                self._held[key] = (token, float("inf"), None)  # reserved while the database lock is taken
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(acquired_lock(self.rdb, study_id))
            except BaseException:
                with cond:
                    self._held.pop(key, None)
                    cond.notify()
                raise
            with cond:
                self._held[key] = (token, time.monotonic() + client.LEASE_SECONDS, stack)
            return {"token": token}
        finally:
            self._waiters.release()

    def release(self, study_id: int, token: str) -> dict[str, Any]:
        key = study_id if self.per_study else None
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != token:
                return {"held": False}
            self._drop(key)
            return {"held": True}

    def _drop(self, key: int | None) -> None:
        _token, _expires, stack = self._held.pop(key)
        if stack is not None:
            stack.close()
        # One waiter, not all: hundreds waking on every release would be a thundering herd. Whoever
        # takes the lock next notifies the next one on its release.
        self._cond(key).notify()

    def _cond(self, key: int | None) -> threading.Condition:
        return self._conds.setdefault(key, threading.Condition(self._mutex))

    def close(self) -> None:
        with self._mutex:
            for key in list(self._held):
                self._drop(key)


class _Fleet:
    """The ``llrd_search.Fleet`` calls, each run on the proxy's own database storage."""

    def __init__(self, rdb: optuna.storages.RDBStorage):
        from sqlalchemy.engine import make_url

        self.rdb, self.leases = rdb, _Leases(rdb)
        self.backend = make_url(rdb.url).get_backend_name()

    def hello(self, _req: dict) -> dict:
        from llrd_search import __version__
        from llrd_search.study.urls import mask_url

        return {"service": "llrd-search", "version": __version__, "backend": self.backend, "per_study_lock": self.leases.per_study,
                "storage": mask_url(self.rdb.url)}  # what it serves, for records (export); never a password

    def counts(self, req: dict) -> dict:
        from llrd_search.study.resilience import count_states

        return {s.name: n for s, n in count_states(self.rdb, req["study_id"]).items()}

    def beat(self, req: dict) -> dict:
        self.rdb.record_heartbeat(req["trial_id"])  # retried through a database restart, as every call here
        return {}

    def stale(self, req: dict) -> dict:
        from llrd_search.study.resilience import stale_trial_ids

        running = self.rdb.get_all_trials(req["study_id"], deepcopy=False, states=(TrialState.RUNNING,))
        ids = stale_trial_ids(self.rdb, req["study_id"], running, req["heartbeat_interval"], req["grace_period"])
        return {"trial_ids": sorted(ids)}

    def lock(self, req: dict) -> dict:
        return self.leases.acquire(req["study_id"])

    def unlock(self, req: dict) -> dict:
        return self.leases.release(req["study_id"], req["token"])

    def handler(self) -> Any:
        grpc = require_grpc()
        methods = {"Hello": self.hello, "Counts": self.counts, "Beat": self.beat, "Stale": self.stale, "Lock": self.lock, "Unlock": self.unlock}
        return grpc.method_handlers_generic_handler(
            FLEET,
            {name: grpc.unary_unary_rpc_method_handler(_served(fn), request_deserializer=loads, response_serializer=dumps) for name, fn in methods.items()},
        )


def _served(fn: Callable[[dict], dict]) -> Callable[[dict, Any], dict]:
    def call(request: dict, context: Any) -> dict:
        grpc = require_grpc()
        try:
            return fn(request)
        except Exception as err:  # one line back to the worker, which names it; the proxy keeps serving
            log.warning("%s failed: %s: %s", fn.__name__, type(err).__name__, err)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"[:500])

    return call


@contextlib.contextmanager
def proxy_server(url: str, host: str = "127.0.0.1", port: int = 13000) -> Iterator[tuple[Any, int]]:
    """A started gRPC server for the SQL storage ``url`` (Optuna's storage service plus the fleet
    service) and the port it listens on (``port`` 0 picks a free one); stopped and closed on leaving."""
    from llrd_search.study.compat import grpc_storage_servicer
    from llrd_search.study.storage import close_storage, open_storage

    grpc = require_grpc()
    if is_proxy_url(url):
        raise StorageError(f"--storage: '{url}' is a proxy; 'llrd-search proxy' serves a database URL (postgresql+psycopg://... or sqlite:///...)")
    if port:
        _refuse_busy_port(host, port)
    rdb = open_storage(url, pool_size=DB_POOL)
    fleet = _Fleet(rdb)
    # gRPC sets SO_REUSEPORT by default: a second proxy on the same port would then start and the
    # kernel would split the workers between two databases.
    server = grpc.server(
        ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="llrd-proxy"), options=[("grpc.so_reuseport", 0)]
    )
    # Optuna's cache layer in front, as its run_grpc_proxy_server documents: GetTrials sends only what changed.
    grpc_storage_servicer(optuna.storages.get_storage(rdb), server)
    server.add_generic_rpc_handlers((fleet.handler(),))
    try:
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        close_storage(rdb)
        raise StorageError(f"--port: cannot listen on {host}:{port}{_held_by(port)}; stop that process or pick another --port")
    server.start()
    try:
        yield server, bound
    finally:
        server.stop(grace=2).wait()
        fleet.leases.close()
        close_storage(rdb)


def _refuse_busy_port(host: str, port: int) -> None:
    """Raise naming the port (and the process listening on it, when it can be found) if it is taken,
    before the database is opened; a plain bind, as the gRPC server will do without SO_REUSEPORT."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise StorageError(f"--host: cannot resolve '{host}' ({err}); pass an address such as 127.0.0.1 or 0.0.0.0") from None
    for family, kind, proto, _name, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed port in TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as err:
                why = "in use" if err.errno == errno.EADDRINUSE else err.strerror
                raise StorageError(f"--port: port {port} on {host} is {why}{_held_by(port)}; stop it or pick another --port") from None


def _held_by(port: int) -> str:
    """", held by PID NAME (CMDLINE)" for the process listening on ``port``, "" if it cannot be told
    (psutil missing, or the process belongs to another user)."""
    try:
        import psutil
    except ImportError:
        return ""
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    except (psutil.Error, OSError):
        return ""
    for pid in sorted(p for p in pids if p):
        try:
            proc = psutil.Process(pid)
            return f", held by process {pid} ({' '.join(proc.cmdline())[:160] or proc.name()})"
        except psutil.Error:
            return f", held by process {pid}"
    return ""


NO_AUTH_WARNING = (
    "warning: the proxy has no login or TLS: whoever reaches {host}:{port} can read and change every study "
    "in the storage; keep it on a private network (or bind 127.0.0.1 and tunnel: ssh -L {port}:127.0.0.1:{port} HOST)"
)


def serve(url: str, host: str = "127.0.0.1", port: int = 13000, *, say: Callable[[str], None] = print) -> None:
    """Serve ``url`` until interrupted, after saying where and how workers join (no password shown)."""
    from llrd_search.results.dashboard import is_loopback
    from llrd_search.study.urls import where

    if not is_loopback(host):
        say(NO_AUTH_WARNING.format(host=host, port=port))
    with proxy_server(url, host, port) as (server, bound):
        shown = f"[{host}]" if ":" in host else host
        say(f"storage proxy for {where(url)} at grpc://{shown}:{bound}  (Ctrl-C stops it)")
        say(f"workers join with: llrd-search worker --storage grpc://{shown}:{bound} --study NAME")
        server.wait_for_termination()
