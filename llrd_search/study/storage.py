"""Storage: the SQL-backed Optuna study and what llrd-search keeps in it.

The validated spec lives in the study's user attrs, so a worker on another machine needs only the
storage URL and the study name. A study is created once: its paper points are enqueued by whoever
wins the creation, never per worker. Passwords leave it only masked (urls.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from llrd_search.engine.metrics import set_study_metric
from llrd_search.exceptions import StorageError, StudyConflictError, StudyNotFoundError, UsageError
from llrd_search.spec import MAX_TRIALS, PAPER_POINTS, StudySpec, parse_spec
from llrd_search.study.compat import study_id
from llrd_search.study.proxy import is_proxy, is_proxy_url, open_proxy
from llrd_search.study.pruners import make_pruner
from llrd_search.study.resilience import (
    RETRY_SECONDS,
    RETRY_STATS,
    ResilientRDBStorage,
    count_states,
    is_transient,
    retry_stale_trial,
)
from llrd_search.study.resilience import budget_lock as budget_lock  # re-exported: workers import it from here
from llrd_search.study.resilience import fail_stale as fail_stale
from llrd_search.study.sampling import make_sampler
from llrd_search.study.url_checks import check_sqlite_exists, check_sqlite_file, driver_hint
from llrd_search.study.url_checks import check_storage_url as check_storage_url  # re-exported
from llrd_search.study.url_checks import storage_named as storage_named
from llrd_search.study.urls import error_reason, open_hint, where
from llrd_search.study.urls import mask_url as mask_url  # re-exported: most modules import it from here
from llrd_search.study.urls import shareable_url as shareable_url
from llrd_search.vocab import BUDGET_ATTR, CONTROL_STUDY_ATTR, ENQUEUED_ATTR, FINGERPRINT_ATTR, FINISHED_STATES, SPEC_ATTR

log = logging.getLogger(__name__)


def quiet_optuna() -> None:
    """Silence, for this process, Optuna's INFO lines (one per study made and trial told: our
    progress line says it) and its warning that heartbeats belong to ``Study.optimize`` (workers
    beat around ask/tell on purpose, see worker.py). Called where a process starts (``cli.main``,
    ``worker.run_worker``), never on import: importing llrd_search changes nothing global."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        # Local parallel workers queue on the file lock instead of raising "database is locked".
        return {"connect_args": {"timeout": 60}}
    if backend == "postgresql":
        # pre_ping + recycle survive a database restart or a dropped connection. A worker needs at
        # most 2 connections at once (budget lock + ask, or training thread + heartbeat) and keeps
        # 1 open between trials: a 50-worker fleet stays near 50-100 of PostgreSQL's 100 default.
        # TCP keepalives notice a silently dropped link (NAT, failover) instead of hanging.
        return {
            "pool_pre_ping": True,
            "pool_recycle": 300,
            "pool_size": 1,
            "max_overflow": 2,
            "pool_timeout": 30,
            "connect_args": {
                "connect_timeout": 10,
                "application_name": "llrd-search",
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
            },
        }
    return {"pool_pre_ping": True}


