"""Packed trials: K trials of one model trained as one batched model in one process.

One pack is K *slots*; each slot trains one trial as :func:`llrd_search.engine.train.train_and_evaluate`
would, as an independent stream: its own seed and numpy rng, its own step count, warmup/decay schedule
(``linear_schedule``), evaluation points (``evals_per_epoch``) and :class:`DivergenceGuard`. The K
models are packed into one (:mod:`llrd_search.engine.packed_model`), their batches stacked row-wise
(copy k's batch in rows ``k*B:(k+1)*B``, shorter or smaller batches padded: padding rows carry no
loss and attend only to their first token), and one forward/backward serves all K. With length
bucketing the K slots draw each step's batches from one shared length bin, so the stack is not
padded to the widest of K unrelated buckets (:mod:`llrd_search.engine.packed_batches`; what that does
to a trial's data order is said there). The loss is the sum of each copy's own mean cross-entropy, so
copy k's gradients are its unpacked gradients; :class:`PackedAdamW` steps each copy with its own
per-group LRs, schedule, bias correction and gradient clipping, in a few multi-tensor kernels with
no host sync. The losses are read back every ``check_every`` steps and before evaluations and slot
ends, nowhere else. Evaluation runs only the copies whose slots are due, all of them in each batch.

A slot whose trial ends (finished, pruned by its ``on_eval``, diverged) ends without stopping the
others and is refilled from ``next_job`` (a fresh copy at step 0: new weights, empty AdamW moments);
when no job comes, the slot is dropped from the pack (its stacked slices cut away), so a pack's tail
does not train empty copies.

What is exact: with dropout 0, fp32, ``fast_path`` off and ``length_bucketing`` off (each slot then
draws the unpacked loop's batches), a packed trial reaches the same evaluations and weights as the
unpacked loop up to float rounding (batched matmuls; tests/test_packed.py asserts weights within 1e-5
and identical metrics). What is not: dropout draws other masks than K separate runs would (one torch
stream for the pack; each copy still drops its own units), and with bucketing the batches differ, so
a packed trial is a different, equally valid draw of the same seed. The stand-ins of
:mod:`llrd_search.engine.fastpath` are not applied here. Classification heads only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llrd_search.engine.data import TaskData
from llrd_search.engine.divergence import DivergenceGuard
from llrd_search.engine.packed_batches import LengthBins, SlotBatches, copy_losses, stack_batches
from llrd_search.engine.packed_eval import evaluate_packed, prepared_mask
from llrd_search.engine.packed_model import PackState, keep_copies, load_copy, pack_models
from llrd_search.engine.packed_optim import PackedAdamW
from llrd_search.engine.train import TrainResult, to_device
from llrd_search.exceptions import DivergedError
from llrd_search.spec import TrainSection

__all__ = ["CHECK_EVERY", "PackJob", "SlotEnd", "copy_losses", "evaluate_packed", "lr_of", "stack_batches", "train_packed"]

CHECK_EVERY = 32  # steps between reads of the losses off a CPU (the unpacked loop's chunk too)


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
    def __init__(self, job: PackJob, n_train: int, cfg: TrainSection, num_labels: int, label: int, lengths: np.ndarray):
        self.job, self.label = job, label
        self.data = SlotBatches(job.seed, lengths, cfg.batch_size, cfg.length_bucketing)
        self.per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total = self.per_epoch * cfg.epochs
        self.eval_every = {min(self.per_epoch, round(self.per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
        self.guard = DivergenceGuard(num_labels)
        self.step, self.i, self.examples = 0, 0, 0  # i: steps into the current epoch
        self.evals: list[tuple[int, float]] = []
        self.train_s = self.eval_s = 0.0

    def next_batch(self, bins: LengthBins | None, b: int | None) -> np.ndarray:
        if self.i == self.per_epoch:
            self.i = 0
        return self.data.draw(bins, b)

    def end(self, error: BaseException | None = None) -> SlotEnd:
        result = None if error is not None else self.result()
        return SlotEnd(self.job, self.label, result=result, error=error, evals=list(self.evals))

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
    on_optimizer_step: Callable[[PackedAdamW, torch.Tensor], None] | None = None,
    check_every: int | None = None,
) -> None:
    """Train ``jobs`` as one pack until every slot has ended and none can be refilled.

    ``on_end`` hears each slot's end as it happens; then ``next_job()`` is asked for a trial to
    refill it (None: the slot is dropped). ``on_step(step, total)`` runs after every pack step with
    the first slot's counts (a worker checks its signals there). ``on_optimizer_step(opt,
    multipliers)`` hears each step's K schedule multipliers (a device tensor) before the update.
    The losses are read back (one sync) every ``check_every`` steps (None: every step on a CPU,
    where it costs nothing, :data:`CHECK_EVERY` elsewhere) and before any slot's evaluation or end.
    An exception other than a slot's own end (pruned, diverged) stops the whole pack and propagates.
    """
    pack = _Pack(jobs, task, cfg, pad_id=pad_id, device=device, dtype=dtype, check_every=check_every)
    while pack.slots:
        ended = pack.train_step(on_optimizer_step)
        live = [k for k in range(len(pack.slots)) if k not in ended]
        if on_step and live:
            on_step(pack.slots[live[0]].step, pack.slots[live[0]].total)
        pack.evaluate_due(live, ended)
        for k in live:
            if k not in ended and pack.slots[k].step == pack.slots[k].total:
                ended[k] = pack.slots[k].end()
        pack.refill(ended, on_end, next_job)


class _Pack:
    """One pack's model, optimizer, slots and the losses not yet read back."""

    def __init__(self, jobs: list[PackJob], task: TaskData, cfg: TrainSection, *, pad_id: int, device: torch.device,
                 dtype: torch.dtype | None, check_every: int | None):
        first = jobs[0]
        self.num_labels = int(getattr(first.model.config, "num_labels", 2))
        self.task, self.cfg, self.pad_id, self.device, self.dtype = task, cfg, pad_id, device, dtype
        self.check_every = check_every or (1 if device.type == "cpu" else CHECK_EVERY)
        torch.manual_seed(first.seed)  # the pack's one dropout stream
        self.model, self.state, self.opt, self.group_of = pack_with_optimizer(jobs, device)
        self.slots = [self._slot(k, j, k) for k, j in enumerate(jobs)]
        self.bins = LengthBins(task.train.lengths, cfg.batch_size, first.seed) if cfg.length_bucketing else None
        self.pending: list[torch.Tensor] = []

    def _slot(self, k: int, job: PackJob, label: int) -> _Slot:
        slot = _Slot(job, len(self.task.train), self.cfg, self.num_labels, label, self.task.train.lengths)
        self.opt.set_schedule(k, slot.total, self.cfg.warmup_ratio)
        return slot

    def train_step(self, on_optimizer_step: Callable[[PackedAdamW, torch.Tensor], None] | None) -> dict[int, SlotEnd]:
        """One forward/backward/update of every slot; the slots that diverged (checked now) end."""
        t0 = time.perf_counter()
        b = self.bins.next_bin() if self.bins is not None else None
        picks = [s.next_batch(self.bins, b) for s in self.slots]
        batch, labels = stack_batches([self.task.train.batch(idx, self.pad_id) for idx in picks], self.pad_id)
        self.state.rows = labels.shape[1]
        batch = to_device({**batch, "labels": labels}, self.device)
        labels = batch.pop("labels")
        batch["attention_mask"] = prepared_mask(self.model, batch["attention_mask"], self.dtype)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(**batch).logits
        losses = copy_losses(logits, labels)
        ended = self._check(losses.detach())
        live = [k for k in range(len(self.slots)) if k not in ended]
        if live:
            (losses.sum() if not ended else torch.stack([losses[k] for k in live]).sum()).backward()
            self.opt.clip_grad_norm_(self.cfg.max_grad_norm)
            multipliers = self.opt.schedule()
            if on_optimizer_step:
                on_optimizer_step(self.opt, multipliers)
            self.opt.step(multipliers)
        self.opt.zero_grad()
        # No sync: the host runs ahead of the device until the next read (a check or an evaluation),
        # so a slot's train_s adds up the host's time, the waits at those reads included.
        spent = time.perf_counter() - t0
        for k in live:
            slot = self.slots[k]
            slot.step, slot.i, slot.examples, slot.train_s = slot.step + 1, slot.i + 1, slot.examples + len(picks[k]), slot.train_s + spent
        return ended

    def _check(self, losses: torch.Tensor) -> dict[int, SlotEnd]:
        """Queue this step's K losses; every ``check_every`` steps, and before any slot evaluates or
        ends, read them back in one transfer and hand each slot's to its guard. Slots only end at such
        a step, so every slot has been in the pack for all the queued steps."""
        self.pending.append(losses)
        if len(self.pending) < self.check_every and not any(s.i + 1 in s.eval_every for s in self.slots):
            return {}
        rows = torch.stack(self.pending).float().tolist()
        self.pending.clear()
        ended = {}
        for k, slot in enumerate(self.slots):
            try:
                slot.guard.update([row[k] for row in rows], slot.step + 1 - len(rows))
            except DivergedError as err:
                ended[k] = slot.end(err)
        return ended

    def evaluate_due(self, live: list[int], ended: dict[int, SlotEnd]) -> None:
        """Evaluate the slots at an evaluation point (those alone); a slot whose ``on_eval`` raises ends."""
        due = [k for k in live if k not in ended and self.slots[k].i in self.slots[k].eval_every]
        if not due:
            return
        t1 = time.perf_counter()
        kw = {"pad_id": self.pad_id, "batch_size": self.cfg.eval_batch_size, "device": self.device, "dtype": self.dtype, "metric": self.cfg.metric}
        scores = dict(zip(due, evaluate_packed(self.model, self.state, self.task.validation, copies=due, **kw), strict=True))
        improved = [k for k in due if self.slots[k].job.on_test and scores[k] > max((e[1] for e in self.slots[k].evals), default=float("-inf"))]
        if improved and self.task.test is not None:  # one pass of the test split serves every improved copy
            for k, test in zip(improved, evaluate_packed(self.model, self.state, self.task.test, copies=improved, **kw), strict=True):
                self.slots[k].job.on_test(test)
        spent = time.perf_counter() - t1
        for k in due:
            slot = self.slots[k]
            slot.eval_s += spent
            slot.evals.append((slot.step, scores[k]))
            try:
                if slot.job.on_eval:
                    slot.job.on_eval(slot.step, scores[k])
            except Exception as err:  # the slot's trial is pruned (or its callback failed): it alone ends
                ended[k] = slot.end(err)

    def refill(self, ended: dict[int, SlotEnd], on_end: Callable[[SlotEnd], None], next_job: Callable[[], PackJob | None]) -> None:
        """Tell each ended slot's end, then give the slot a new trial, or drop it when none comes."""
        dropped = []
        for k in sorted(ended):
            on_end(ended[k])
            job = next_job()
            if job is None:
                dropped.append(k)
                continue
            load_copy(self.model, k, job.model)
            self.opt.reset(k, lr_of(job.groups))
            self.slots[k] = self._slot(k, job, self.slots[k].label)
        if dropped:
            keep = [k for k in range(len(self.slots)) if k not in dropped]
            self.slots = [self.slots[k] for k in keep]
            if self.slots:
                keep_copies(self.model, self.state, keep)
                self.opt.keep(keep, _trainable(self.model, self.group_of))


def pack_with_optimizer(jobs: list[PackJob], device: torch.device) -> tuple[torch.nn.Module, PackState, PackedAdamW, dict[str, str]]:
    """The jobs' models packed into one on ``device`` (in training mode), its :class:`PackedAdamW`
    with each job's LRs, and parameter name -> LLRD group (the first job's groups name them all)."""
    first = jobs[0]
    names = {id(p): n for n, p in first.model.named_parameters()}
    group_of = {names[id(p)]: g["name"] for g in first.groups for p in g["params"]}
    weight_decay = {g["name"]: g["weight_decay"] for g in first.groups}
    model, state = pack_models([j.model for j in jobs])
    model.to(device).train()
    opt = PackedAdamW(_trainable(model, group_of), group_of, weight_decay, [lr_of(j.groups) for j in jobs])
    return model, state, opt, group_of


def _trainable(model: torch.nn.Module, group_of: dict[str, str]) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name in group_of)  # frozen in the unpacked model: frozen here
        if name in group_of:
            params[name] = p
    return params
