"""Packed trials in a study (study/packs.py): a worker with ``[train] pack = 3`` reaches the same
trials as one training them one at a time, finishes exactly the budget, and leaves no RUNNING trial
when the pack fails or is interrupted.

The tiny BERT here has dropout 0 and trains in fp32 with fast_path off, so a packed trial and its
unpacked twin differ only by float rounding: values must be equal (accuracy on 60 examples moves
in steps of 1/60, far above that rounding)."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import torch
from optuna.trial import TrialState

from llrd_search.engine import packed
from llrd_search.engine.objective import Objective
from llrd_search.engine.packed_trials import auto_pack, resolve_pack
from llrd_search.exceptions import RepeatedFailureError
from llrd_search.spec import TrainSection, load_spec
from llrd_search.study.storage import create_study, load_study, open_storage
from llrd_search.study.worker import INTERRUPTED, run_worker

# Bucketing off: a packed slot then draws the unpacked loop's batches (with it the pack shares length bins).
PACKED = {"fast_path": False, "epochs": 2, "evals_per_epoch": 3, "length_bucketing": False}
SPACE = {"base_lr": "{ low = 3e-3, high = 2e-2, log = true }", "head_lr": "{ low = 3e-3, high = 3e-2, log = true }"}


@pytest.fixture(scope="module")
def still_model(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with every dropout probability 0."""
    folder = tmp_path_factory.mktemp("still-bert")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _study(write_study, still_model, tmp_path, name, pack, n_trials=6, **train):
    path = write_study(f"{name}.toml", name=name, n_trials=n_trials, model=still_model, train={**PACKED, "pack": pack, **train}, space=SPACE)
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    create_study(load_spec(path), open_storage(url))
    return url


def _trials(url, name):
    return sorted(load_study(open_storage(url), name).get_trials(deepcopy=False), key=lambda t: t.number)


def test_auto_pack_fits_the_free_memory_within_its_cap():
    assert auto_pack(10, 100) == 8  # 90 usable bytes hold 9, capped at 8
    assert auto_pack(10, 100, cap=4) == 4
    assert auto_pack(30, 100) == 3  # 90 // 30
    assert auto_pack(31, 100) == 2
    assert auto_pack(200, 100) == 1  # never 0: one trial runs (and may run out of memory)
    assert resolve_pack(TrainSection(), torch.device("cpu"), torch.nn.Linear(2, 2), 32) == 1  # auto on CPU: no packing
    assert resolve_pack(TrainSection(pack=3), torch.device("cpu"), torch.nn.Linear(2, 2), 32) == 3
    assert auto_pack(lambda k: 10 * k + 5 * (k - 1), 100) == 6  # a pack's own extra counts: 6 x 10 + 25 <= 90 < 7 x 10 + 30


def test_a_pack_estimate_counts_its_evaluation_and_a_dropped_slot(tiny_template_and_task):
    from llrd_search.engine.packed_trials import pack_bytes, trial_bytes

    model = tiny_template_and_task[0].model
    cfg, n = TrainSection(eval_batch_size=128), sum(p.numel() for p in tiny_template_and_task[0].model.parameters())
    assert pack_bytes(model, cfg, 64, None, 1) == trial_bytes(model, cfg, 64)
    extra = [pack_bytes(model, cfg, 64, None, k) - k * trial_bytes(model, cfg, 64) for k in (2, 4, 8)]
    assert extra[0] >= 12 * n and extra[0] < extra[1] < extra[2]  # at least the re-sliced weights and moments
    # evaluation at 8 x 128 rows of 64 tokens: one layer's activations (hidden 32, 4 bytes) at the least
    assert extra[2] >= 8 * 128 * 64 * 32 * 4


def test_auto_pack_takes_its_share_of_the_gpu(monkeypatch):
    from llrd_search.engine.memory import GPU_SHARE_ENV

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 140 * 2**30))
    monkeypatch.setattr("llrd_search.engine.packed_trials.pack_bytes", lambda model, cfg, length, dtype, k: k * 10 * 2**30)
    cfg, model = TrainSection(), torch.nn.Linear(2, 2)
    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    assert resolve_pack(cfg, torch.device("cuda"), model, 32) == 8  # 90 GiB usable holds 9, capped
    monkeypatch.setenv(GPU_SHARE_ENV, "4")  # four workers on this GPU: 25 GiB free each
    assert resolve_pack(cfg, torch.device("cuda"), model, 32) == 2


