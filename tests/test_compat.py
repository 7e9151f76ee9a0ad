"""Optuna's private names that llrd_search.study.compat relies on: each test fails, naming the attribute,
when an Optuna release moves one (then mend compat.py and the optuna bound in pyproject.toml)."""

from __future__ import annotations

import optuna
import pytest

from llrd_search.study import compat
from llrd_search.study.storage import open_storage


@pytest.fixture
def study(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    yield study
    storage.engine.dispose()


def test_study_and_trial_ids_are_the_storage_rows(study):
    trial = study.ask()
    assert isinstance(compat.study_id(study), int), "optuna.Study._study_id moved"
    assert isinstance(compat.trial_id(trial), int), "optuna.Trial._trial_id moved"
    storage = compat.storage_of(study)
    assert storage.get_study_name_from_id(compat.study_id(study)) == "s"
    frozen = storage.get_trial(compat.trial_id(trial))
    assert frozen.number == trial.number
    assert compat.trial_id(frozen) == compat.trial_id(trial), "optuna.trial.FrozenTrial._trial_id moved"


def test_rdb_of_finds_the_storage_under_the_cache_layer(study):
    rdb = compat.rdb_of(study)
    assert isinstance(rdb, optuna.storages.RDBStorage), "Study._storage._backend no longer holds the RDBStorage"
    assert compat.rdb_of(optuna.create_study()) is None  # in-memory: no SQL storage


def test_stale_trial_query_and_tables(tmp_path):
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=rdb, study_name="h")
    study.ask()
    assert compat.stale_ids(compat.rdb_of(study), compat.study_id(study)) == []  # just started: none stale
    rdb.engine.dispose()
    assert {"trial_id", "study_id", "state"} <= set(compat.trial_table().c.keys()), "optuna's TrialModel table changed"
    assert {"trial_id", "heartbeat"} <= set(compat.heartbeat_table().c.keys()), "optuna's TrialHeartbeatModel table changed"


@pytest.mark.parametrize("name", compat.CACHE_PRIVATE_METHODS)
def test_private_storage_methods_resilience_wraps_exist(name):
    assert callable(getattr(optuna.storages.RDBStorage, name, None)), f"optuna.storages.RDBStorage.{name} moved"


@pytest.mark.parametrize("name", compat.GRID_PRIVATE_NAMES)
def test_grid_sampler_internals_exist(name):
    sampler = optuna.samplers.GridSampler({"x": [1, 2]}, seed=0)
    assert hasattr(sampler, name), f"optuna.samplers.GridSampler.{name} moved"


def test_lazy_random_state_gives_a_numpy_generator():
    assert hasattr(compat.LazyRandomState(0).rng, "choice"), "optuna.samplers._lazy_random_state.LazyRandomState changed"


def test_optunas_grpc_storage_service_is_where_the_proxy_takes_it_from():
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        compat.grpc_storage_servicer(optuna.storages.InMemoryStorage(), server)  # ImportError when Optuna moves it
    finally:
        server.stop(0)


def test_stale_ids_with_other_heartbeat_settings_share_the_storages_engine(study):
    rdb = compat.rdb_of(study)
    engine = rdb.engine
    assert compat.stale_ids(rdb, compat.study_id(study), 60, 120) == []
    assert rdb.engine is engine and rdb.heartbeat_interval is None  # a view, the storage itself unchanged
