"""Unit tests of the training loop (tiny BERT, toy data, CPU, fp32: seconds each)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llrd_search.engine import fastpath
from llrd_search.engine import train as tr
from llrd_search.engine.fastpath import FastDropout, FastPath, TrainVocabEmbedding
from llrd_search.engine.fused_qkv import FusedQKV
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.engine.train import (
    batch_order,
    fresh_model,
    linear_schedule,
    pick_precision,
    train_and_evaluate,
)
from llrd_search.exceptions import LLRDSearchError, TrainingError
from llrd_search.spec import TrainSection
from llrd_search.study import local_workers as lw

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_template_and_task):
    template, task = tiny_template_and_task
    return template, task


def _train(template, task, *, seed=0, epochs=1, lr=(1e-3, 0.5, 1e-2), wd=0.01, **kw):
    model = fresh_model(template, seed)
    base_lr, decay, head_lr = lr
    groups = build_param_groups(model, base_lr=base_lr, decay=decay, head_lr=head_lr, weight_decay=wd)
    cfg = TrainSection(epochs=epochs, batch_size=16, evals_per_epoch=2, precision="fp32", device="cpu")
    result = train_and_evaluate(model, task, groups, cfg, seed=seed, pad_id=0, device=CPU, dtype=None, **kw)
    return model, result


# --------------------------------------------------------------------------- schedule and batches


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(total_steps=20, warmup_ratio=0.1)  # warmup = 2 steps
    assert [f(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 17 / 18])
    assert f(20) == 0.0
    assert all(f(s) > f(s + 1) for s in range(2, 20))
    assert linear_schedule(10, 0.0)(0) == 1.0


def test_every_group_keeps_its_ratio_to_the_others_at_every_step(setup, monkeypatch):
    template, task = setup
    made: list[torch.optim.Optimizer] = []
    real = fastpath.make_optimizer
    monkeypatch.setattr(fastpath, "make_optimizer", lambda groups, **kw: made.append(real(groups, **kw)) or made[-1])
    seen: list[list[float]] = []
    _, result = _train(template, task, on_step=lambda step, total: seen.append([g["lr"] for g in made[0].param_groups]))
    initial = [g["initial_lr"] for g in made[0].param_groups]
    assert len(set(initial)) > 2  # LLRD: several distinct LRs
    f = linear_schedule(result.steps, 0.1)
    assert len(seen) == result.steps
    for step, lrs in enumerate(seen, 1):
        assert lrs == pytest.approx([lr0 * f(step) for lr0 in initial], rel=1e-12, abs=0)


def test_batch_order_covers_every_example_once_and_bucketing_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 80, size=1000)
    for bucketing in (False, True):
        batches = batch_order(lengths, 32, np.random.default_rng(1), bucketing)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    pad = {b: sum(len(x) * lengths[x].max() - lengths[x].sum() for x in batch_order(lengths, 32, np.random.default_rng(1), b)) for b in (False, True)}
    assert pad[True] < pad[False] / 5


# --------------------------------------------------------------------------- hardware choices


def test_pick_precision(monkeypatch):
    assert pick_precision("fp32", CPU) is None
    assert pick_precision("bf16", CPU) is torch.bfloat16
    monkeypatch.setattr(tr, "cpu_has_fast_bf16", lambda: True)
    assert pick_precision("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(tr, "cpu_has_fast_bf16", lambda: False)
    assert pick_precision("auto", CPU) is None


def test_forced_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(tr, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="llrd_search.engine.train"):
        assert pick_precision("bf16", CPU) is torch.bfloat16  # the user asked: honoured, with a warning
    assert "train.precision = 'bf16'" in caplog.text and "fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(tr, "cpu_has_fast_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="llrd_search.engine.train"):
        pick_precision("bf16", CPU)
    assert caplog.text == ""


GB = 1_000_000_000


def test_auto_workers_one_per_core_within_memory_trials_and_cap():
    minilm = 22_700_000  # worker_memory: 24 B/param + 1.5 GB = 2.04 GB
    assert lw.worker_memory(minilm) == 24 * minilm + 1_500_000_000
    assert lw.auto_workers(minilm, cuda=False, remaining=12, cores=2, memory=24 * GB) == 2
    assert lw.auto_workers(minilm, cuda=False, remaining=12, cores=64, memory=512 * GB) == lw.MAX_AUTO_WORKERS
    assert lw.auto_workers(minilm, cuda=False, remaining=12, cores=16, memory=8 * GB) == 3  # 6.4 GB usable / 2.04
    assert lw.auto_workers(minilm, cuda=False, remaining=1, cores=16, memory=64 * GB) == 1
    assert lw.auto_workers(minilm, cuda=False, remaining=0, cores=16, memory=64 * GB) == 1
    assert lw.auto_workers(minilm, cuda=False, remaining=12, cores=16, memory=1 * GB) == 1
    assert lw.auto_workers(minilm, cuda=True, remaining=12, cores=16, memory=64 * GB) == 1
    assert lw.auto_workers(335_000_000, cuda=False, remaining=12, cores=16, memory=32 * GB) == 2  # RoBERTa-large: 9.5 GB each


def test_workers_env(monkeypatch):
    monkeypatch.setenv("LLRD_SEARCH_WORKERS", "3")
    assert lw.workers_from_env() == 3
    monkeypatch.setenv("LLRD_SEARCH_WORKERS", "")
    assert lw.workers_from_env() is None
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LLRD_SEARCH_WORKERS", bad)
        with pytest.raises(LLRDSearchError, match=f"LLRD_SEARCH_WORKERS: must be a whole number >= 1 \\(got '{bad}'\\)"):
            lw.workers_from_env()


def test_make_optimizer_is_fused_on_cpu():
    p = torch.nn.Parameter(torch.zeros(3))
    assert fastpath.make_optimizer([{"params": [p], "lr": 1e-3}]).defaults["fused"] is True
    plain = fastpath.make_optimizer([{"params": [p], "lr": 1e-3}], fused=False).defaults
    assert (plain["fused"], plain["foreach"]) == (None, True)


# --------------------------------------------------------------------------- model copies


def test_fresh_model_redraws_only_the_head_deterministically(setup):
    template, _ = setup
    a, b, c = fresh_model(template, 1), fresh_model(template, 1), fresh_model(template, 2)
    ref = dict(template.model.named_parameters())
    heads = tuple(template.head_modules)
    assert heads
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
        if name.startswith(heads):
            if p.ndim > 1:
                assert not torch.equal(p, dict(c.named_parameters())[name])
        else:
            assert torch.equal(p, ref[name])
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(template.model.parameters()))


# --------------------------------------------------------------------------- the loop


def test_train_and_evaluate_learns_the_toy_task(setup):
    template, task = setup
    _, result = _train(template, task, epochs=4, lr=(1e-2, 0.8, 1e-2))
    assert result.best_accuracy > 0.8
    assert result.steps == 4 * -(-len(task.train) // 16)
    assert len(result.evals) == 8 and result.examples_per_second > 0


def test_train_vocab_rows_match_dense_adamw_exactly(setup):
    template, task = setup
    vocab = template.model.get_input_embeddings().num_embeddings
    assert len(np.unique(task.train.ids)) < vocab - 3  # some rows are never seen: the case at stake
    sparse, r1 = _train(template, task)
    dense, r2 = _train(template, task, fast=FastPath(vocab_rows=False))
    assert r1.evals == r2.evals
    for (name, p), q in zip(sparse.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # The original module is back, and its unseen rows carry the weight decay they were owed.
    emb = sparse.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding
    unseen = np.setdiff1d(np.arange(vocab), np.unique(task.train.ids))
    before = template.model.get_input_embeddings().weight[unseen]
    assert not torch.equal(emb.weight[unseen], before)
    torch.testing.assert_close(emb.weight[unseen], dense.get_input_embeddings().weight[unseen])


def test_fused_qkv_trains_like_three_linears(setup):
    template, task = setup
    fused, r1 = _train(template, task)
    plain, r2 = _train(template, task, fast=FastPath(fused_qkv=False))
    assert r1.evals == r2.evals
    for (name, p), q in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    attention = fused.base_model.encoder.layer[0].attention.self
    assert all(type(getattr(attention, n)) is torch.nn.Linear for n in ("query", "key", "value"))
    assert not torch.equal(attention.key.weight, template.model.base_model.encoder.layer[0].attention.self.key.weight)


def test_on_eval_can_stop_training_and_the_embedding_is_restored(setup):
    template, task = setup
    steps: list[int] = []

    class Stop(Exception):
        pass

    def stop(step, acc):
        raise Stop(step)

    model = fresh_model(template, 0)
    groups = build_param_groups(model, base_lr=1e-3, decay=0.5, head_lr=1e-2)
    cfg = TrainSection(epochs=2, batch_size=16, evals_per_epoch=2, precision="fp32")
    with pytest.raises(Stop) as err:
        train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None, on_eval=stop, on_step=lambda s, t: steps.append(s))
    assert steps[-1] == err.value.args[0] < len(task.train) // 16
    # Every training-time stand-in is gone again.
    assert not any(isinstance(m, TrainVocabEmbedding | FastDropout | FusedQKV) for m in model.modules())
    assert any(type(m) is torch.nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_non_finite_loss_raises_naming_the_step(setup):
    template, task = setup
    model = fresh_model(template, 0)
    calls = []

    def poison(module, args, kwargs, output):
        calls.append(1)
        if len(calls) == 3:
            output["loss"] = output.loss * float("nan")
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    groups = build_param_groups(model, base_lr=1e-3, decay=0.5, head_lr=1e-2)
    cfg = TrainSection(epochs=1, batch_size=16, precision="fp32")
    with pytest.raises(TrainingError, match=r"loss became nan at step 2\b"):
        train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None)


# --------------------------------------------------------------------------- CPU stand-ins


def test_fast_dropout_drops_p_and_keeps_the_mean():
    x = torch.ones(1000, 1000)
    drop = FastDropout(0.1, np.random.default_rng(0))
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.002
    assert abs(y.mean().item() - 1.0) < 0.005
    assert torch.equal(FastDropout(0.1, np.random.default_rng(0))(x), y)  # seeded
    assert not torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x


def test_training_attention_is_softmax_dropout_matmul():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # padding in the second example
    module = torch.nn.Module()
    module.dropout = FastDropout(0.0, np.random.default_rng(0))
    plain, _ = fastpath.attention(module, q, k, v, mask, dropout=0.0, scaling=0.5)
    torch.testing.assert_close(plain, sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.5)[0])
    module.dropout = FastDropout(0.5, np.random.default_rng(1))
    out, _ = fastpath.attention(module, q, k, v, mask, dropout=0.5, scaling=0.5)
    bits = torch.from_numpy(np.random.default_rng(1).integers(0, 65536, 2 * 3 * 5 * 5, dtype=np.uint16).view(np.int16)).view(2, 3, 5, 5)
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")), -1)
    expected = (probs * (bits >= 0).float() * 2.0) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2))


class _CountingDropout(FastDropout):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_bf16_attention_stand_in_matches_sdpa_in_bf16(padded):
    """The attention stand-in against torch's SDPA on the same bf16 inputs. Dropout probability 0 in
    the module (but a dropout rate in the call) takes the stand-in's own path without dropping anything.

    Tolerance: atol = rtol = 2**-5, four bf16 ulps at 1.0. The stand-in rounds the scores q·kᵀ and the
    probabilities to bf16, which SDPA keeps in fp32; that is one bf16 rounding (2**-8 relative) each,
    which the softmax of scores up to ~4 and the sum over 29 keys amplify a few times (the largest
    difference on these seeded inputs is about 2**-6). Ignoring the padding mask moves outputs by ~1.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    batch, heads, length, dim = 3, 4, 29, 32
    q, k, v = (torch.randn(batch, heads, length, dim).bfloat16() for _ in range(3))
    mask = None
    if padded:  # transformers' sdpa mask: bool [batch, 1, query, key], True where a key is a real token
        real = torch.arange(length)[None, :] < torch.tensor([29, 17, 5])[:, None]
        mask = real[:, None, None, :].expand(batch, 1, length, length)
    module = torch.nn.Module().train()
    module.dropout = _CountingDropout(0.0, np.random.default_rng(0))
    ours, _ = fastpath.attention(module, q, k, v, mask, dropout=0.1, scaling=dim**-0.5)
    assert module.dropout.calls == 1  # the stand-in's path ran, not the SDPA it hands other calls to
    reference = sdpa(q, k, v, attn_mask=mask, scale=dim**-0.5).transpose(1, 2)
    assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape == (batch, length, heads, dim)
    torch.testing.assert_close(ours.float(), reference.float(), atol=2**-5, rtol=2**-5)
    if padded:
        unmasked = sdpa(q, k, v, scale=dim**-0.5).transpose(1, 2).float()
        assert (ours.float() - unmasked).abs().max() > 0.25  # the tolerance does tell masked from unmasked