def test_packing_refuses_accumulation_and_checkpointing_and_auto_steps_aside():
    from llrd_search.exceptions import SpecError
    from llrd_search.spec import parse_spec

    base = {"study": {"name": "s", "n_trials": 2}, "model": {"name": "m"}, "data": {"path": "d"}}
    for knob in ({"grad_accum": 2}, {"gradient_checkpointing": True}):
        with pytest.raises(SpecError, match=r"train.*pack: packed trials do not combine with grad_accum > 1 or gradient_checkpointing"):
            parse_spec({**base, "train": {"pack": 2, **knob}})
        cfg = TrainSection(**knob)  # pack = "auto": one copy, even where a GPU would pack
        assert resolve_pack(cfg, torch.device("cuda"), torch.nn.Linear(2, 2), 32) == 1


def test_a_study_run_packed_reaches_the_same_trials_as_one_run_unpacked(write_study, still_model, tmp_path):
    runs = {}
    for name, pack in (("one", 1), ("three", 3)):
        url = _study(write_study, still_model, tmp_path, name, pack)
        assert run_worker(url, name) == 6
        runs[pack] = _trials(url, name)
    curves = {tuple(e["accuracy"] for e in t.user_attrs["evals"]) for t in runs[1]}
    assert len(curves) > 1, curves  # the trials do differ: the comparison below means something
    for one, three in zip(runs[1], runs[3], strict=True):
        assert three.state == one.state == TrialState.COMPLETE
        assert three.params == one.params
        assert three.value == one.value
        assert [e["accuracy"] for e in three.user_attrs["evals"]] == [e["accuracy"] for e in one.user_attrs["evals"]]
        assert three.user_attrs["lr_groups"] == one.user_attrs["lr_groups"]
        assert three.user_attrs["seed"] == one.user_attrs["seed"] and three.user_attrs["steps"] == one.user_attrs["steps"]
        assert three.user_attrs["pack"] == 3 and three.user_attrs["pack_slot"] in (0, 1, 2)
        assert "pack" not in one.user_attrs


def test_a_packed_worker_finishes_exactly_the_budget_refilling_slots(write_study, still_model, tmp_path):
    url = _study(write_study, still_model, tmp_path, "budget", 3, n_trials=5, epochs=1)
    assert run_worker(url, "budget") == 5
    trials = _trials(url, "budget")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert sorted(t.user_attrs["pack_slot"] for t in trials[3:]) == sorted(t.user_attrs["pack_slot"] for t in trials[:2])  # refills took freed slots


def test_a_failing_pack_fails_all_its_trials_and_counts_once(write_study, still_model, tmp_path, monkeypatch):
    url = _study(write_study, still_model, tmp_path, "broken", 3, n_trials=3)
    calls_seen = []

    def always(logits, labels):
        calls_seen.append(1)
        raise RuntimeError("out of luck")

    monkeypatch.setattr(packed, "copy_losses", always)
    with pytest.raises(RepeatedFailureError, match="3 trials in a row failed.*RuntimeError: out of luck"):
        run_worker(url, "broken")
    trials = _trials(url, "broken")
    # one failure per pack of three: the worker stops after three packs, nine trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 9
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: out of luck" for t in trials)
    assert len(calls_seen) == 3


def test_an_interrupted_pack_marks_every_running_trial_and_keeps_the_finished(write_study, still_model, tmp_path):
    # With trials of different lengths (epochs 1 vs the budget's fill), interrupt once the first has ended.
    url = _study(write_study, still_model, tmp_path, "ctrlc", 3, n_trials=4, epochs=1)
    finished = []

    def factory(spec):
        steps = iter(range(10_000))

        def on_step(step, total):
            if next(steps) == 20:  # the first three trials end at pack step 15; the fourth runs
                raise KeyboardInterrupt

        return Objective(spec, on_step=on_step)

    with pytest.raises(KeyboardInterrupt):
        run_worker(url, "ctrlc", objective_factory=factory, on_trial_end=lambda s, t: finished.append(t.number))
    trials = _trials(url, "ctrlc")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL, TrialState.WAITING]
    assert trials[3].user_attrs["fail_reason"] == INTERRUPTED
    assert trials[4].params == trials[3].params and trials[4].user_attrs["llrd:seed"] == trials[3].user_attrs["seed"]  # re-queued
    assert finished == [0, 1, 2]
    assert not any(t.state == TrialState.RUNNING for t in trials)


