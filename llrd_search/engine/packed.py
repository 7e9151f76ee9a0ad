"""Packed trials: K trials of one model trained as one batched model in one process.

One pack is K *slots*; each slot trains one trial exactly as :func:`llrd_search.engine.train.train_and_evaluate`
would, as an independent stream: its own seed, numpy rng and batch order (``batch_order``), its own
step count, warmup/decay schedule (``linear_schedule``), evaluation points (``evals_per_epoch``) and
:class:`DivergenceGuard`. The K models are packed into one (:mod:`llrd_search.engine.packed_model`),
their batches stacked row-wise (copy k's batch in rows ``k*B:(k+1)*B``, shorter or smaller batches
padded: padding rows carry no loss and attend only to their first token), and one forward/backward
serves all K. The loss is the sum of each copy's own mean cross-entropy, so copy k's gradients are
its unpacked gradients; :class:`PackedAdamW` steps each copy with its own per-group LRs, schedule,
bias correction and gradient clipping. Evaluation feeds every validation batch to all copies at once.

A slot whose trial ends (finished, pruned by its ``on_eval``, diverged) ends without stopping the
others and is refilled from ``next_job`` (a fresh copy at step 0: new weights, empty AdamW moments);
when no job comes, the slot is dropped from the pack (its stacked slices cut away), so a pack's tail
does not train empty copies.

What is exact: with dropout 0, fp32 and ``fast_path`` off, a packed trial reaches the same
evaluations and weights as the unpacked loop up to float rounding (batched matmuls and a batched
AdamW sum in another order; tests/test_packed.py asserts weights within 1e-5 and identical metrics).
What is not: dropout draws other masks than K separate runs would (one torch stream for the pack;
each copy still drops its own units), so with dropout a packed trial is a different, equally valid
draw of the same seed. The stand-ins of :mod:`llrd_search.engine.fastpath` are not applied here;
:class:`PackedAdamW` is the packed fused AdamW. Classification heads only (cross-entropy from logits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llrd_search.engine.data import Encoded, TaskData
from llrd_search.engine.divergence import DivergenceGuard
from llrd_search.engine.metrics import score
from llrd_search.engine.packed_model import PackState, keep_copies, load_copy, pack_models
from llrd_search.engine.packed_optim import PackedAdamW
from llrd_search.engine.train import TrainResult, batch_order, linear_schedule, to_device
from llrd_search.exceptions import DivergedError
from llrd_search.spec import TrainSection


@dataclass
class PackJob:
    """One trial for a slot: its fresh unpacked model (weights to start from), its LLRD groups (as
    ``build_param_groups`` made them for that model), its seed, and ``on_eval(step, score)``, which
    may raise (e.g. ``optuna.TrialPruned``) to end this slot alone. ``tag``: the caller's handle."""

    model: torch.nn.Module
    groups: list[dict]
    seed: int
    on_eval: Callable[[int, float], None] | None = None
    tag: Any = None
    # Hears the test split's score at each evaluation that beats the slot's earlier ones (a
    # confirmation run's held-out score, see Objective.test_split_for); None: the test split is not scored.
    on_test: Callable[[float], None] | None = None


@dataclass
class SlotEnd:
    """How a slot's trial ended: ``result`` when it trained to the end, else ``error`` (whatever its
    ``on_eval`` raised, or a :class:`DivergedError`); ``evals`` so far either way. ``slot``: the
    slot's number in the pack as it started (a refill keeps the number of the slot it fills)."""

    job: PackJob
    slot: int
    result: TrainResult | None = None
    error: BaseException | None = None
    evals: list[tuple[int, float]] = field(default_factory=list)