@pytest.mark.parametrize("on", [True, False], ids=["fast_path-true", "fast_path-false"])
def test_train_fast_path_key_reaches_training(setup, tiny_model_dir, toy_data_dir, monkeypatch, on):
    """``[train] fast_path`` from the study file, through the objective, decides what trains: with false
    the model keeps its own modules and attention at every step and AdamW is not fused."""
    import optuna

    from llrd_search.engine import objective as objective_module
    from llrd_search.spec import parse_spec

    template, task = setup
    spec = parse_spec({
        "study": {"name": "fp", "n_trials": 1},
        "model": {"name": str(tiny_model_dir), "max_length": 32},
        "data": {"path": str(toy_data_dir)},
        "train": {"epochs": 1, "batch_size": 16, "precision": "fp32", "device": "cpu", "fast_path": on},
        "space": {"base_lr": [1e-3], "head_lr": [1e-2], "decay": [0.5]},
    })
    models: list[torch.nn.Module] = []
    real_fresh = objective_module.fresh_model
    monkeypatch.setattr(objective_module, "fresh_model", lambda t, seed: models.append(real_fresh(t, seed)) or models[-1])
    made: list[torch.optim.Optimizer] = []
    real_make = fastpath.make_optimizer
    monkeypatch.setattr(fastpath, "make_optimizer", lambda groups, **kw: made.append(real_make(groups, **kw)) or made[-1])
    seen: list[tuple[set[type], str]] = []

    def look(step: int, total: int) -> None:
        model = models[-1]
        seen.append(({type(m) for m in model.modules()}, model.config._attn_implementation))

    objective = objective_module.Objective(spec, task=task, template=template, on_step=look)
    optuna.create_study(direction="maximize").optimize(objective, n_trials=1)
    stand_ins = {TrainVocabEmbedding, FusedQKV, FastDropout}
    assert len(seen) == -(-len(task.train) // 16)
    for types, attention in seen:
        assert (types & stand_ins, attention) == ((stand_ins, fastpath.ATTENTION) if on else (set(), "sdpa"))
    assert made[0].defaults["fused"] is (True if on else None)


FAMILIES = {
    "bert": {},
    "roberta": {},
    "electra": {"embedding_size": 16},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37},
    "albert": {"embedding_size": 16},
    "mpnet": {},
    "deberta-v2": {"relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"]},
    "modernbert": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_stand_ins_are_exact_and_leave_every_family_as_it_was(family):
    """Fused AdamW, vocabulary rows and fused q/k/v change no number beyond float rounding (dropout
    masks drawn alike on both sides), and every module is back afterwards, across the supported
    encoder families."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from llrd_search.engine.data import Encoded, TaskData

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "vocab_size": 99, "max_position_embeddings": 64}
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **tiny, **FAMILIES[family], num_labels=2)
    base = AutoModelForSequenceClassification.from_config(config)
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 12, size=24)
    ids = rng.integers(5, 60, size=int(lengths.sum())).astype(np.int32)  # rows 60-98 are never seen
    enc = Encoded(ids=ids, offsets=np.concatenate([[0], np.cumsum(lengths)]), labels=rng.integers(0, 2, size=24))
    task = TaskData(train=enc, validation=enc, test=None, id2label={0: "0", 1: "1"}, fingerprint="t")
    cfg = TrainSection(epochs=1, batch_size=8, evals_per_epoch=1, precision="fp32")
    models = []
    for fast in (FastPath(), FastPath(fused_adamw=False, vocab_rows=False, fused_qkv=False)):
        model = copy.deepcopy(base)
        before = [type(m) for m in model.modules()]
        groups = build_param_groups(model, base_lr=1e-3, decay=0.8, head_lr=1e-2, weight_decay=0.01)
        train_and_evaluate(model, task, groups, cfg, seed=0, pad_id=0, device=CPU, dtype=None, fast=fast)
        assert [type(m) for m in model.modules()] == before
        models.append(model)
    for (name, p), q in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(models[0].get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_the_4d_mask_is_a_plain_tensor_and_evaluation_runs_without_autograd(setup, monkeypatch):
    # The 4D mask enters checkpointed layers, which save their inputs for backward: an inference
    # tensor there fails. Evaluation, the other way round, must build no graph.
    template, task = setup
    model = fresh_model(template, 0)
    mask = torch.ones(2, 5, dtype=torch.long)
    out = tr.prepared_mask(model, mask, None)
    assert out.dim() == 4 and not out.is_inference()
    grad_modes = []
    real_forward = type(model).forward

    def spy(self, *args, **kwargs):
        grad_modes.append(torch.is_inference_mode_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    tr.evaluate(model, task.validation, pad_id=0, batch_size=16, device=CPU, dtype=None)
    assert grad_modes and all(grad_modes)
