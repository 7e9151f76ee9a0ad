"""Placement on a GPU machine without a GPU: free memory through NVML (no CUDA context in the
parent), TPE's constant liar when trials run at once, and pack = "auto" falling back to several
unpacked workers per GPU when the model cannot pack. NVML and torch.cuda are fakes here."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import optuna
import pytest
import torch

from llrd_search.study import gpus as G
from llrd_search.study import sampling

GIB = 1024**3
UUIDS = {"GPU-aaaa": (40 * GIB, 80 * GIB), "GPU-bbbb": (30 * GIB, 80 * GIB), "MIG-cccc": (9 * GIB, 10 * GIB)}


def fake_pynvml(*, init_error: bool = False, calls: list | None = None) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's pynvml: UUID -> memory, NVMLError when it has no driver."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")
        (calls if calls is not None else []).append("init")

    def handle(uuid):
        if uuid not in UUIDS:
            raise NVMLError(f"no GPU {uuid}")
        return uuid

    m.NVMLError = NVMLError
    m.nvmlInit = init
    m.nvmlShutdown = lambda: (calls if calls is not None else []).append("shutdown")
    m.nvmlDeviceGetHandleByUUID = handle
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(free=UUIDS[h][0], total=UUIDS[h][1], used=0)
    return m


@pytest.fixture
def cuda_two(monkeypatch):
    """torch sees two GPUs whose properties carry the UUIDs aaaa and bbbb; asking CUDA for free
    memory is recorded (it would open a context on that GPU)."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=["aaaa", "bbbb"][i]))

    def mem_get_info(i):
        asked.append(i)
        return (1 * GIB, 80 * GIB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return asked


def test_free_memory_comes_from_nvml_without_a_cuda_context(cuda_two, monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls=calls))
    gpus = G.cuda_gpus()
    assert [(g.id, g.free, g.total) for g in gpus] == [("0", 40 * GIB, 80 * GIB), ("1", 30 * GIB, 80 * GIB)]
    assert cuda_two == [] and calls == ["init", "shutdown"]  # no mem_get_info: no context; NVML closed again


def test_nvml_matches_gpus_by_uuid_not_by_index(cuda_two, monkeypatch):
    # a scheduler's CUDA_VISIBLE_DEVICES given as UUIDs: the entry itself is NVML's UUID
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,MIG-cccc")
    assert [(g.id, g.free) for g in G.cuda_gpus()] == [("GPU-bbbb", 30 * GIB), ("MIG-cccc", 9 * GIB)]
    assert cuda_two == []


@pytest.mark.parametrize("case", ["not installed", "no driver", "unknown uuid", "no uuid property"])
def test_without_nvml_it_asks_cuda_as_before(cuda_two, monkeypatch, case):
    if case == "not installed":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=case == "no driver"))
    if case == "unknown uuid":
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=["aaaa", "zzzz"][i]))
    if case == "no uuid property":
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace())
    gpus = G.cuda_gpus()
    assert [(g.free, g.total) for g in gpus] == [(GIB, 80 * GIB)] * 2 and cuda_two == [0, 1]  # one source for all GPUs


# --------------------------------------------------------------------------- constant liar


def _spec(sampler: str = "tpe"):
    return SimpleNamespace(study=SimpleNamespace(seed=7, n_trials=30, sampler=sampler), space=None)


def _liar(s) -> bool:
    inner = s.inner
    return isinstance(inner, optuna.samplers.TPESampler) and inner._constant_liar


def test_tpe_lies_constantly_only_when_trials_run_at_once(monkeypatch):
    monkeypatch.delenv(sampling.FLEET_ENV, raising=False)
    assert not _liar(sampling.make_sampler(_spec()))  # one worker, one trial at a time: TPE as before
    assert _liar(sampling.make_sampler(_spec(), concurrent=4))  # e.g. 1 worker x pack 4
    monkeypatch.setenv(sampling.FLEET_ENV, "3")  # run/confirm's fleet of 3 workers
    s = sampling.make_sampler(_spec())
    assert s.concurrent == 3 and _liar(s)
    # the per-trial sampler keeps it: trial i's fresh TPE lies too
    study = optuna.create_study(sampler=s)
    study.ask()
    assert _liar(s)
    for bad in ("", "0", "x", "-2"):
        monkeypatch.setenv(sampling.FLEET_ENV, bad)
        assert sampling.fleet_workers() == 1
    assert not isinstance(sampling.make_sampler(_spec("random"), concurrent=8).inner, optuna.samplers.TPESampler)


