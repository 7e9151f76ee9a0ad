"""Every use of Optuna's private names, in one place.

llrd-search needs a few things Optuna does not publish: a study's and a trial's storage ids, the
RDB storage under the cache layer a Study wraps around it, the stale-trial query, the SQL tables
(for one-query counts and heartbeat checks), the private storage methods that cache layer calls,
Optuna's gRPC storage service (served by ``llrd-search proxy``) and the grid sampler's internals.
Each is one small function or name here; tests/test_compat.py fails, naming the attribute, when an
Optuna release moves one. pyproject.toml bounds optuna to the
releases the suite has run against.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState as LazyRandomState  # grid.py: per-worker choice

# Private storage methods that Optuna's cache layer (around every Study's storage) calls directly,
# so resilience.py wraps them in retries like the public ones.
CACHE_PRIVATE_METHODS = ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials", "_get_stale_trial_ids")

# What grid.FleetGridSampler overrides or reads on optuna.samplers.GridSampler.
GRID_PRIVATE_NAMES = ("_get_unvisited_grid_ids", "_same_search_space", "_n_min_trials", "_rng")


def study_id(study: optuna.Study) -> int:
    """The study's row id in the storage (what storage methods and the budget lock take)."""
    return study._study_id


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The trial's row id in the storage (not its number, which counts within the study)."""
    return trial._trial_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage the study was loaded with (Optuna's cache layer around an RDB storage)."""
    return study._storage


def rdb_of(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The study's RDBStorage (Optuna wraps it in a cache layer), or None for other storages."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def backend_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage under Optuna's cache layer: an RDBStorage, or the proxy client (which has none)."""
    return getattr(study._storage, "_backend", study._storage)


def stale_ids(storage: optuna.storages.RDBStorage, study_id_: int, heartbeat_interval: int | None = None, grace_period: int | None = None) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the grace period: the
    storage's own, or (the proxy, serving studies of any spec) the given one."""
    if heartbeat_interval is not None and (heartbeat_interval, grace_period) != (storage.heartbeat_interval, storage.grace_period):
        # A view with the same engine and sessions (copy.copy would run RDBStorage.__setstate__,
        # which opens a new engine) and the study's heartbeat settings.
        view = object.__new__(type(storage))
        view.__dict__.update(storage.__dict__)
        view.heartbeat_interval, view.grace_period = heartbeat_interval, grace_period
        storage = view
    return storage._get_stale_trial_ids(study_id_)


def grpc_storage_servicer(storage: optuna.storages.BaseStorage, server: Any) -> None:
    """Add Optuna's gRPC storage service for ``storage`` to ``server`` (what its
    ``run_grpc_proxy_server`` does, on a server llrd-search adds its fleet service to)."""
    from optuna.storages._grpc.auto_generated.api_pb2_grpc import add_StorageServiceServicer_to_server
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)


def trial_table() -> Any:
    """The SQL table of trials (id, study_id, state, ...)."""
    from optuna.storages._rdb.models import TrialModel

    return TrialModel.__table__


def heartbeat_table() -> Any:
    """The SQL table of trial heartbeats (trial_id, heartbeat)."""
    from optuna.storages._rdb.models import TrialHeartbeatModel

    return TrialHeartbeatModel.__table__


def study_id_by_name(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The storage's id of study ``name`` (public Optuna API; here so every study-id lookup is in this module)."""
    return storage.get_study_id_from_name(name)