class _Slot:
    def __init__(self, job: PackJob, n_train: int, cfg: TrainSection, num_labels: int, label: int):
        self.job, self.label = job, label
        self.rng = np.random.default_rng(job.seed)
        self.per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total = self.per_epoch * cfg.epochs
        self.eval_every = {min(self.per_epoch, round(self.per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
        self.schedule = linear_schedule(self.total, cfg.warmup_ratio)
        self.guard = DivergenceGuard(num_labels)
        self.step, self.i, self.examples = 0, 0, 0
        self.batches: list[np.ndarray] = []
        self.pending: list[torch.Tensor] = []  # losses not yet handed to the guard
        self.evals: list[tuple[int, float]] = []
        self.train_s = self.eval_s = 0.0

    def next_batch(self, lengths: np.ndarray, cfg: TrainSection) -> np.ndarray:
        if self.i == len(self.batches):  # a new epoch, drawn from this slot's rng as the unpacked loop does
            self.batches, self.i = batch_order(lengths, cfg.batch_size, self.rng, cfg.length_bucketing), 0
        return self.batches[self.i]

    def result(self) -> TrainResult:
        best_step, best = max(self.evals, key=lambda e: (e[1], -e[0]))
        return TrainResult(best, best_step, self.step, self.train_s, self.eval_s, self.examples / self.train_s if self.train_s > 0 else 0.0, list(self.evals))


def lr_of(groups: list[dict]) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in groups}


def train_packed(
    jobs: list[PackJob],
    task: TaskData,
    cfg: TrainSection,
    *,
    next_job: Callable[[], PackJob | None],
    on_end: Callable[[SlotEnd], None],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
    on_step: Callable[[int, int], None] | None = None,
    on_optimizer_step: Callable[[PackedAdamW, list[float]], None] | None = None,
) -> None:
    """Train ``jobs`` as one pack until every slot has ended and none can be refilled.

    ``on_end`` hears each slot's end as it happens; then ``next_job()`` is asked for a trial to
    refill it (None: the slot is dropped). ``on_step(step, total)`` runs after every pack step with
    the first slot's counts (a worker checks its signals there). An exception other than a slot's
    own end (pruned, diverged) stops the whole pack and propagates.
    """
    first = jobs[0]
    names = {id(p): n for n, p in first.model.named_parameters()}
    group_of = {names[id(p)]: g["name"] for g in first.groups for p in g["params"]}
    weight_decay = {g["name"]: g["weight_decay"] for g in first.groups}
    num_labels = int(getattr(first.model.config, "num_labels", 2))
    torch.manual_seed(first.seed)
    model, state = pack_models([j.model for j in jobs])
    model.to(device).train()
    params = _trainable(model, group_of)
    opt = PackedAdamW(params, group_of, weight_decay, [lr_of(j.groups) for j in jobs])
    slots = [_Slot(j, len(task.train), cfg, num_labels, label) for label, j in enumerate(jobs)]
    check_every = 1 if device.type == "cpu" else 32

    while slots:
        t0 = time.perf_counter()
        picks = [s.next_batch(task.train.lengths, cfg) for s in slots]
        batch, labels = stack_batches([task.train.batch(idx, pad_id) for idx in picks], pad_id)
        state.rows = labels.shape[1]
        batch = to_device({**batch, "labels": labels}, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**batch).logits
        losses = copy_losses(logits, labels)
        ended: dict[int, SlotEnd] = {}
        for k, slot in enumerate(slots):
            slot.pending.append(losses[k].detach())
            if len(slot.pending) >= check_every or slot.i + 1 in slot.eval_every:
                try:
                    slot.guard.update(torch.stack(slot.pending).float().tolist(), slot.step + 1 - len(slot.pending))
                except DivergedError as err:
                    ended[k] = SlotEnd(slot.job, slot.label, error=err, evals=list(slot.evals))
                slot.pending.clear()
        live = [k for k in range(len(slots)) if k not in ended]
        if live:
            torch.stack([losses[k] for k in live]).sum().backward()
            opt.clip_grad_norm_(cfg.max_grad_norm)
            multipliers = [s.schedule(s.step) for s in slots]
            if on_optimizer_step:
                on_optimizer_step(opt, multipliers)
            opt.step(multipliers)
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent = time.perf_counter() - t0
        for k in live:
            slot = slots[k]
            slot.step, slot.i, slot.examples, slot.train_s = slot.step + 1, slot.i + 1, slot.examples + len(picks[k]), slot.train_s + spent
        if on_step and live:
            on_step(slots[live[0]].step, slots[live[0]].total)

        due = [k for k in live if slots[k].i in slots[k].eval_every]
        if due:
            t1 = time.perf_counter()
            scores = evaluate_packed(model, state, task.validation, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, dtype=dtype, metric=cfg.metric)
            improved = [k for k in due if slots[k].job.on_test and scores[k] > max((e[1] for e in slots[k].evals), default=float("-inf"))]
            if improved and task.test is not None:  # one pass of the test split serves every copy
                tests = evaluate_packed(model, state, task.test, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, dtype=dtype, metric=cfg.metric)
                for k in improved:
                    slots[k].job.on_test(tests[k])
            spent = time.perf_counter() - t1
            for k in due:
                slot = slots[k]
                slot.eval_s += spent
                slot.evals.append((slot.step, scores[k]))
                try:
                    if slot.job.on_eval:
                        slot.job.on_eval(slot.step, scores[k])
                except Exception as err:  # the slot's trial is pruned (or its callback failed): it alone ends
                    ended[k] = SlotEnd(slot.job, slot.label, error=err, evals=list(slot.evals))
        for k in live:
            if k not in ended and slots[k].step == slots[k].total:
                ended[k] = SlotEnd(slots[k].job, slots[k].label, result=slots[k].result(), evals=list(slots[k].evals))

        dropped = []
        for k in sorted(ended):
            on_end(ended[k])
            job = next_job()
            if job is None:
                dropped.append(k)
                continue
            load_copy(model, k, job.model)
            opt.reset(k, lr_of(job.groups))
            slots[k] = _Slot(job, len(task.train), cfg, num_labels, slots[k].label)
        if dropped:
            keep = [k for k in range(len(slots)) if k not in dropped]
            slots = [slots[k] for k in keep]
            if slots:
                keep_copies(model, state, keep)
                opt.keep(keep, _trainable(model, group_of))


def _trainable(model: torch.nn.Module, group_of: dict[str, str]) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name in group_of)  # frozen in the unpacked model: frozen here
        if name in group_of:
            params[name] = p
    return params


def stack_batches(parts: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """K batches as one: copy k's rows at ``k*B:(k+1)*B``, padded to the longest batch and the
    widest; labels ``[K, B]`` with -100 on padding rows. A padding row attends to its first token
    only (a row with nothing to attend to would be NaN in some attention kernels)."""
    k, rows, width = len(parts), max(len(p["labels"]) for p in parts), max(p["input_ids"].shape[1] for p in parts)
    ids = torch.full((k, rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((k, rows, width), dtype=torch.long)
    mask[:, :, 0] = 1
    labels = torch.full((k, rows), -100, dtype=torch.long)
    types = torch.zeros((k, rows, width), dtype=torch.long) if "token_type_ids" in parts[0] else None
    for i, part in enumerate(parts):
        b, t = part["input_ids"].shape
        ids[i, :b, :t] = part["input_ids"]
        mask[i, :b, :] = 0
        mask[i, :b, :t] = part["attention_mask"]
        labels[i, :b] = part["labels"]
        if types is not None:
            types[i, :b, :t] = part["token_type_ids"]
    out = {"input_ids": ids.reshape(k * rows, width), "attention_mask": mask.reshape(k * rows, width)}
    if types is not None:
        out["token_type_ids"] = types.reshape(k * rows, width)
    return out, labels


def copy_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K]``: each copy's mean cross-entropy over its own real rows (what the unpacked model's loss is)."""
    k, rows = labels.shape
    ce = F.cross_entropy(logits.float().reshape(k * rows, -1), labels.reshape(-1), reduction="none", ignore_index=-100)
    return ce.reshape(k, rows).sum(1) / (labels != -100).sum(1).clamp(min=1)


@torch.inference_mode()
def evaluate_packed(
    model: torch.nn.Module,
    state: PackState,
    data: Encoded,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    metric: str = "accuracy",
) -> list[float]:
    """Every copy's ``metric`` on ``data`` in one pass: each batch is fed to all K copies."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    predictions = []
    for i in range(0, len(order), batch_size):
        batch = data.batch(order[i : i + batch_size], pad_id)
        batch.pop("labels")
        rows = len(batch["input_ids"])
        state.rows = rows
        batch = to_device({name: v.repeat(state.k, 1) for name, v in batch.items()}, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**batch).logits
        predictions.append(logits.reshape(state.k, rows, -1).argmax(-1))
    model.train(was_training)
    if not predictions:
        return [0.0] * state.k
    predicted = torch.cat(predictions, dim=1).cpu().numpy()
    return [score(metric, predicted[k], data.labels[order]) for k in range(state.k)]