def test_local_fleet_tells_every_worker_its_size(monkeypatch):
    from llrd_search.study import local_workers

    started, seen_here = [], []

    class FakeProc:
        returncode = 0

        def __init__(self, argv, env):
            started.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(local_workers.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(local_workers, "monitored", lambda *a, **k: __import__("contextlib").nullcontext())
    monkeypatch.delenv(sampling.FLEET_ENV, raising=False)
    local_workers.run_local_workers("sqlite:///x.db", "s", 3, 1, lambda *_: None, in_process=lambda: seen_here.append(sampling.fleet_workers()))
    assert [e[sampling.FLEET_ENV] for e in started] == ["3", "3"] and seen_here == [3]
    assert sampling.FLEET_ENV not in __import__("os").environ  # restored after worker 0


def test_control_arm_sampler_copies_the_concurrency(write_study, tmp_path):
    from llrd_search.spec import load_spec
    from llrd_search.study import arms, storage

    spec = load_spec(write_study(study={"control_fraction": 0.25, "sampler": "tpe", "n_trials": 8}))
    with storage.opened_storage(f"sqlite:///{tmp_path / 's.db'}", spec) as st:
        parent, _ = storage.create_study(spec, st)
        parent.sampler = sampling.make_sampler(spec, concurrent=6)
        control = arms.ensure_control_arm(st, parent, spec)
        assert control.sampler.concurrent == 6 and _liar(control.sampler)


# --------------------------------------------------------------------------- pack = "auto" that cannot pack

FOUR = [G.Gpu(str(i), "H100", 40 * GIB, 80 * GIB) for i in range(4)]


def test_pack_auto_that_cannot_pack_puts_several_workers_on_each_gpu():
    packs = G.choose_plan(FOUR, workers=None, per_gpu=None, threads=None, per_trial_bytes=8 * GIB, remaining=100, cores=16, pack="auto")
    assert packs.counts() == [1, 1, 1, 1]
    blocked = G.choose_plan(FOUR, workers=None, per_gpu=None, threads=None, per_trial_bytes=8 * GIB, remaining=100, cores=16,
                            pack="auto", pack_blocked="grad_accum = 4")
    assert blocked.counts() == [4, 4, 4, 4]  # 0.9 x 40 GiB holds 4 of 8.5: what the unpacked estimate says
    assert 'pack = "auto" cannot pack (grad_accum = 4): unpacked workers instead' in blocked.line()


def _train(**kw):
    return SimpleNamespace(train=SimpleNamespace(**{"pack": "auto", "grad_accum": 1, "gradient_checkpointing": False, **kw}))


def test_pack_blocker_names_the_reason():
    assert G.pack_blocker(_train()) is None
    assert G.pack_blocker(_train(grad_accum=2)) == "grad_accum = 2"
    assert G.pack_blocker(_train(gradient_checkpointing=True)) == "gradient_checkpointing = true"
    assert G.pack_blocker(_train(pack=4, grad_accum=2)) is None  # only "auto" falls back; pack = K is the user's word


def test_pack_blocker_checks_the_loaded_models_architecture(monkeypatch):
    from llrd_search.engine import objective as O
    from llrd_search.engine import packed_trials

    obj = object.__new__(O.Objective)  # a built-in objective; check_packable is what decides
    monkeypatch.setattr(packed_trials, "check_packable", lambda o: "the packed model's outputs differ from the model's own")
    assert G.pack_blocker(_train(), obj) == "this model: the packed model's outputs differ from the model's own"
    monkeypatch.setattr(packed_trials, "check_packable", lambda o: None)
    assert G.pack_blocker(_train(), obj) is None


def test_a_packed_worker_counts_its_k_in_the_concurrency(write_study, monkeypatch):
    from llrd_search.search import create
    from llrd_search.study import worker as W

    created = create(write_study(study={"sampler": "tpe", "n_trials": 4}))
    seen = []

    class NoClaims:  # the worker's claimer, seen with the sampler the worker will sample with
        running = 0

        def __init__(self, storage, study, spec, worker_index):
            seen.append(study.sampler.concurrent)

        def claim(self, signals):
            return None

    monkeypatch.setattr(W, "Claimer", NoClaims)
    monkeypatch.setenv(sampling.FLEET_ENV, "2")
    for packer, expected in ((SimpleNamespace(k=3), 6), (None, 2)):  # 2 workers x pack 3; unpacked: the fleet alone
        monkeypatch.setattr(W, "_pack_runner", lambda objective, p=packer: p)
        W.run_worker(created.url, created.study_name, objective_factory=lambda spec: (lambda trial: 0.0))
        assert seen[-1] == expected
