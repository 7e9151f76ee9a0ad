"""Workers over every GPU (study/gpus.py) and the memory estimate they are sized by
(engine/memory.py), with the CUDA facts injected: no GPU, no process started."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig

from llrd_search.engine.memory import GIB, gib, param_count_estimate, trial_memory_estimate
from llrd_search.exceptions import LLRDSearchError
from llrd_search.study import gpus as G

TINY = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


# --------------------------------------------------------------------------- the estimate


def test_param_count_estimate_is_the_models_own_count():
    from transformers import BertForSequenceClassification

    # encoder, pooler and a 2-label classifier
    assert param_count_estimate(TINY) == sum(p.numel() for p in BertForSequenceClassification(TINY).parameters()) == 37922
    assert param_count_estimate(BertConfig()) == 109_482_240 + 2 * 768 + 2  # bert-base-uncased + its classifier


def test_trial_memory_estimate_is_the_calibrated_estimate_less_the_cuda_context():
    from llrd_search.engine.memory_check import RUNTIME, estimate_trial_memory
    from llrd_search.spec import TrainSection

    fp32 = estimate_trial_memory(TINY, 37856, TrainSection(batch_size=8), max_length=16, bf16=False, device_type="cuda")
    bf16 = estimate_trial_memory(TINY, 37856, TrainSection(batch_size=8), max_length=16, bf16=True, device_type="cuda")
    assert trial_memory_estimate(TINY, 37856, 8, 16, None) == fp32.total - RUNTIME["cuda"] == trial_memory_estimate(TINY, 37856, 8, 16, torch.float32)
    assert trial_memory_estimate(TINY, 37856, 8, 16, torch.bfloat16) == bf16.total - RUNTIME["cuda"] == trial_memory_estimate(TINY, 37856, 8, 16, "bf16")
    # weights, gradients and both AdamW moments are always there: 16 bytes a parameter
    assert trial_memory_estimate(TINY, 37856, 8, 16, None) > 16 * 37856
    # accumulation and checkpointing shrink the activations, never the states
    assert trial_memory_estimate(TINY, 37856, 8, 16, None, grad_accum=2) < trial_memory_estimate(TINY, 37856, 8, 16, None)
    assert trial_memory_estimate(TINY, 37856, 8, 16, None, gradient_checkpointing=True) < trial_memory_estimate(TINY, 37856, 8, 16, None)


def test_gib_rounds_to_one_decimal_below_ten():
    assert (gib(3.14 * GIB), gib(70.4 * GIB), gib(0.5 * GIB)) == ("3.1", "70", "0.5")


# --------------------------------------------------------------------------- how many per GPU


def test_workers_per_gpu_from_free_memory():
    # 90 % of 24 GiB = 21.6 GiB over 10 GiB + the 0.5 GiB context: 2
    assert G.workers_per_gpu(10 * GIB, 24 * GIB) == (2, "auto: ~10 GiB per trial, 24 GiB free on the smallest GPU")
    # 9 GiB over 1 GiB a worker: 9, capped
    assert G.workers_per_gpu(GIB // 2, 10 * GIB, cap=16) == (9, "auto: ~0.5 GiB per trial, 10 GiB free on the smallest GPU")
    assert G.workers_per_gpu(3 * GIB, 70 * GIB) == (4, "auto: ~3.0 GiB per trial, 70 GiB free on the smallest GPU; at most 4 per GPU")
    assert G.workers_per_gpu(30 * GIB, 16 * GIB) == (1, "auto: ~30 GiB per trial, 16 GiB free on the smallest GPU: may not fit, see [train] batch_size")


def test_visible_gpu_ids_respect_a_preset_cuda_visible_devices():
    assert G.visible_gpu_ids(3, {}) == ["0", "1", "2"]
    assert G.visible_gpu_ids(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert G.visible_gpu_ids(2, {"CUDA_VISIBLE_DEVICES": "GPU-ab12, 5"}) == ["GPU-ab12", "5"]
    assert G.visible_gpu_ids(1, {"CUDA_VISIBLE_DEVICES": "4,bogus,6"}) == ["4"]  # CUDA stops at the bad entry
    assert G.visible_gpu_ids(2, {"CUDA_VISIBLE_DEVICES": " "}) == ["0", "1"]


# --------------------------------------------------------------------------- the plan


def test_plan_k_per_gpu_worker_zero_stays_in_the_parent():
    plan = G.gpu_plan(["0", "1", "2", "3"], per_gpu=2, cores=16, reason="auto: why")
    assert plan.workers == 8 and plan.threads == 2 and plan.counts() == [2, 2, 2, 2]
    assert [s.gpu for s in plan.slots] == ["0", "1", "2", "3", "0", "1", "2", "3"]
    assert [s.in_process for s in plan.slots] == [True] + [False] * 7
    assert plan.slots[0].env == {"LLRD_SEARCH_GPU_SHARE": "2"}  # applied to this process by run/confirm
    assert plan.slots[1].env == {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2", "LLRD_SEARCH_GPU_SHARE": "2"}
    assert plan.slots[4].env == {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2", "LLRD_SEARCH_GPU_SHARE": "2"}
    uneven = G.gpu_plan(["0", "1"], workers=3, cores=6)
    assert [s.env["LLRD_SEARCH_GPU_SHARE"] for s in uneven.slots] == ["2", "1", "2"]
    assert plan.line() == "8 workers: 2 per GPU on 4 GPUs (auto: why), 2 threads each"


def test_plan_pins_children_to_the_preset_devices_not_0_to_n():
    plan = G.gpu_plan(G.visible_gpu_ids(2, {"CUDA_VISIBLE_DEVICES": "5,7"}), per_gpu=2, cores=2)
    assert [(s.gpu, s.env.get("CUDA_VISIBLE_DEVICES")) for s in plan.slots] == [("5", None), ("7", "7"), ("5", "5"), ("7", "7")]
    assert plan.threads == 1
    assert plan.line() == "4 workers: 2 per GPU on 2 GPUs (--workers-per-gpu 2), 1 thread each"


def test_plan_total_workers_round_robin():
    plan = G.gpu_plan(["0", "1", "2", "3"], workers=5, cores=16)
    assert plan.counts() == [2, 1, 1, 1] and plan.threads == 3
    assert plan.line() == "5 workers: 2/1/1/1 per GPU on 4 GPUs (--workers 5), 3 threads each"
    few = G.gpu_plan(["0", "1", "2", "3"], workers=2, cores=16, threads=4)
    assert few.gpus == ["0", "1"] and few.threads == 4
    assert G.gpu_plan(["0"], workers=1, cores=8).line() == "1 worker: 1 per GPU on 1 GPU (--workers 1), 8 threads each"


def test_plan_without_a_parent_worker_pins_every_child():
    plan = G.gpu_plan(["3", "4"], per_gpu=1, cores=4, in_process=False)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan.slots] == ["3", "4"]


def test_plan_needs_exactly_one_count():
    for both_or_none in ({"per_gpu": 1, "workers": 2}, {}):
        with pytest.raises(LLRDSearchError, match="exactly one of --workers"):
            G.gpu_plan(["0"], cores=1, **both_or_none)
    with pytest.raises(LLRDSearchError, match="no GPU"):
        G.gpu_plan([], per_gpu=1, cores=1)


FOUR = [G.Gpu(str(i), "H100", free, 80 * GIB) for i, free in enumerate([70 * GIB, 75 * GIB, 71 * GIB, 79 * GIB])]


def test_choose_plan_auto_uses_the_smallest_gpu_and_the_trials_left():
    plan = G.choose_plan(FOUR, workers=None, per_gpu="auto", threads=None, per_trial_bytes=int(20 * GIB), remaining=100, cores=16)
    # 63 GiB / 20.5 GiB = 3 per GPU
    assert plan.line() == "12 workers: 3 per GPU on 4 GPUs (auto: ~20 GiB per trial, 70 GiB free on the smallest GPU), 1 thread each"
    few = G.choose_plan(FOUR, workers=None, per_gpu=None, threads=None, per_trial_bytes=int(20 * GIB), remaining=6, cores=16)
    assert few.counts() == [2, 2, 1, 1] and few.line().endswith("; 6 trials left), 2 threads each")


def test_choose_plan_explicit_counts_and_a_users_objective():
    assert G.choose_plan(FOUR, workers=None, per_gpu=2, threads=None, per_trial_bytes=None, remaining=1, cores=16).workers == 8
    assert G.choose_plan(FOUR, workers=6, per_gpu="auto", threads=None, per_trial_bytes=GIB, remaining=100, cores=16).counts() == [2, 2, 1, 1]
    unknown = G.choose_plan(FOUR, workers=None, per_gpu=None, threads=None, per_trial_bytes=None, remaining=100, cores=16)
    assert unknown.counts() == [1, 1, 1, 1] and "memory is unknown" in unknown.reason
    with pytest.raises(LLRDSearchError, match="not both"):
        G.choose_plan(FOUR, workers=3, per_gpu=2, threads=None, per_trial_bytes=None, remaining=9, cores=4)


def test_parse_workers_per_gpu():
    assert (G.parse_workers_per_gpu("auto"), G.parse_workers_per_gpu(" 3 ")) == ("auto", 3)
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(LLRDSearchError, match="whole number >= 1 or 'auto'"):
            G.parse_workers_per_gpu(bad)


# --------------------------------------------------------------------------- CUDA injected


@pytest.fixture
def two_gpus(monkeypatch):
    free = {0: 40 * GIB, 1: 30 * GIB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr("llrd_search.study.local_workers.usable_cores", lambda: 8)


def test_cuda_gpus_reads_each_visible_device(two_gpus):
    assert G.cuda_gpus() == [G.Gpu("4", "NVIDIA H100 80GB HBM3", 40 * GIB, 80 * GIB), G.Gpu("6", "NVIDIA H100 80GB HBM3", 30 * GIB, 80 * GIB)]


def _objective(device: str):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(TINY)
    spec = SimpleNamespace(train=SimpleNamespace(batch_size=8, grad_accum=1, gradient_checkpointing=False), model=SimpleNamespace(max_length=16))
    return SimpleNamespace(device=torch.device(device), template=SimpleNamespace(model=model), spec=spec, dtype=None)


def test_plan_run_on_cuda_sizes_by_the_loaded_model(two_gpus, monkeypatch):
    monkeypatch.delenv("LLRD_SEARCH_WORKERS", raising=False)
    obj = _objective("cuda")
    n = sum(p.numel() for p in obj.template.model.parameters())
    assert G.objective_trial_bytes(obj) == trial_memory_estimate(TINY, n, 8, 16, None)
    plan = G.plan_run(obj, user_objective=False, workers=None, per_gpu=None, threads=None, remaining=100)
    assert plan.counts() == [4, 4] and plan.threads == 1  # a tiny model: the cap
    assert plan.slots[1].env["CUDA_VISIBLE_DEVICES"] == "6" and "30 GiB free on the smallest GPU" in plan.line()


def test_plan_run_stays_off_the_gpus_when_it_should(two_gpus, monkeypatch):
    monkeypatch.delenv("LLRD_SEARCH_WORKERS", raising=False)
    assert G.plan_run(_objective("cpu"), user_objective=False, workers=None, per_gpu=None, threads=None, remaining=9) is None
    # a user's objective: one unpinned worker unless more are asked for, then round-robin
    assert G.plan_run(_objective("cpu"), user_objective=True, workers=None, per_gpu=None, threads=None, remaining=9) is None
    asked = G.plan_run(_objective("cpu"), user_objective=True, workers=3, per_gpu=None, threads=None, remaining=9)
    assert asked.counts() == [2, 1]


def test_local_workers_pass_each_child_its_gpu(monkeypatch):
    from llrd_search.study import local_workers

    started = []

    class FakeProc:
        returncode = 0

        def __init__(self, argv, env):
            started.append((argv, env))

        def poll(self):
            return 0

    monkeypatch.setattr(local_workers.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(local_workers, "monitored", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    plan = G.gpu_plan(["2", "3"], per_gpu=2, cores=8)
    ran_here = []
    local_workers.run_local_workers("sqlite:///x.db", "s", plan.workers, plan.threads, lambda s, t: None,
                                    in_process=lambda: ran_here.append(os.environ["CUDA_VISIBLE_DEVICES"]),
                                    child_env=[s.env for s in plan.slots])
    assert ran_here == ["2,3"]  # worker 0: this process, its environment untouched
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["3", "2", "3"]
    assert [argv[argv.index("--worker-index") + 1] for argv, _ in started] == ["1", "2", "3"]
    assert {env["OMP_NUM_THREADS"] for _, env in started} == {"2"}


# --------------------------------------------------------------------------- CLI and the start line


def test_cli_workers_per_gpu_parses_and_is_documented(capsys):
    from llrd_search.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "s.toml", "--workers-per-gpu", "2"]).workers_per_gpu == 2
    assert parser.parse_args(["run", "s.toml"]).workers_per_gpu is None  # auto
    assert parser.parse_args(["confirm", "--storage", "u", "--study", "s", "--workers-per-gpu", "auto"]).workers_per_gpu == "auto"
    assert parser.parse_args(["worker", "--storage", "u", "--study", "s", "--gpu", "3"]).gpu == "3"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "s.toml", "--workers-per-gpu", "0"])
    assert "whole number >= 1 or 'auto'" in capsys.readouterr().err
    for command in (["run", "s.toml"], ["confirm", "--storage", "u", "--study", "s"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--help"])
        out = capsys.readouterr().out
        assert "--workers-per-gpu N|auto" in out and "--workers-per-gpu 2" in out.split("example")[-1]


def test_worker_gpu_pins_itself(monkeypatch):
    from llrd_search.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    seen = []
    monkeypatch.setattr("llrd_search.search.join", lambda *a, **k: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]) or 0)
    assert main(["worker", "--storage", "sqlite:///x.db", "--study", "s", "--gpu", "1", "--quiet"]) == 0
    assert seen == ["1"]


def test_start_line_says_what_was_chosen_and_why(capsys):
    from llrd_search.console import ProgressConsole, RunConsole
    from llrd_search.records import Launch

    line = G.gpu_plan(["0", "1", "2", "3"], per_gpu=2, cores=16, reason="auto: ~3.1 GiB per trial, 70 GiB free on the smallest GPU").line()
    RunConsole().started(Launch(8, 2, "on cuda", 20, 0, None, "accuracy", line))
    RunConsole().started(Launch(2, 1, "on cpu", 20, 0, None, "accuracy"))
    ProgressConsole().started(Launch(8, 2, "confirming in 's.confirm'", 6, 0, None, "accuracy", line))
    err = capsys.readouterr().err.splitlines()
    expected = "8 workers: 2 per GPU on 4 GPUs (auto: ~3.1 GiB per trial, 70 GiB free on the smallest GPU), 2 threads each"
    assert err == [expected, "2 workers x 1 thread on cpu", expected]


# --------------------------------------------------------------------------- measured, not estimated


def test_a_resumed_study_sizes_workers_by_its_measured_peak(two_gpus, monkeypatch):
    from optuna.trial import TrialState

    from llrd_search.engine import memory

    def t(state, **attrs):
        return SimpleNamespace(state=state, user_attrs=attrs)

    trials = [t(TrialState.COMPLETE, cuda_peak_bytes=3 * GIB), t(TrialState.PRUNED, cuda_peak_bytes=5 * GIB),
              t(TrialState.RUNNING, cuda_peak_bytes=50 * GIB), t(TrialState.COMPLETE)]
    assert memory.measured_trial_bytes(trials) == 5 * GIB
    assert memory.measured_trial_bytes(trials[2:]) is None
    monkeypatch.delenv("LLRD_SEARCH_WORKERS", raising=False)
    plan = G.plan_run(_objective("cuda"), user_objective=False, workers=None, per_gpu=None, threads=None, remaining=100, measured=10 * GIB)
    # 27 GiB (90 % of the smaller GPU's 30) over 10.5 GiB: 2 per GPU
    assert plan.line() == "4 workers: 2 per GPU on 2 GPUs (auto: ~10 GiB per trial (measured), 30 GiB free on the smallest GPU), 2 threads each"


def test_peak_memory_is_read_on_cuda_only(monkeypatch):
    from llrd_search.engine import memory

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 1234)
    memory.reset_peak(torch.device("cpu"))
    assert memory.peak_bytes(torch.device("cpu")) is None and calls == []
    cuda = torch.device("cuda")
    memory.reset_peak(cuda)
    assert calls == [("reset", cuda)] and memory.peak_bytes(cuda) == 1234


def test_confirm_plans_from_the_stored_spec(two_gpus, monkeypatch, write_study):
    from llrd_search.engine.memory import param_count_estimate
    from llrd_search.spec import load_spec
    from llrd_search.study import storage

    spec = load_spec(write_study())  # the tiny model, fp32, batch 16, max_length 32
    monkeypatch.setattr(storage, "opened_study", lambda url, name: contextlib.nullcontext(None))
    monkeypatch.setattr(storage, "spec_of", lambda study: spec)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.model.name)
    assert G.spec_trial_bytes(spec) == trial_memory_estimate(config, param_count_estimate(config), 16, 32, None)
    # pack = "auto" (the default): one worker per GPU, which packs the trials it claims
    plan = G.plan_confirm("sqlite:///x.db", "s", workers=None, per_gpu=None, threads=None, objective=None, runs=3)
    assert plan.counts() == [1, 1]
    spec.train.pack = 1  # unpacked: as many workers as the memory holds, up to the runs left
    plan = G.plan_confirm("sqlite:///x.db", "s", workers=None, per_gpu=None, threads=None, objective=None, runs=3)
    assert plan.counts() == [2, 1] and plan.line().endswith("; 3 trials left), 2 threads each")
    # a user's objective: only when asked; a study trained on the CPU: never
    assert G.plan_confirm("u", "s", workers=None, per_gpu=None, threads=None, objective="m:f", runs=3) is None
    assert G.plan_confirm("u", "s", workers=None, per_gpu=1, threads=None, objective="m:f", runs=3).counts() == [1, 1]
    spec.train.device = "cpu"
    assert G.plan_confirm("u", "s", workers=None, per_gpu=2, threads=None, objective=None, runs=3) is None


def test_env_workers_is_a_default_that_workers_per_gpu_overrides(two_gpus, monkeypatch):
    monkeypatch.setenv("LLRD_SEARCH_WORKERS", "3")
    obj = _objective("cuda")
    assert G.plan_run(obj, user_objective=False, workers=None, per_gpu=None, threads=None, remaining=9).counts() == [2, 1]
    assert G.plan_run(obj, user_objective=False, workers=None, per_gpu=1, threads=None, remaining=9).counts() == [1, 1]
    with pytest.raises(LLRDSearchError, match="not both"):
        G.plan_run(obj, user_objective=False, workers=4, per_gpu=1, threads=None, remaining=9)


def test_packed_trials_count_against_the_gpu(two_gpus, monkeypatch):
    # [train] pack = K: a worker holds K trials; "auto": packing fills the GPU, one worker on each
    assert G.workers_per_gpu(5 * GIB, 80 * GIB, pack=4) == (3, "auto: ~5.0 GiB per trial x 4 packed, 80 GiB free on the smallest GPU")
    monkeypatch.delenv("LLRD_SEARCH_WORKERS", raising=False)
    obj = _objective("cuda")
    for pack, counts in ((1, [4, 4]), ("auto", [1, 1])):
        obj.spec.train.pack = pack
        plan = G.plan_run(obj, user_objective=False, workers=None, per_gpu=None, threads=None, remaining=100, measured=GIB)
        assert plan.counts() == counts
    assert plan.reason == 'auto: 1 per GPU, [train] pack = "auto" fills it with packed trials'
    obj.spec.train.pack = 8  # 8 x 3 GiB + 0.5 on 27 GiB: 1 a GPU
    assert G.plan_run(obj, user_objective=False, workers=None, per_gpu=None, threads=None, remaining=100, measured=3 * GIB).counts() == [1, 1]
    assert G.pack_of(SimpleNamespace(train=SimpleNamespace())) == 1