def test_a_user_objective_never_packs(write_study, still_model, tmp_path):
    url = _study(write_study, still_model, tmp_path, "user", 3, n_trials=2)

    def factory(spec):
        def objective(trial: optuna.Trial) -> float:
            trial.suggest_float("base_lr", 3e-3, 2e-2, log=True)
            return 0.5

        return objective

    assert run_worker(url, "user", objective_factory=factory) == 2
    assert all("pack" not in t.user_attrs for t in _trials(url, "user"))


def test_out_of_memory_in_a_pack_halves_it_and_finishes_every_trial_once(write_study, still_model, tmp_path, monkeypatch, caplog):
    url = _study(write_study, still_model, tmp_path, "oom", 4, n_trials=6, epochs=1)
    real, calls = packed.copy_losses, []

    def short_of_memory(logits, labels):
        calls.append(labels.shape[0])
        if labels.shape[0] == 4 and len(calls) == 5:  # the pack of four, at its fifth step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(logits, labels)

    monkeypatch.setattr(packed, "copy_losses", short_of_memory)
    with caplog.at_level("WARNING"):
        assert run_worker(url, "oom") == 6
    trials = _trials(url, "oom")
    assert len(trials) == 6 and [t.state for t in trials] == [TrialState.COMPLETE] * 6  # none lost, none told twice
    assert "out of device memory with 4 trials packed; the 4 unfinished start again, 2 per pack" in caplog.text
    assert max(calls[5:]) == 2  # every later pack has two copies at most
    assert [t.user_attrs["pack"] for t in trials] == [2] * 6  # the first four restarted, with the halved pack
    assert all(t.user_attrs["steps"] == trials[0].user_attrs["steps"] for t in trials)  # each trained a whole run
    one = _study(write_study, still_model, tmp_path, "oom-alone", 1, n_trials=6, epochs=1)
    assert run_worker(one, "oom-alone") == 6
    assert [t.value for t in trials] == [t.value for t in _trials(one, "oom-alone")]  # the same trials, the same values


def test_resuming_with_another_pack_is_said_in_the_start_line(write_study, still_model, tmp_path, capsys):
    from llrd_search.cli import main

    url = _study(write_study, still_model, tmp_path, "repack", 2, n_trials=2, epochs=1)
    path = tmp_path / "repack.toml"
    assert main(["run", str(path), "--storage", url, "--workers", "1"]) == 0
    assert "note:" not in capsys.readouterr().err  # a new study: nothing to compare with
    path.write_text(path.read_text().replace("pack = 2", "pack = 3"))
    assert main(["run", str(path), "--storage", url, "--workers", "1", "--n-trials", "3"]) == 0
    err = capsys.readouterr().err
    assert (" on cpu; note: this run packs 3 trials at a time, the study's 2 finished trials ran with pack = 2 "
            "(a packed trial's metric depends on its packmates' dropout draws)") in err


def test_the_start_lines_pack_note_reads_no_gpu_memory_in_the_parent(monkeypatch):
    # pack = "auto" on CUDA is sized by each worker; reading free memory here would hold a CUDA
    # context on the GPU in the parent for the whole run.
    from types import SimpleNamespace

    from llrd_search import search

    def no_context(*_a, **_k):
        raise AssertionError("the parent asked CUDA for memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_context)
    spec = SimpleNamespace(train=SimpleNamespace(pack="auto", grad_accum=1, gradient_checkpointing=False))
    objective = SimpleNamespace(template=SimpleNamespace(model=None), device=torch.device("cuda"), dtype=None)
    assert search._pack_change(spec, objective, "sqlite:///unused.db", "unused") == ""