def open_storage(
    url: str, spec: StudySpec | None = None, *, patient: bool = False, pool_size: int | None = None, must_exist: bool = False
) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` with heartbeats (from ``spec``), retry of dead workers' trials, and calls
    that retry through a database restart; for ``grpc://HOST:PORT``, the same through an
    ``llrd-search proxy`` (proxy.py). Opening fails fast: a wrong URL is not an outage.
    ``pool_size``: connections to keep (the proxy's; a worker keeps 1). ``must_exist``: for a
    command that only reads a study, a SQLite file that is not there is an error, checked before
    SQLAlchemy would create it (an empty database left behind by a typo in the path)."""
    heartbeat = _heartbeat_settings(spec)
    if is_proxy_url(url):
        return open_proxy(url, heartbeat, patient=patient)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(f"--storage: '{mask_url(url)}' is not a database URL (e.g. sqlite:///study.db)") from None
    if parsed.get_backend_name() == "sqlite":
        check_sqlite_file(url, parsed.database, parsed.query.get("mode"))
        if must_exist:
            check_sqlite_exists(parsed.database)
    try:
        storage = _new_storage(url, heartbeat, patient, pool_size)
        if parsed.get_backend_name() == "sqlite":
            # WAL lets readers (status, dashboard, progress) run beside a writing worker.
            with storage.engine.connect() as conn:
                conn.execute(text("PRAGMA journal_mode=WAL"))
    except ImportError as err:  # Optuna wraps the driver's own ImportError ("No module named 'MySQLdb'")
        raise StorageError(f"--storage: no driver for {mask_url(url)}: {err.__cause__ or err} ({driver_hint(parsed.get_backend_name())})") from None
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        err = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ else err
        raise StorageError(f"--storage: cannot open {where(url)}: {error_reason(err, url)}{open_hint(err, url)}") from None
    return storage


def _heartbeat_settings(spec: StudySpec | None) -> dict[str, Any]:
    if spec is None:
        return {}
    return {
        "heartbeat_interval": spec.study.heartbeat_interval,
        "grace_period": spec.study.grace_period,
        "heartbeat_stale_trial_callback": retry_stale_trial(spec.study.max_retries),
    }


def _new_storage(url: str, heartbeat: dict[str, Any], patient: bool, pool_size: int | None = None) -> ResilientRDBStorage:
    """Open, riding out what is not the user's fault: a full server ("too many clients", a server
    starting up), processes racing to create the tables of a fresh database (the losers hit a
    duplicate key), and, when ``patient``, any outage (a worker re-opening a storage it just used)."""
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.2
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs = engine_kwargs(url)
                if pool_size and "pool_size" in kwargs:
                    kwargs |= {"pool_size": pool_size, "max_overflow": pool_size}
                return ResilientRDBStorage(url, engine_kwargs=kwargs, **heartbeat)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            text_ = str(getattr(err, "__cause__", None) or "") + str(err)
            busy = any(m in text_ for m in ("too many clients", "remaining connection slots", "starting up"))
            race = any(m in text_ for m in ("UNIQUE constraint", "duplicate key", "already exists"))
            if not (busy or race or (patient and is_transient(err))) or time.monotonic() + delay > deadline:
                raise
            RETRY_STATS["retries"] += 1
            log.warning("cannot open the storage yet (%s); retrying in %.1fs", "server busy" if busy else "schema being created" if race else "unreachable", delay)
        time.sleep(delay)
        delay = min(5.0, delay * 2)


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Return the thread's session and close every pooled connection (each holds a server slot)."""
    if hasattr(storage, "remove_session"):
        storage.remove_session()
    if is_proxy(storage):
        storage.close()  # the gRPC channel
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


@contextlib.contextmanager
def opened_storage(
    url: str, spec: StudySpec | None = None, *, patient: bool = False, must_exist: bool = False
) -> Iterator[optuna.storages.RDBStorage]:
    """:func:`open_storage`, closed again on leaving the block, however it is left."""
    storage = open_storage(url, spec, patient=patient, must_exist=must_exist)
    try:
        yield storage
    finally:
        close_storage(storage)


@contextlib.contextmanager
def opened_study(url: str, name: str) -> Iterator[optuna.Study]:
    """The study ``name`` in ``url``, its storage closed again on leaving the block (a SQLite file
    that does not exist is an error, not created: reading a study writes nothing)."""
    with opened_storage(url, must_exist=True) as storage:
        yield load_study(storage, name)


def predates_control_arm(stored: dict, study_attrs: dict) -> bool:
    """Whether a stored spec comes from a study created before the control arm existed: no
    ``control_fraction`` in it, and no control arm made for it since (a worker of the first control-arm
    versions read the default 0.25 into such a study and made one: that study keeps it)."""
    return "control_fraction" not in (stored.get("study") or {}) and CONTROL_STUDY_ATTR not in study_attrs


def stored_spec_data(stored: dict, study_attrs: dict) -> dict:
    """The stored spec dict to validate: ``control_fraction = 0`` where it predates the control arm,
    not the 0.25 default a new study file gets."""
    if not predates_control_arm(stored, study_attrs):
        return stored
    return {**stored, "study": {**stored["study"], "control_fraction": 0.0}}


def spec_of(study: optuna.Study) -> StudySpec:
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StudyNotFoundError(f"study '{study.study_name}' was not created by llrd-search (no spec stored in it)")
    spec = parse_spec(stored_spec_data(json.loads(raw), study.user_attrs), source=f"spec stored in study '{study.study_name}'")
    spec.study.n_trials = int(study.user_attrs.get(BUDGET_ATTR, spec.study.n_trials))
    return spec


def create_study(spec: StudySpec, storage: optuna.storages.RDBStorage, n_trials: int | None = None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists with the same spec. Returns (study, created).

    The spec is written last, under the study's lock: a study with a spec is complete, and one
    left without it by an interrupted create (no trial run, nothing foreign) is completed here.
    """
    from llrd_search.study.grid import cap_budget

    name = spec.study.name
    if n_trials is not None and not 0 < n_trials <= MAX_TRIALS:  # stored as the budget, read back into a spec that refuses it
        raise UsageError(f"--n-trials: must be from 1 to {MAX_TRIALS} (got {n_trials})")
    budget, note = cap_budget(spec, n_trials or spec.study.n_trials)
    if note:
        log.info("%s", note)
    try:
        study, new = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=make_sampler(spec), pruner=make_pruner(spec)), True
    except optuna.exceptions.DuplicatedStudyError:
        study, new = load_study(storage, name), False
    except SQLAlchemyError as err:
        raise StorageError(f"--storage: cannot create the study in {where(storage.url)}: {error_reason(err, storage.url)}") from None
    # A create running beside this one may be writing the same study: decide and write under its lock.
    with budget_lock(storage, study_id(study)):
        attrs = study.user_attrs
        if SPEC_ATTR in attrs:
            _resume(spec, storage, study, json.loads(attrs[SPEC_ATTR]), budget)
            return study, False
        if not new:
            _check_half_made(spec, study, attrs)
            log.warning("study '%s' was left half-made by an interrupted create; completing it", name)
        _complete(spec, study, budget)
    return study, True


def stored_spec_json(spec: StudySpec) -> str:
    """The spec as stored in the study: without ``study.storage``, which says where the study lives
    (known to whoever reads it) and may hold a password."""
    return spec.model_dump_json(exclude={"study": {"storage"}})


def _resume(spec: StudySpec, storage: optuna.storages.RDBStorage, study: optuna.Study, stored: dict[str, Any], budget: int) -> None:
    name = spec.study.name
    old = parse_spec(stored_spec_data(stored, study.user_attrs))
    if predates_control_arm(stored, study.user_attrs) and "control_fraction" not in spec.study.model_fields_set:
        spec.study.control_fraction = 0.0  # the file's default 0.25 would add an arm this study was not planned with
    diff = _diff(old.identity(), spec.identity())
    if diff:
        raise StudyConflictError(
            f"study.name: study '{name}' exists with a different spec ({diff}); give the changed search a new study.name, or revert the change"
        )
    _check_budget(spec, storage, study, budget)
    # Where runs are tracked is not what the study is: the study file's say goes, for every worker.
    retracked = (old.study.track, old.study.track_uri) != (spec.study.track, spec.study.track_uri)
    if old.study.storage is not None or retracked:  # (storage: made by a version that stored the URL, maybe with a password)
        old.study.track, old.study.track_uri = spec.study.track, spec.study.track_uri
        study.set_user_attr(SPEC_ATTR, stored_spec_json(old))
    if budget != int(study.user_attrs.get(BUDGET_ATTR, 0)):
        study.set_user_attr(BUDGET_ATTR, budget)
    if not study.metric_names:  # a study made before metric names were set
        set_study_metric(study, old.train.metric)


def _check_budget(spec: StudySpec, storage: optuna.storages.RDBStorage, study: optuna.Study, budget: int) -> None:
    """Raise, before anything is written, unless ``budget`` covers the trials both arms have finished."""
    from llrd_search.study.arms import control_name, control_target, smallest_budget

    def finished(sid: int) -> int:
        counts = count_states(storage, sid)
        return sum(counts[s] for s in FINISHED_STATES)

    llrd, control = finished(study_id(study)), 0
    if spec.has_control_arm:
        try:
            control = finished(storage.get_study_id_from_name(control_name(study.study_name)))
        except KeyError:  # no control trial has been asked yet
            pass
    least = smallest_budget(spec.study.control_fraction, llrd, control)
    if budget >= least:
        return
    done = f"{llrd + control} trials ({llrd} LLRD + {control} control)" if spec.has_control_arm else f"{llrd} trials"
    share = ""
    if budget >= llrd + control:  # enough in all, but the control arm's share would be below its finished trials
        share = f", and a budget of {budget} gives the control arm a share of {control_target(spec.study.control_fraction, budget)}, below its {control}"
    raise StudyConflictError(
        f"--n-trials / study.n_trials: {budget} is too small: study '{spec.study.name}' has already finished {done}{share}; "
        f"a budget never drops below the finished trials (pass --n-trials {least} or more)"
    )


def _check_half_made(spec: StudySpec, study: optuna.Study, attrs: dict[str, Any]) -> None:
    """Raise unless ``study`` is what an interrupted :func:`create_study` of ``spec`` leaves."""
    name = spec.study.name
    ours = set(attrs) <= {FINGERPRINT_ATTR, BUDGET_ATTR} and all(
        t.state == optuna.trial.TrialState.WAITING and ENQUEUED_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False)
    )
    if not ours:
        raise StudyConflictError(f"study.name: a study '{name}' exists in the storage but was not made by llrd-search; pick another name")
    if attrs.get(FINGERPRINT_ATTR, spec.fingerprint()) != spec.fingerprint():
        raise StudyConflictError(
            f"study.name: study '{name}' was left half-made by an interrupted create of a different spec; "
            f"pick another name, or delete it first (optuna delete-study --study-name {name} --storage URL)"
        )


def _complete(spec: StudySpec, study: optuna.Study, budget: int) -> None:
    """Write what a study needs, the spec last: workers (and :func:`create_study`) take a study
    without a spec for unfinished, so an interruption anywhere here can be completed later."""
    study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    study.set_user_attr(BUDGET_ATTR, budget)
    # optuna-dashboard and report label the value by this name instead of "Objective 0".
    set_study_metric(study, spec.train.metric)
    queued = [t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False)]
    for point in spec.initial_points()[:budget]:
        if point not in queued:
            study.enqueue_trial(point, user_attrs={ENQUEUED_ATTR: _origin(point)})
    study.set_user_attr(SPEC_ATTR, stored_spec_json(spec))


def _origin(point: dict[str, float]) -> str:
    if point == PAPER_POINTS[0]:
        return "paper (Sun et al. 2019)"
    if point == PAPER_POINTS[1]:
        return "no-decay control"
    return "study.enqueue"


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return ""


def load_study(storage: optuna.storages.BaseStorage, name: str, spec: StudySpec | None = None, worker_index: int = 0) -> optuna.Study:
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except SQLAlchemyError as err:
        raise StorageError(f"--storage: cannot read studies: {error_reason(err, storage.url)}") from None
    if name not in names:
        hint = f" (studies there: {', '.join(names[:10])})" if names else " (the storage holds no study yet; run 'llrd-search create STUDY.toml' first)"
        raise StudyNotFoundError(f"--study: no study named '{name}'{hint}")
    kwargs: dict[str, Any] = {}
    if spec is not None:
        kwargs = {"sampler": make_sampler(spec, worker_index), "pruner": make_pruner(spec)}
    return optuna.load_study(study_name=name, storage=storage, **kwargs)
