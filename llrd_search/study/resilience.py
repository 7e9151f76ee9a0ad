"""Riding out faults: storage outages, dead workers, and the study-wide budget lock.

- :class:`ResilientRDBStorage` retries a storage call through a database restart, a dropped
  connection or "too many clients" instead of killing the worker (``storage.open_storage`` still
  fails fast on a wrong URL, host or password: those are not outages);
- :func:`fail_stale` turns a dead worker's trial into FAIL and :func:`retry_stale_trial` re-queues
  it with the same parameters;
- :func:`budget_lock` serialises "is a slot free? then ask" across every worker of a study.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from llrd_search.exceptions import StorageError
from llrd_search.study.compat import (
    CACHE_PRIVATE_METHODS,
    backend_of,
    heartbeat_table,
    stale_ids,
    study_id,
    trial_id,
    trial_table,
)
from llrd_search.vocab import ATTR_PREFIX, RETRY_OF_ATTR, SEED_ATTR, SPEC_ATTR, training_seed

log = logging.getLogger(__name__)

# How long a worker rides out an unreachable storage before giving up: a PostgreSQL restart takes
# seconds, a managed failover about a minute.
RETRY_SECONDS = 120.0
RETRY_STATS = {"retries": 0}  # process-wide count, read by bench/storage_load.py


def is_transient(err: BaseException | None) -> bool:
    """A lost connection, a restarting server, "too many clients", a locked SQLite file, a pool timeout.
    Not a read-only SQLite file: waiting does not make it writable."""
    if is_read_only(err):
        return False
    while err is not None:
        if _grpc_code(err) in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):  # the proxy restarting or full
            return True
        if isinstance(err, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
            return True
        if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
            return True
        err = err.__cause__
    return False


def _grpc_code(err: BaseException) -> str | None:
    code = getattr(err, "code", None)  # grpc.RpcError, without importing grpc
    if not callable(code):
        return None
    try:
        return getattr(code(), "name", None)
    except Exception:
        return None


def is_read_only(err: BaseException | None) -> bool:
    """SQLite's "attempt to write a readonly database" (the file, or its folder, is not writable)."""
    while err is not None:
        if "readonly database" in str(getattr(err, "orig", None) or err):
            return True
        err = err.__cause__
    return False


def read_only_message(url: str) -> str:
    path = make_url(url).database
    return (
        f"--storage: SQLite file {path} is read-only, and llrd-search writes to it even to read it "
        f"(WAL journal, heartbeats): make it and its folder writable (chmod u+w {path}) or copy it to a writable folder"
    )


def _root_name(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return type(err).__name__  # the name only: driver messages can quote connection details


_nesting = threading.local()


def is_proxied(storage: Any) -> bool:
    """Whether ``storage`` is a client of ``llrd-search proxy`` (study/proxy.py's ProxyStorage), which
    carries the budget lock, heartbeats and counts over gRPC instead of SQL."""
    return bool(getattr(storage, "is_llrd_proxy", False))


def retrying(call: Callable[..., Any], seconds: Callable[[], float]) -> Callable[..., Any]:
    """Retry ``call`` on transient storage errors with jittered backoff for up to ``seconds()``.
    Only the outermost storage call retries, so nested calls do not multiply the wait."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_nesting, "depth", 0):
            return call(*args, **kwargs)
        deadline = time.monotonic() + seconds()
        delay = 0.2
        _nesting.depth = 1
        try:
            while True:
                try:
                    return call(*args, **kwargs)
                except Exception as err:
                    if not is_transient(err) or time.monotonic() + delay > deadline:
                        raise
                    RETRY_STATS["retries"] += 1
                    log.warning("storage unavailable (%s); retrying in %.1fs", _root_name(err), delay)
                time.sleep(delay)
                delay = min(5.0, delay * 2) * random.uniform(0.8, 1.2)
        finally:
            _nesting.depth = 0

    return wrapper


_NOT_RETRIED = {"remove_session", "close", "wait_server_ready", "upgrade", "get_current_version", "get_head_version", "get_all_versions"}
# Private methods Optuna's cache layer (which every Study wraps around the storage) calls directly.
_PRIVATE_RETRIED = set(CACHE_PRIVATE_METHODS)


def with_retries(*bases: type) -> Callable[[type], type]:
    """Wrap every public storage method of ``bases`` (and the private ones the cache layer calls)
    of the decorated class in :func:`retrying`."""

    def decorate(cls: type) -> type:
        names = {n for base in (*bases, optuna.storages.BaseStorage) for n in vars(base)}
        for name in sorted(names):
            func = getattr(cls, name)
            if not callable(func) or name.startswith("__") or name in _NOT_RETRIED or (name.startswith("_") and name not in _PRIVATE_RETRIED):
                continue
            setattr(cls, name, _bind(func))
        return cls

    return decorate


def _bind(f: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return retrying(functools.partial(f, self), lambda: self.retry_seconds)(*args, **kwargs)
        except Exception as err:
            if is_read_only(err):
                raise StorageError(read_only_message(self.url)) from err
            raise

    return functools.wraps(f)(call)


@with_retries(optuna.storages.RDBStorage)
class ResilientRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose calls ride out a restart or a dropped connection instead of killing the worker.

    A retried write whose first attempt did commit (connection lost after COMMIT) is possible but
    harmless here: a duplicated RUNNING trial is reaped as heartbeat-less (:func:`fail_stale`), and
    telling an already finished trial is skipped by the worker.
    """

    retry_seconds = RETRY_SECONDS


def retry_stale_trial(max_retries: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], bool]:
    """Re-queue a dead worker's trial as WAITING with the same params, at most ``max_retries`` times.

    Like Optuna's ``RetryHeartbeatStaleTrialCallback`` (same ``failed_trial`` / ``retry_history``
    system attrs, so its static helpers work), but the copy does not inherit the dead run's
    outcome attrs (fail_reason, worker, partial evals): only what was set before it started.
    The callback returns whether it re-queued (False: retries exhausted); Optuna ignores the value.
    """

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > max_retries:
            return False
        system_attrs = {**trial.system_attrs, "failed_trial": history[0], "retry_history": history}
        user_attrs = {k: v for k, v in trial.user_attrs.items() if k.startswith(ATTR_PREFIX)}
        user_attrs[RETRY_OF_ATTR] = trial.number
        seed = lost_seed(study, trial)
        if seed is not None:  # the lost trial's training seed: a retry is a rerun, not another draw
            user_attrs[SEED_ATTR] = seed
        study.add_trial(
            optuna.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
            )
        )
        return True

    callback.max_retries = max_retries  # fail_stale names the limit in its log line
    return callback


