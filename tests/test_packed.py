"""Packed trials (engine/packed*.py): K copies as one batched model train exactly like K separate runs.

Tiny BERT with dropout 0, fp32, fast_path off on both sides (the packed loop uses no stand-ins):
then the only difference is float rounding (batched matmuls, a batched AdamW), so metrics must be
identical and weights within 2e-5 (attention query/key: 5e-4, see QK_ATOL).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llrd_search.engine import fastpath
from llrd_search.engine.model import fresh_model
from llrd_search.engine.packed import PackJob, lr_of, stack_batches, train_packed
from llrd_search.engine.packed_model import PackedEmbedding, PackedLayerNorm, PackedLinear, PackState, copy_weights, pack_models
from llrd_search.engine.packed_optim import PackedAdamW
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.engine.train import linear_schedule, train_and_evaluate
from llrd_search.exceptions import DivergedError, ModelError
from llrd_search.spec import TrainSection

CPU = torch.device("cpu")
LRS = [(1e-2, 0.8, 1e-2), (5e-3, 0.6, 2e-2), (2e-2, 0.9, 5e-3)]
# PackedAdamW runs torch's fused AdamW kernel, the unpacked loop (fast_path off) the foreach one: they
# round differently, which AdamW's normalised steps carry to 1.2e-5 after 3 epochs (the word
# embedding), and to 2.4e-5 in the attention query/key weights, whose gradients here are small and
# partly rounding noise, as key.bias's (below) are (6e-5 against the unpacked fused kernel).
WEIGHT_ATOL = 2e-5  # one step is exact to rounding: test_packed_optimizer_steps_each_copy_*
QK_ATOL = 5e-4  # measured up to 1.04e-4 (copy with the largest LR)


@pytest.fixture(scope="module")
def setup(tiny_template_and_task):
    template, task = tiny_template_and_task
    for module in template.model.modules():  # dropout 0: packed and unpacked draw no masks
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return template, task


def _cfg(**kw) -> TrainSection:
    return TrainSection(**{"epochs": 3, "batch_size": 16, "evals_per_epoch": 2, "precision": "fp32", "device": "cpu", "fast_path": False, "warmup_ratio": 0.2, "length_bucketing": False, **kw})


def _job(template, seed, lr, on_eval=None) -> PackJob:
    model = fresh_model(template, seed)
    base_lr, decay, head_lr = lr
    groups = build_param_groups(model, base_lr=base_lr, decay=decay, head_lr=head_lr, weight_decay=0.01)
    return PackJob(model=model, groups=groups, seed=seed, on_eval=on_eval, tag=seed)


def _unpacked(template, task, seed, lr, cfg, **kw):
    job = _job(template, seed, lr)
    result = train_and_evaluate(job.model, task, job.groups, cfg, seed=seed, pad_id=0, device=CPU, dtype=None, **kw)
    return job.model, result


def _packed(jobs, task, cfg, queue=(), **kw):
    ends, refills = [], list(queue)
    holder = {}

    def on_end(end):
        ends.append(end)

    def capture(opt, mult):  # keep a handle on the optimizer for LR checks
        holder["opt"] = opt

    train_packed(jobs, task, cfg, next_job=lambda: refills.pop(0) if refills else None, on_end=on_end, pad_id=0, device=CPU, dtype=None,
                 on_optimizer_step=kw.pop("on_optimizer_step", capture), **kw)
    return ends


# --------------------------------------------------------------------------- modules


def _copies(make, k=3):
    torch.manual_seed(0)
    mods = [make() for _ in range(k)]
    for m in mods:
        for p in m.parameters():
            nn.init.normal_(p)
    return mods


def test_packed_modules_give_each_copy_its_own_output():
    state = PackState(3)
    state.rows = 4
    x = torch.randn(12, 5, 8)
    for mods, kind in ((_copies(lambda: nn.Linear(8, 6)), PackedLinear), (_copies(lambda: nn.LayerNorm(8)), PackedLayerNorm)):
        packed = kind(state, mods)
        out = packed(x)
        for k, m in enumerate(mods):
            torch.testing.assert_close(out[4 * k : 4 * k + 4], m(x[4 * k : 4 * k + 4]), atol=1e-6, rtol=1e-5)
    emb = _copies(lambda: nn.Embedding(10, 6, padding_idx=0))
    packed = PackedEmbedding(state, emb)
    ids = torch.randint(0, 10, (12, 5))
    out = packed(ids)
    for k, m in enumerate(emb):
        assert torch.equal(out[4 * k : 4 * k + 4], m(ids[4 * k : 4 * k + 4]))
    # a broadcast input (position ids [1, T]) is read by every copy with its own table
    pos = torch.arange(5).unsqueeze(0)
    out = packed(pos)
    assert out.shape == (12, 5, 6)
    for k, m in enumerate(emb):
        assert torch.equal(out[4 * k], m(pos)[0])
    # the padding row gets no gradient, as nn.Embedding's
    packed(ids).sum().backward()
    assert packed.weight.grad[:, 0].abs().sum() == 0 and packed.weight.grad[:, 1:].abs().sum() > 0


def test_a_bare_parameter_cannot_be_packed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))

    with pytest.raises(ModelError, match="module '' \\(Odd\\).*scale.*pack = 1"):
        pack_models([Odd(), Odd()])


def test_padding_rows_carry_no_loss_and_attend_to_one_token():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]), "labels": torch.tensor([1])}
    b = {"input_ids": torch.tensor([[5], [8]]), "attention_mask": torch.tensor([[1], [1]]), "labels": torch.tensor([0, 1])}
    batch, labels = stack_batches([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0], [5, 0, 0], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert labels.tolist() == [[1, -100], [0, 1]]


# --------------------------------------------------------------------------- training equivalence


def test_three_packed_trials_train_like_three_separate_runs(setup, monkeypatch):
    template, task = setup
    cfg = _cfg()
    seeds = [3, 4, 5]
    # every unpacked step's LRs, read from torch's AdamW
    made = []
    real = fastpath.make_optimizer
    monkeypatch.setattr(fastpath, "make_optimizer", lambda groups, **kw: made.append(real(groups, **kw)) or made[-1])
    unpacked, lr_steps = [], []
    for seed, lr in zip(seeds, LRS, strict=True):
        seen = []
        model, result = _unpacked(template, task, seed, lr, cfg, on_step=lambda s, t, seen=seen: seen.append({g["name"]: g["lr"] for g in made[-1].param_groups}))
        unpacked.append((model, result))
        lr_steps.append(seen)
    packed_lrs = []

    def record(opt, mult):
        packed_lrs.append(opt.lr_table(mult))

    jobs = [_job(template, s, lr) for s, lr in zip(seeds, LRS, strict=True)]
    weights = {}
    ends = _packed(jobs, task, cfg, on_optimizer_step=record, on_step=lambda s, t: None)
    model = jobs[0].model  # packed in place
    for k in range(3):
        weights[k] = copy_weights(model, k)
    assert [e.job.seed for e in ends] == seeds
    for k, (ref, result) in enumerate(unpacked):
        assert ends[k].error is None
        assert ends[k].result.evals == result.evals  # identical metrics at identical steps
        assert ends[k].result.steps == result.steps
        reference = dict(ref.named_parameters())
        assert set(weights[k]) == set(reference)
        for name, value in reference.items():
            if name.endswith("attention.self.key.bias"):
                # Its true gradient is 0 (a key bias adds the same q.b to every score of a query, and
                # softmax ignores that): it trains on rounding noise, which AdamW scales up to LR-sized
                # steps, so packed and unpacked noise part ways. Nothing else is that ill-conditioned.
                continue
            qk = ".attention.self.query." in name or ".attention.self.key." in name
            torch.testing.assert_close(weights[k][name], value.detach(), atol=QK_ATOL if qk else WEIGHT_ATOL, rtol=0)
        assert not torch.equal(weights[k]["classifier.weight"], fresh_model(template, seeds[k]).classifier.weight)  # it trained
        # the LR torch's AdamW applied at step s (the scheduler moves after on_step: shift by one)
        applied = [lr_of([{"name": n, "lr": v} for n, v in row.items()]) for row in lr_steps[k]]
        f0 = linear_schedule(result.steps, cfg.warmup_ratio)(0)
        assert packed_lrs[0][k] == pytest.approx({g["name"]: g["lr"] * f0 for g in jobs[k].groups}, rel=1e-12)
        for step in range(1, result.steps):
            assert packed_lrs[step][k] == pytest.approx(applied[step - 1], rel=1e-12)
    assert len({tuple(r.evals) for _, r in unpacked}) > 1  # the seeds and LRs do differ


def test_clipping_is_per_copy():
    # copy 0 has a huge gradient, copy 1 a small one: only copy 0 is scaled
    p = nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[30.0, 40.0, 0.0], [0.3, 0.4, 0.0]])
    opt = PackedAdamW({"w": p}, {"w": "g"}, {"g": 0.0}, [{"g": 1e-3}, {"g": 1e-3}])
    norms = opt.clip_grad_norm_(1.0)
    assert norms.tolist() == pytest.approx([50.0, 0.5])
    ref = torch.tensor([30.0, 40.0, 0.0], requires_grad=True)
    ref.grad = torch.tensor([30.0, 40.0, 0.0])
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    torch.testing.assert_close(p.grad[0], ref.grad)
    assert p.grad[1].tolist() == pytest.approx([0.3, 0.4, 0.0])


def test_a_refilled_slot_restarts_its_step_count_and_warmup():
    p = nn.Parameter(torch.ones(2, 1))
    opt = PackedAdamW({"w": p}, {"w": "g"}, {"g": 0.0}, [{"g": 1.0}, {"g": 1.0}])
    for _ in range(3):
        p.grad = torch.ones(2, 1)
        opt.step([1.0, 1.0])
    opt.reset(1, {"g": 2.0})
    assert opt.steps.tolist() == [3.0, 0.0]
    assert opt.exp_avg[0][1].item() == 0 and opt.exp_avg[0][0].item() != 0
    assert opt.lr_table([0.5, 0.25]) == [{"g": 0.5}, {"g": 0.5}]


def test_pruning_one_copy_leaves_the_others_unchanged_and_refills_the_slot(setup):
    template, task = setup
    cfg = _cfg(epochs=1)

    class Pruned(Exception):
        pass

    def prune(step, value):
        raise Pruned(f"at {step}")

    base = _packed([_job(template, s, lr) for s, lr in zip([3, 4, 5], LRS, strict=True)], task, cfg)
    refill = _job(template, 9, LRS[0])
    jobs = [_job(template, 3, LRS[0]), _job(template, 4, LRS[1], on_eval=prune), _job(template, 5, LRS[2])]
    ends = _packed(jobs, task, cfg, queue=[refill])
    by_seed = {e.job.seed: e for e in ends}
    assert isinstance(by_seed[4].error, Pruned) and len(by_seed[4].evals) == 1
    for seed, end in zip([3, 5], [base[0], base[2]], strict=True):
        assert by_seed[seed].result.evals == end.result.evals
    # the refill trained a whole trial of its own from step 0 (what an unpacked run of seed 9 reaches)
    _, alone = _unpacked(template, task, 9, LRS[0], cfg)
    assert by_seed[9].result.evals == alone.evals
    assert [e.job.seed for e in ends] == [4, 3, 5, 9]


def test_a_diverging_copy_ends_alone(setup):
    template, task = setup
    cfg = _cfg(epochs=1)
    base = _packed([_job(template, 3, LRS[0]), _job(template, 5, LRS[2])], task, cfg)
    ends = _packed([_job(template, 3, LRS[0]), _job(template, 4, (10.0, 1.0, 10.0)), _job(template, 5, LRS[2])], task, cfg)
    by_seed = {e.job.seed: e for e in ends}
    assert isinstance(by_seed[4].error, DivergedError) and by_seed[4].result is None
    assert ends[0].job.seed == 4  # it ended first, at a divergence check, long before the others
    assert by_seed[3].result.evals == base[0].result.evals
    assert by_seed[5].result.evals == base[1].result.evals


def test_packed_optimizer_steps_each_copy_as_torch_adamw_with_clipping():
    """Several steps of PackedAdamW (its device schedule, clipping, a refilled copy) against
    ``clip_grad_norm_`` + ``torch.optim.AdamW`` + ``LambdaLR(linear_schedule)`` run per copy."""
    torch.manual_seed(0)
    k, shapes = 3, {"a": (4, 5), "b": (5,), "c": (2, 1, 3)}
    group_of = {"a": "g0", "b": "g0.no_decay", "c": "g1"}
    wd = {"g0": 0.01, "g0.no_decay": 0.0, "g1": 0.05}
    lrs = [{"g0": 1e-2 * (i + 1), "g0.no_decay": 2e-2, "g1": 3e-3 * (i + 1)} for i in range(k)]
    totals = [10, 12, 9]
    stacked = {n: nn.Parameter(torch.randn(k, *s)) for n, s in shapes.items()}
    opt = PackedAdamW(stacked, group_of, wd, lrs)

    def reference(i, lr):
        params = {n: nn.Parameter(stacked[n][i].detach().clone()) for n in shapes}
        groups = {}
        for n, p in params.items():
            groups.setdefault(group_of[n], []).append(p)
        ref = torch.optim.AdamW([{"params": ps, "lr": lr[g], "weight_decay": wd[g]} for g, ps in groups.items()])
        opt.set_schedule(i, totals[i], 0.2)
        return params, ref, torch.optim.lr_scheduler.LambdaLR(ref, linear_schedule(totals[i], 0.2))

    refs = [reference(i, lrs[i]) for i in range(k)]
    for step in range(9):
        if step == 4:  # copy 1 gets a new trial: step 0, new LRs, empty moments
            opt.reset(1, {"g0": 5e-3, "g0.no_decay": 1e-3, "g1": 7e-3})
            refs[1] = reference(1, {"g0": 5e-3, "g0.no_decay": 1e-3, "g1": 7e-3})
        grads = {n: torch.randn(k, *s) * (5.0 if step % 2 else 0.05) for n, s in shapes.items()}  # clipped every other step
        for n, p in stacked.items():
            p.grad = grads[n].clone() if p.grad is None else p.grad.copy_(grads[n])
        norms = opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        for i, (params, ref, sched) in enumerate(refs):
            for n, p in params.items():
                p.grad = grads[n][i].clone()
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            assert norms[i].item() == pytest.approx(norm.item(), rel=1e-6)
            ref.step()
            sched.step()
    for i, (params, _, _) in enumerate(refs):
        for n, p in params.items():
            torch.testing.assert_close(stacked[n][i].detach(), p.detach(), rtol=1e-6, atol=1e-7)
    assert all(p.grad.abs().sum() == 0 for p in stacked.values())  # zeroed in place, kept for the views
