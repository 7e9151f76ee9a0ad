"""The storage proxy, worker side: ``--storage grpc://HOST:PORT`` (the proxy itself: proxy_server.py).

One process (``llrd-search proxy``) holds the database connections, hundreds of workers talk gRPC to it.

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
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.exceptions import StorageError

log = logging.getLogger(__name__)

SCHEME = "grpc://"
FLEET = "llrd_search.Fleet"
LEASE_SECONDS = 30.0  # a locked section takes milliseconds; a dead holder stalls the study this long at most
GRPC_MISSING = "grpc:// storages and 'llrd-search proxy' need grpcio: pip install 'llrd-search[grpc]'"


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def require_grpc() -> Any:
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


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw.decode())


def _proxy_class() -> type:
    from optuna.storages import GrpcStorageProxy

    from llrd_search.study.resilience import RETRY_SECONDS, retrying, with_retries

    @with_retries(GrpcStorageProxy)
    class ProxyStorage(GrpcStorageProxy):
        """Optuna's ``GrpcStorageProxy`` plus the fleet calls, every call riding out a restarting proxy.

        ``heartbeat_interval``, ``grace_period`` and the stale-trial callback come from the study's
        spec (as ``storage.open_storage`` gives them to a database storage)."""

        is_llrd_proxy = True  # what resilience.is_proxied reads, without importing this module

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
                call = self._calls[name] = self._channel.unary_unary(f"/{FLEET}/{name}", request_serializer=dumps, response_deserializer=loads)
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
    from llrd_search.study.resilience import is_proxied

    return is_proxied(storage)


def open_proxy(url: str, heartbeat: dict[str, Any], *, patient: bool = False) -> Any:
    """A client of the llrd-search proxy at ``url``; one line naming why when none answers there."""
    grpc = require_grpc()
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