def lost_seed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int | None:
    """The training seed ``trial`` used, or would have used had it reached training: the one it
    was queued with, else the one it recorded, else the built-in loop's ``study.seed +
    trial_seed_offset + number`` from the spec stored in its study (None: not an llrd-search study)."""
    if isinstance(trial.user_attrs.get(SEED_ATTR), int):
        return int(trial.user_attrs[SEED_ATTR])
    if isinstance(trial.user_attrs.get("seed"), int):  # recorded when it started training
        return int(trial.user_attrs["seed"])
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        return None
    settings = json.loads(raw).get("study", {})
    return training_seed({}, int(settings.get("seed", 0)), int(settings.get("trial_seed_offset", 0)), trial.number)


def retry_lost_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool | None:
    """Hand a trial this worker marked FAIL (interrupted) to the storage's stale-trial callback, as
    :func:`fail_stale` does a dead worker's: True when re-queued, False when its retries are spent,
    None when the storage has no callback (opened without a spec)."""
    callback = backend_of(study).get_heartbeat_stale_trial_callback()
    return None if callback is None else bool(callback(study, trial))


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail trials whose worker stopped heart-beating and re-queue them; returns their numbers.

    Also reaps a RUNNING trial that never recorded a heartbeat (its worker died between ask and the
    first beat, or a retried create committed twice) once it is far older than the grace period.
    Call under :func:`budget_lock` so two workers do not re-queue the same trial.
    """

    storage = backend_of(study)
    proxied = is_proxied(storage)
    if not (proxied or isinstance(storage, optuna.storages.RDBStorage)) or storage.heartbeat_interval is None:
        return []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if proxied:  # the proxy runs the same query on the database
        stale = storage.stale_trial_ids(study_id(study))
    else:
        stale = stale_trial_ids(storage, study_id(study), running, storage.heartbeat_interval, storage.grace_period)
    reaped = []
    for t in running:
        if trial_id(t) not in stale:
            continue
        try:
            storage.set_trial_user_attr(trial_id(t), "fail_reason", "worker lost: no heartbeat within the grace period (killed, preempted or out of memory?)")
            if storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                reaped.append(trial_id(t))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished (or another worker reaped it) meanwhile
    callback = storage.get_heartbeat_stale_trial_callback()
    for row_id in reaped:
        frozen = storage.get_trial(row_id)
        log.warning("trial %d: worker lost, marked FAIL%s", frozen.number, _requeue(callback, study, frozen))
    return [storage.get_trial(i).number for i in reaped]


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_id_: int, running: list[optuna.trial.FrozenTrial], heartbeat_interval: int, grace_period: int | None) -> set[int]:
    """Ids of ``running`` trials to reap: heartbeat older than the grace period, or none recorded
    and started far longer ago than it (see :func:`fail_stale`)."""
    stale = set(stale_ids(storage, study_id_, heartbeat_interval, grace_period))
    horizon = datetime.now() - timedelta(seconds=max(300, 5 * (grace_period or 0)))
    beating = _trials_with_heartbeat(storage, [trial_id(t) for t in running])
    for t in running:
        if trial_id(t) not in beating and t.datetime_start is not None and t.datetime_start < horizon:
            stale.add(trial_id(t))
    return stale


def _requeue(callback: Callable | None, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """Hand a reaped trial to the storage's stale-trial callback; say what came of it (for the log)."""
    if callback is None:
        return "; not re-queued (no retry callback)"
    requeued = callback(study, trial)
    limit = getattr(callback, "max_retries", "?")
    if requeued is False:
        return f"; not re-queued: retries exhausted (study.max_retries = {limit})"
    if requeued is True:
        return f" and re-queued (retry {len(trial.system_attrs.get('retry_history', [])) + 1} of {limit})"
    return "; handed to the storage's stale-trial callback"  # a callback not made by retry_stale_trial


