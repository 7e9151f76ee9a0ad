"""Big models: gradient accumulation, gradient checkpointing, out-of-memory trials, the per-device
fast path, and a 24-layer RoBERTa-large-shaped model trained on CPU (tiny hidden size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llrd_search.engine import fastpath
from llrd_search.engine import train as tr
from llrd_search.engine.fastpath import FastDropout, FastPath, fast_path
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.engine.train import (
    batch_order,
    evaluate,
    fresh_model,
    linear_schedule,
    micro_batches,
    train_and_evaluate,
)
from llrd_search.exceptions import OutOfMemoryError
from llrd_search.spec import TrainSection, parse_spec
from llrd_search.study.claims import FailureCounter, error_signature

CPU = torch.device("cpu")
LR = {"base_lr": 1e-3, "decay": 0.8, "head_lr": 1e-2}


@pytest.fixture(scope="module")
def setup(tiny_template_and_task):
    template, task = tiny_template_and_task
    return template, task


def _cfg(**kw) -> TrainSection:
    return TrainSection(**{"epochs": 1, "batch_size": 16, "evals_per_epoch": 2, "precision": "fp32", "device": "cpu", **kw})


def _train(template, task, cfg, *, dropout: bool = True, **kw):
    model = fresh_model(template, 0)
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    result = train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None, **kw)
    return model, result


def _reference(template, task, cfg):
    """The loop as it was before grad_accum existed, line for line: what grad_accum = 1 must train."""
    model = fresh_model(template, 0)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model.train()
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    eval_every = {min(steps_per_epoch, round(steps_per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
    with fast_path(model, groups, FastPath(), token_ids=np.append(task.train.ids, 0), seed=0, device=CPU) as run:
        scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, linear_schedule(steps_per_epoch * cfg.epochs, cfg.warmup_ratio))
        for _epoch in range(cfg.epochs):
            for i, idx in enumerate(batch_order(task.train.lengths, cfg.batch_size, rng, cfg.length_bucketing), 1):
                loss = model(**task.train.batch(idx, 0)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True)
                run.step()
                scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                if i in eval_every:
                    evaluate(model, task.validation, pad_id=0, batch_size=cfg.eval_batch_size, device=CPU, dtype=None)
    return model


# --------------------------------------------------------------------------- gradient accumulation


def test_micro_batches_are_consecutive_pieces_of_the_batch():
    idx = np.arange(10, 26)
    assert [p.tolist() for p in micro_batches(idx, 1)] == [idx.tolist()]
    assert [p.tolist() for p in micro_batches(idx, 4)] == [list(range(10 + 4 * k, 14 + 4 * k)) for k in range(4)]
    assert [len(p) for p in micro_batches(np.arange(5), 4)] == [2, 1, 1, 1]  # a short last batch
    assert [len(p) for p in micro_batches(np.arange(2), 4)] == [1, 1]  # never an empty piece


def test_grad_accum_must_divide_the_batch_and_names_the_key():
    base = {"study": {"name": "s", "n_trials": 1}, "model": {"name": "m"}, "data": {"path": "d"}}
    with pytest.raises(Exception, match=r"train\.grad_accum: 3 does not divide train\.batch_size \(32\).*1, 2, 4, 8"):
        parse_spec({**base, "train": {"batch_size": 32, "grad_accum": 3}})
    with pytest.raises(Exception, match=r"train\.grad_accum: must be >= 1"):
        parse_spec({**base, "train": {"grad_accum": 0}})
    spec = parse_spec({**base, "train": {"batch_size": 32, "grad_accum": 4, "gradient_checkpointing": True}})
    plain = parse_spec({**base, "train": {"batch_size": 32}})
    # Memory knobs, not the search: a study resumes with them changed, and old studies keep their identity.
    assert spec.fingerprint() == plain.fingerprint()
    assert "grad_accum" not in plain.identity()["train"]


def test_grad_accum_1_trains_bit_identically_to_the_loop_before_it(setup):
    template, task = setup
    cfg = _cfg()
    ours, _ = _train(template, task, cfg)
    reference = _reference(template, task, cfg)
    for (name, p), q in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_grad_accum_2_trains_the_weights_of_one_full_batch(setup):
    """Micro-batches of 18 (or 9) then one optimizer step = the step of the batch of 36, up to float
    rounding (their padding differs), also on the epoch's short last batch."""
    template, task = setup
    assert len(task.train) % 36 == 24  # a short last batch is in the test
    one, r1 = _train(template, task, _cfg(batch_size=36), dropout=False, fast=FastPath.off())
    two, r2 = _train(template, task, _cfg(batch_size=36, grad_accum=2), dropout=False, fast=FastPath.off())
    three, _ = _train(template, task, _cfg(batch_size=36, grad_accum=4), dropout=False, fast=FastPath.off())
    assert r1.steps == r2.steps == math.ceil(len(task.train) / 36)
    start = fresh_model(template, 0).state_dict()
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(three.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
    moved = (one.state_dict()["classifier.weight"] - start["classifier.weight"]).abs().max()
    assert moved > 1e-3  # the tolerance is far below what training moved


def test_the_divergence_guard_sees_one_loss_per_optimizer_step(setup, monkeypatch):
    template, task = setup
    seen: list[tuple[list[float], int]] = []
    real = tr._check_losses
    monkeypatch.setattr(tr, "_check_losses", lambda losses, first, guard: seen.append(([float(x) for x in losses], first)) or real(losses, first, guard))
    _, result = _train(template, task, _cfg(grad_accum=2), dropout=False, fast=FastPath.off())
    assert [first for _, first in seen] == list(range(result.steps))
    assert all(len(losses) == 1 and 0.3 < losses[0] < 1.2 for losses, _ in seen)  # a full batch's mean, not a half


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_weights(setup):
    template, task = setup
    calls = {"n": 0}
    torch_dropout = FastPath(numpy_dropout=False, bf16_attention=False)

    def count(module, args):
        calls["n"] += module.training

    plain, _ = _train(template, task, _cfg(), fast=torch_dropout)
    model = fresh_model(template, 0)
    # Inside the layer (transformers checkpoints a layer's forward, its own hooks run once), and a
    # pre-hook: the recompute stops as soon as it has what the backward needs.
    hook = model.bert.encoder.layer[0].intermediate.register_forward_pre_hook(count)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    result = train_and_evaluate(model, task, groups, _cfg(gradient_checkpointing=True), seed=0, pad_id=0, device=CPU, dtype=None, fast=torch_dropout)
    hook.remove()
    assert calls["n"] == 2 * result.steps  # each layer ran again in the backward
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # left as it was
    # torch's dropout draws the same masks when a checkpointed layer runs again: the same training.
    for (name, p), q in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_keeps_numpy_dropout_out(setup, monkeypatch):
    """numpy's dropout stream would draw other masks when a layer is recomputed: off under checkpointing."""
    template, task = setup
    used: list[FastPath] = []
    real = tr.fast_path
    monkeypatch.setattr(tr, "fast_path", lambda model, groups, options, **kw: used.append(options) or real(model, groups, options, **kw))
    seen: list[bool] = []
    model = fresh_model(template, 0)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    train_and_evaluate(model, task, groups, _cfg(gradient_checkpointing=True), seed=0, pad_id=0, device=CPU, dtype=None,
                       on_step=lambda step, total: seen.append(any(isinstance(m, FastDropout) for m in model.modules())))
    assert used == [FastPath(numpy_dropout=False, bf16_attention=False)] and not any(seen)


# --------------------------------------------------------------------------- fast path per device


def test_fast_path_per_device():
    assert FastPath.for_device("cpu") == FastPath() == FastPath.for_device(CPU)  # the CPU keeps every stand-in
    cuda = FastPath.for_device("cuda:1")
    assert (cuda.numpy_dropout, cuda.bf16_attention) == (False, False)
    assert (cuda.fused_adamw, cuda.vocab_rows, cuda.fused_qkv) == (True, True, True)


def test_train_picks_the_fast_path_of_its_device(setup, monkeypatch):
    template, task = setup
    used: list[FastPath] = []
    real = tr.fast_path
    monkeypatch.setattr(tr, "fast_path", lambda model, groups, options, **kw: used.append(options) or real(model, groups, options, **kw))
    monkeypatch.setattr(FastPath, "for_device", classmethod(lambda cls, device: cls(fused_qkv=str(device) != "cpu")))
    _train(template, task, _cfg())
    _train(template, task, _cfg(fast_path=False))
    assert used == [FastPath(fused_qkv=False), FastPath.off()]


# --------------------------------------------------------------------------- out of memory


def _oom(*_a, **_k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_ends_the_trial_with_one_line_naming_the_fix(setup, monkeypatch):
    template, task = setup
    monkeypatch.setattr(fastpath.FastRun, "step", lambda self: _oom())
    model = fresh_model(template, 0)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    with pytest.raises(OutOfMemoryError) as info:
        train_and_evaluate(model, task, groups, _cfg(), seed=0, pad_id=0, device=CPU, dtype=None)
    message = str(info.value)
    longest = int(task.train.lengths.max())
    assert message.startswith(f"CPU out of memory at batch_size 16, max_length {longest} (needs ~")
    assert message.endswith("GiB free): lower [train] batch_size, set [train] grad_accum = 2 or more, or [train] gradient_checkpointing = true")
    assert "\n" not in message
    # Raised after the torch error was let go: no traceback holding the step's tensors hangs on it.
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert all(p.grad is None for p in model.parameters())
    assert not any(isinstance(m, (fastpath.TrainVocabEmbedding, FastDropout)) for m in model.modules())


def test_out_of_memory_in_the_forward_and_in_evaluation(setup, monkeypatch):
    template, task = setup
    model = fresh_model(template, 0)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    monkeypatch.setattr(model, "forward", lambda **kw: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried to allocate 20 MiB")))
    with pytest.raises(OutOfMemoryError, match=r"grad_accum = 4 or more, or \[train\] gradient_checkpointing = true$"):
        train_and_evaluate(model, task, groups, _cfg(grad_accum=2), seed=0, pad_id=0, device=CPU, dtype=None)
    monkeypatch.undo()
    monkeypatch.setattr(tr, "evaluate", _oom)
    model = fresh_model(template, 0)
    groups = build_param_groups(model, weight_decay=0.01, **LR)
    with pytest.raises(OutOfMemoryError, match=r"^CPU out of memory evaluating at eval_batch_size 128, .*: lower \[train\] eval_batch_size$"):
        train_and_evaluate(model, task, groups, _cfg(), seed=0, pad_id=0, device=CPU, dtype=None)
    monkeypatch.setattr(tr, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("some other error")))
    model = fresh_model(template, 0)
    with pytest.raises(RuntimeError, match="some other error"):  # only out-of-memory is turned into the one line
        train_and_evaluate(model, task, build_param_groups(model, **LR), _cfg(), seed=0, pad_id=0, device=CPU, dtype=None)


def test_cuda_out_of_memory_frees_the_cache_and_reports_free_memory(setup, monkeypatch):
    from llrd_search.engine import memory_guard

    template, _ = setup
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 1024**3, 80 * 1024**3))
    err = memory_guard.out_of_memory_error(template.model, _cfg(batch_size=32, gradient_checkpointing=True), longest=256,
                                           evaluating=False, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert emptied == [True]
    assert str(err).startswith("CUDA out of memory at batch_size 32, max_length 256 (needs ~")
    assert str(err).endswith(", 3.0 GiB free): lower [train] batch_size, or set [train] grad_accum = 2 or more")


def test_repeated_out_of_memory_stops_the_worker():
    """The same batch never fits: three trials in a row out of memory are a broken setup."""
    a = OutOfMemoryError("CUDA out of memory at batch_size 32, max_length 256 (needs ~41.2 GiB, 3.1 GiB free): lower [train] batch_size")
    b = OutOfMemoryError("CUDA out of memory at batch_size 32, max_length 256 (needs ~41.2 GiB, 2.9 GiB free): lower [train] batch_size")
    assert error_signature(a) == error_signature(b)
    failures = FailureCounter(3)
    assert [failures.record(e) for e in (a, b, a)] == [False, False, True]


# --------------------------------------------------------------------------- a RoBERTa-large-shaped model


def test_24_layer_roberta_large_shape_trains_with_accumulation_and_checkpointing(setup, monkeypatch):
    """The seed's setting: 24 layers, base 5e-6, decay 0.95, head 5e-5 (tiny hidden size: CPU)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    _, task = setup
    torch.manual_seed(0)
    config = RobertaConfig(num_hidden_layers=24, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           vocab_size=64, pad_token_id=0, max_position_embeddings=40, num_labels=2)
    model = RobertaForSequenceClassification(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = build_param_groups(model, base_lr=5e-6, decay=0.95, head_lr=5e-5, weight_decay=0.01)
    expected = {"embeddings": 5e-6 * 0.95**24, **{f"layer.{i}": 5e-6 * 0.95 ** (23 - i) for i in range(24)}, "head": 5e-5}
    assert expected["embeddings"] == pytest.approx(1.46e-6, abs=0.005e-6)
    made: list[torch.optim.Optimizer] = []
    real = fastpath.make_optimizer
    monkeypatch.setattr(fastpath, "make_optimizer", lambda groups, **kw: made.append(real(groups, **kw)) or made[-1])
    losses: list[float] = []
    check = tr._check_losses
    monkeypatch.setattr(tr, "_check_losses", lambda ls, first, guard: losses.extend(float(x) for x in ls) or check(ls, first, guard))
    forwards = {"n": 0}
    # A pre-hook inside the layer: the recompute stops once it has what the backward needs.
    model.roberta.encoder.layer[23].intermediate.register_forward_pre_hook(lambda m, a: forwards.__setitem__("n", forwards["n"] + m.training))

    cfg = TrainSection(epochs=1, batch_size=16, grad_accum=2, gradient_checkpointing=True, evals_per_epoch=1, precision="fp32", device="cpu")
    result = train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None)

    for group in made[0].param_groups:  # every optimizer group starts at its layer's LR from the table
        assert group["initial_lr"] == pytest.approx(expected[group["layer"]], rel=1e-12, abs=0)
    assert {g["layer"] for g in made[0].param_groups} == set(expected)
    assert forwards["n"] == 2 * 2 * result.steps  # two micro-batches a step, each layer run again in the backward
    assert len(losses) == result.steps and all(math.isfinite(x) for x in losses)
    after = model.state_dict()
    for name in ("roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight",
                 "roberta.encoder.layer.0.attention.self.query.weight", "roberta.encoder.layer.23.output.dense.weight", "classifier.out_proj.weight"):
        assert not torch.equal(after[name], before[name]), f"{name} did not move"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_out_of_memory_trials_fail_free_their_model_and_stop_the_worker(setup, write_study, tmp_path, monkeypatch):
    """Through the worker: each trial ends FAIL with the one line, its model is gone from memory
    when the error reaches the worker (not when the worker lets go of it), and the third in a row
    stops the worker (the batch never fits)."""
    import weakref

    import optuna

    from llrd_search.engine import objective as objective_module
    from llrd_search.exceptions import RepeatedFailureError
    from llrd_search.search import create
    from llrd_search.spec import load_spec
    from llrd_search.study.worker import run_worker

    template, task = setup
    path = write_study(name="oom", n_trials=6)
    url = f"sqlite:///{tmp_path / 'oom.db'}"
    create(path, storage=url)
    models: list[weakref.ref] = []
    real = objective_module.fresh_model

    def fresh(template, seed):
        model = real(template, seed)
        model.forward = _oom
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(objective_module, "fresh_model", fresh)
    objective = objective_module.Objective(load_spec(path), task=task, template=template)
    freed: list[bool] = []

    def watched(trial):
        try:
            return objective(trial)
        except OutOfMemoryError:
            freed.append(models[-1]() is None)  # the error and its traceback are still alive here
            raise

    with pytest.raises(RepeatedFailureError, match="3 trials in a row failed"):
        run_worker(url, "oom", objective_factory=lambda spec: watched)
    failed = optuna.load_study(study_name="oom", storage=url).get_trials()
    assert [t.state.name for t in failed] == ["FAIL"] * 3
    assert failed[0].user_attrs["fail_reason"].startswith("OutOfMemoryError: CPU out of memory at batch_size 16, max_length ")
    assert freed == [True, True, True]


def test_batches_go_to_a_gpu_from_pinned_memory():
    """On CUDA a batch is pinned first, so its copy is queued instead of waiting for the GPU; a CPU batch is left alone."""
    calls: list = []

    class Fake:
        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            calls.append((str(device), non_blocking))
            return self

    tr.to_device({"input_ids": Fake()}, torch.device("cuda"))
    assert calls == ["pin", ("cuda", True)]
    calls.clear()
    tr.to_device({"input_ids": Fake()}, CPU)
    assert calls == [("cpu", True)]
