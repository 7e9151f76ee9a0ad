"""The storage proxy: one process holds the database connections, hundreds of workers talk gRPC to it.

Optuna's gRPC proxy (``run_grpc_proxy_server`` and ``GrpcStorageProxy``, Optuna >= 4.2) forwards the
storage API, but not what a llrd-search fleet uses beside it: the study-wide budget lock, heartbeats
and the stale-trial query, and one-query state counts, which are SQL. ``llrd-search proxy`` serves
them as a second gRPC service (``llrd_search.Fleet``, JSON messages) on the same port, run on the
real database by the same code a direct worker runs, so direct and proxied workers can share a study.

The budget lock through the proxy is a lease: the proxy takes the study's real lock (PostgreSQL
advisory lock, SQLite lock file) for the client and lets it go on release, or after
``LEASE_SECONDS`` when the client died holding it. Exact, unless a client stalls longer than that
inside the milliseconds-long section (docs/scaling.md says what then happens).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.exceptions import StorageError

log = logging.getLogger(__name__)

SCHEME = "grpc://"
FLEET = "llrd_search.Fleet"
LEASE_SECONDS = 30.0  # a locked section takes milliseconds; a dead holder stalls the study this long at most
WAIT_SECONDS = 2.0  # one Lock call waits this long in the proxy, then the client asks again
# A worker waiting for the budget lock waits in one of these threads (cheaply: on a condition), so
# there are more than a large fleet has workers; a full waiting room answers "busy" and the client
# asks again a moment later.
SERVER_THREADS = 512
WAITING_ROOM = SERVER_THREADS - 64  # the rest serve the lock holder's and everyone else's calls
DB_POOL = 16  # connections the proxy keeps to the database, whatever the number of workers
GRPC_MISSING = "grpc:// storages and 'llrd-search proxy' need grpcio: pip install 'llrd-search[grpc]'"


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def _grpc() -> Any:
    try:
        import grpc
    except ImportError:
        raise StorageError(GRPC_MISSING) from None
    return grpc


def host_port(url: str) -> tuple[str, int]:
    """(host, port) of ``grpc://HOST:PORT``."""
    rest = url.removeprefix(SCHEME).rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in rest:
        raise StorageError(f"--storage: '{url}' is not a proxy URL (grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000)")
    return host.strip("[]"), int(port)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _loads(raw: bytes) -> Any:
    return json.loads(raw.decode())


# --------------------------------------------------------------------------- proxy side


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
                        log.warning("budget lock of study %s: its holder did not release it within %.0fs (died?); taken back", study_id, LEASE_SECONDS)
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
                self._held[key] = (token, time.monotonic() + LEASE_SECONDS, stack)
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

        return {"service": "llrd-search", "version": __version__, "backend": self.backend, "per_study_lock": self.leases.per_study}

    def counts(self, req: dict) -> dict:
        from llrd_search.study.resilience import count_states

        return {s.name: n for s, n in count_states(self.rdb, req["study_id"]).items()}

    def beat(self, req: dict) -> dict:
        optuna.storages.RDBStorage.record_heartbeat(self.rdb, req["trial_id"])
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
        grpc = _grpc()
        methods = {"Hello": self.hello, "Counts": self.counts, "Beat": self.beat, "Stale": self.stale, "Lock": self.lock, "Unlock": self.unlock}
        return grpc.method_handlers_generic_handler(
            FLEET,
            {name: grpc.unary_unary_rpc_method_handler(_served(fn), request_deserializer=_loads, response_serializer=_dumps) for name, fn in methods.items()},
        )


def _served(fn: Callable[[dict], dict]) -> Callable[[dict, Any], dict]:
    def call(request: dict, context: Any) -> dict:
        grpc = _grpc()
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

    grpc = _grpc()
    if is_proxy_url(url):
        raise StorageError(f"--storage: '{url}' is a proxy; 'llrd-search proxy' serves a database URL (postgresql+psycopg://... or sqlite:///...)")
    rdb = open_storage(url, pool_size=DB_POOL)
    fleet = _Fleet(rdb)
    server = grpc.server(ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="llrd-proxy"))
    # Optuna's cache layer in front, as its run_grpc_proxy_server documents: GetTrials sends only what changed.
    grpc_storage_servicer(optuna.storages.get_storage(rdb), server)
    server.add_generic_rpc_handlers((fleet.handler(),))
    try:
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        close_storage(rdb)
        raise StorageError(f"--host/--port: cannot listen on {host}:{port} (in use?); pick another --port")
    server.start()
    try:
        yield server, bound
    finally:
        server.stop(grace=2).wait()
        fleet.leases.close()
        close_storage(rdb)


# --------------------------------------------------------------------------- worker side