def _trials_with_heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    if not trial_ids:
        return set()
    def query() -> set[int]:
        with storage.engine.connect() as conn:
            table = heartbeat_table()
            rows = conn.execute(table.select().where(table.c.trial_id.in_(trial_ids)))
            return {r.trial_id for r in rows}

    return retrying(query, lambda: getattr(storage, "retry_seconds", 0.0))()


def count_states(storage: optuna.storages.RDBStorage, study_id: int) -> dict[TrialState, int]:
    """Trials per state in one small query: it runs under the budget lock on every ask, where
    loading every trial (``study.get_trials``) would grow with the study and stall the fleet.
    Through the proxy (``grpc://``), the proxy runs this query."""

    if is_proxied(storage):
        return storage.count_states(study_id)

    def query() -> dict[TrialState, int]:
        table = trial_table()
        stmt = select(table.c.state, func.count()).where(table.c.study_id == study_id).group_by(table.c.state)
        with storage.engine.connect() as conn:
            counts = {TrialState[str(getattr(state, "name", state))]: n for state, n in conn.execute(stmt)}
        return {s: counts.get(s, 0) for s in TrialState}

    return retrying(query, lambda: getattr(storage, "retry_seconds", 0.0))()


@contextlib.contextmanager
def budget_lock(storage: optuna.storages.RDBStorage, study_id: int) -> Iterator[None]:
    """Serialise "is there budget left? then ask" across every worker of the study.

    Without it two workers that both see n_trials - 1 finished trials would both start one.
    PostgreSQL: a transaction-scoped advisory lock (works across machines and behind PgBouncer in
    transaction mode; ends with its transaction, so an interrupted or dropped worker cannot leave
    it held). SQLite: a lock file beside the database (local workers only, all SQLite does well).
    """

    # Re-entrant per thread: creating the control arm (or a half-made study's spec) takes the lock
    # inside a section that already holds it. SQLite's lock is one file per database, and a second
    # flock on it from the same thread would wait for itself forever.
    if is_proxied(storage):  # the proxy takes this lock for us, as a lease (proxy.py)
        token, acquire = storage.lock_token(study_id), storage.budget_lock
    else:
        url = make_url(storage.url)
        token = (url.database, study_id) if url.get_backend_name() == "postgresql" else (url.database, None)
        acquire = functools.partial(acquired_lock, storage)
    held = _HELD.__dict__.setdefault("tokens", set())
    if token in held:
        yield
        return
    held.add(token)
    try:
        with acquire(study_id):
            yield
    finally:
        held.discard(token)


_HELD = threading.local()


@contextlib.contextmanager
def acquired_lock(storage: optuna.storages.RDBStorage, study_id: int) -> Iterator[None]:
    """The database's budget lock itself, not re-entrant (:func:`budget_lock` is)."""
    url = make_url(storage.url)
    backend = url.get_backend_name()
    if backend == "postgresql":
        key = zlib.crc32(f"llrd-search:{study_id}".encode())
        conn = retrying(lambda: _locked_connection(storage.engine, key), lambda: getattr(storage, "retry_seconds", 0.0))()
        try:
            yield
        finally:
            try:
                conn.rollback()  # ends the transaction, which releases the lock
            except SQLAlchemyError as err:  # the connection died: the server dropped the lock with it
                log.warning("releasing the budget lock: %s", type(err).__name__)
            finally:
                conn.close()
    elif backend == "sqlite" and url.database and url.database != ":memory:":
        with open(f"{url.database}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    else:
        yield


def _locked_connection(engine: Any, key: int) -> Any:
    conn = engine.connect()
    try:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    except BaseException:
        conn.close()
        raise
    return conn