def _proxy_class() -> type:
    from optuna.storages import GrpcStorageProxy

    from llrd_search.study.resilience import RETRY_SECONDS, retrying, with_retries

    @with_retries(GrpcStorageProxy)
    class ProxyStorage(GrpcStorageProxy):
        """Optuna's ``GrpcStorageProxy`` plus the fleet calls, every call riding out a restarting proxy.

        ``heartbeat_interval``, ``grace_period`` and the stale-trial callback come from the study's
        spec (as ``storage.open_storage`` gives them to a database storage)."""

        retry_seconds = RETRY_SECONDS

        def __init__(self, url: str, heartbeat: dict[str, Any]):
            host, port = host_port(url)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                super().__init__(host=host, port=port)
            self.url = url
            self.heartbeat_interval = heartbeat.get("heartbeat_interval")
            self.grace_period = heartbeat.get("grace_period")
            self._stale_callback = heartbeat.get("heartbeat_stale_trial_callback")
            self._calls: dict[str, Any] = {}
            self.info: dict[str, Any] = {}

        def _setup(self) -> None:
            super()._setup()
            self._calls = {}

        def fleet(self, name: str, request: dict, *, retried: bool = True) -> dict:
            call = self._calls.get(name)
            if call is None:
                call = self._calls[name] = self._channel.unary_unary(f"/{FLEET}/{name}", request_serializer=_dumps, response_deserializer=_loads)
            return retrying(call, lambda: self.retry_seconds)(request) if retried else call(request)

        def count_states(self, study_id: int) -> dict[TrialState, int]:
            counts = self.fleet("Counts", {"study_id": study_id})
            return {s: int(counts.get(s.name, 0)) for s in TrialState}

        def stale_trial_ids(self, study_id: int) -> set[int]:
            request = {"study_id": study_id, "heartbeat_interval": self.heartbeat_interval, "grace_period": self.grace_period}
            return set(self.fleet("Stale", request)["trial_ids"])

        def record_heartbeat(self, trial_id: int, *, retried: bool = True) -> None:
            self.fleet("Beat", {"trial_id": trial_id}, retried=retried)

        def get_heartbeat_stale_trial_callback(self) -> Callable | None:
            return self._stale_callback

        def lock_token(self, study_id: int) -> tuple:
            """What makes a nested lock re-entrant: on SQLite one lock guards the whole file."""
            return (self.url, study_id if self.info.get("per_study_lock") else None)

        @contextlib.contextmanager
        def budget_lock(self, study_id: int) -> Iterator[None]:
            token = None
            while token is None:
                reply = self.fleet("Lock", {"study_id": study_id})
                token = reply.get("token")
                if token is None and reply.get("busy"):
                    time.sleep(random.uniform(0.02, 0.1))  # the proxy's waiting room is full
            try:
                yield
            finally:
                if not self.fleet("Unlock", {"study_id": study_id, "token": token})["held"]:
                    log.warning(
                        "the budget lock of study %d was taken back by the proxy (held over %.0fs, or the proxy restarted): "
                        "the study may run one trial over its budget", study_id, LEASE_SECONDS,
                    )

        def remove_session(self) -> None:
            """Nothing to give back (a database storage returns its thread's connection here)."""

    return ProxyStorage


_CLASS: list[type] = []


def proxy_class() -> type:
    """The ``ProxyStorage`` class (made on first use: it subclasses Optuna's gRPC client)."""
    if not _CLASS:
        _CLASS.append(_proxy_class())
    return _CLASS[0]


def is_proxy(storage: Any) -> bool:
    return bool(_CLASS) and isinstance(storage, _CLASS[0])


def open_proxy(url: str, heartbeat: dict[str, Any], *, patient: bool = False) -> Any:
    """A client of the llrd-search proxy at ``url``; one line naming why when none answers there."""
    grpc = _grpc()
    storage = proxy_class()(url, heartbeat)
    from llrd_search.study.resilience import RETRY_SECONDS

    try:
        storage.wait_server_ready(timeout=RETRY_SECONDS if patient else 10.0)
        storage.info = storage.fleet("Hello", {}, retried=False)
    except ConnectionError:
        storage.close()
        raise StorageError(f"--storage: no proxy answers at {url} (start one: llrd-search proxy --storage DATABASE_URL --port {host_port(url)[1]})") from None
    except grpc.RpcError as err:
        storage.close()
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise StorageError(
                f"--storage: {url} is a plain Optuna proxy: llrd-search needs its budget lock, heartbeats and state counts, "
                "which only 'llrd-search proxy --storage DATABASE_URL' serves"
            ) from None
        raise StorageError(f"--storage: the proxy at {url} failed: {err.code().name}: {err.details()}") from None
    return storage


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
