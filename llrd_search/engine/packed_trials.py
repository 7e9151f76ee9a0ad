"""Optuna trials in a pack: how many to pack (``[train] pack``), and each trial's setup and outcome
exactly as the built-in :class:`~llrd_search.engine.objective.Objective` records them.

A worker (study/packs.py) claims the trials; :class:`PackedTrials` turns each into a
:class:`~llrd_search.engine.packed.PackJob` (same seed, LRs, fresh head and user attrs as the
unpacked objective, plus ``pack`` and ``pack_slot``) and each slot's end into the trial's value or
the exception the unpacked objective would have raised (``TrialPruned`` when pruned or diverged).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from llrd_search.engine.memory import GPU_SHARE_ENV, pack_extra_bytes, trial_memory_estimate
from llrd_search.engine.memory_guard import is_out_of_memory, release_memory
from llrd_search.engine.model import fresh_model
from llrd_search.engine.objective import Objective
from llrd_search.engine.packed import PackJob, SlotEnd, train_packed
from llrd_search.engine.packed_model import pack_models
from llrd_search.engine.steps import step_callback
from llrd_search.exceptions import DivergedError, LLRDSearchError
from llrd_search.spec import TrainSection

log = logging.getLogger(__name__)

AUTO_CAP = 8

HEADROOM = 0.9  # of the free memory: the CUDA context, fragmentation and eval batches need some


def auto_pack(per_trial_bytes: int | Callable[[int], int], free_bytes: int, cap: int = AUTO_CAP) -> int:
    """The largest pack (1 to ``cap``) that fits in ``HEADROOM`` of ``free_bytes``: of trials of
    ``per_trial_bytes`` each, or of ``per_trial_bytes(k)`` bytes for a pack of k (:func:`pack_bytes`)."""
    size = per_trial_bytes if callable(per_trial_bytes) else (lambda k: k * per_trial_bytes)
    usable = int(free_bytes * HEADROOM)
    return max([1] + [k for k in range(1, cap + 1) if size(k) <= usable])


def trial_bytes(model: torch.nn.Module, cfg: TrainSection, max_length: int, dtype: torch.dtype | None = None) -> int:
    """One trial's device memory: :func:`llrd_search.engine.memory.trial_memory_estimate`, the same
    number ``--workers-per-gpu auto`` and preflight's warning use."""
    n_params = sum(p.numel() for p in model.parameters())
    return trial_memory_estimate(model.config, n_params, cfg.batch_size, max_length, dtype)  # packs never accumulate (spec)


def pack_bytes(model: torch.nn.Module, cfg: TrainSection, max_length: int, dtype: torch.dtype | None, k: int) -> int:
    """A pack of ``k`` trials' device memory: ``k`` x :func:`trial_bytes` and what packing adds
    (its evaluation at ``k x eval_batch_size`` rows, a dropped slot's re-slicing: :func:`pack_extra_bytes`)."""
    n_params = sum(p.numel() for p in model.parameters())
    return k * trial_bytes(model, cfg, max_length, dtype) + pack_extra_bytes(model.config, n_params, k, cfg.eval_batch_size, max_length, dtype)


def resolve_pack(cfg: TrainSection, device: torch.device, model: torch.nn.Module, max_length: int, dtype: torch.dtype | None = None) -> int:
    """``[train] pack`` as a count: ``"auto"`` is 1 on CPU (one copy already uses every core a
    worker has) and with accumulation or checkpointing (the packed loop has neither), and on CUDA
    :func:`auto_pack` of the free memory."""
    if cfg.pack != "auto":
        return int(cfg.pack)
    if device.type != "cuda" or cfg.grad_accum > 1 or cfg.gradient_checkpointing:
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    share = os.environ.get(GPU_SHARE_ENV, "1")
    return auto_pack(lambda k: pack_bytes(model, cfg, max_length, dtype, k), free // max(1, int(share) if share.isdigit() else 1))


def check_packable(objective: Objective) -> str | None:
    """None when two packed copies of the study's model give each copy's own logits on a few
    validation examples, else why not (a model whose weights are read outside the three packed
    module types, e.g. DeBERTa's relative-position table, or an unsupported parameter)."""
    data = objective.task.validation
    try:
        copies = [fresh_model(objective.template, seed).eval() for seed in (0, 1)]
        batch = data.batch(list(range(min(2, len(data)))), objective.pad_id)
        batch.pop("labels")
        with torch.inference_mode():
            expected = [m(**batch).logits for m in copies]
        packed, state = pack_models([fresh_model(objective.template, seed).eval() for seed in (0, 1)])
        state.rows = len(batch["input_ids"])
        with torch.inference_mode():
            got = packed(**{k: v.repeat(2, 1) for k, v in batch.items()}).logits.reshape(2, state.rows, -1)
        for k in range(2):
            if not torch.allclose(got[k], expected[k], atol=1e-4, rtol=1e-3):
                return "the packed model's outputs differ from the model's own"
    except (LLRDSearchError, RuntimeError, ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


class PackedTrials:
    """The built-in objective's trials, run ``k`` at a time (see :func:`train_packed`)."""

    def __init__(self, objective: Objective, k: int):
        self.objective, self.k = objective, k
        self.spec = objective.spec

    def job(self, trial: optuna.Trial) -> PackJob:
        t0 = time.perf_counter()
        model, groups, seed = self.objective.prepare(trial)
        trial.set_user_attr("pack", self.k)
        tag = _Tagged(trial, [], 0.0)
        on_eval = self.objective.pruning_callback(trial, tag.evals)
        tag.overhead = time.perf_counter() - t0
        on_test = (lambda score: self.objective.record_test(trial, score)) if self.objective.test_split_for(trial) is not None else None
        return PackJob(model=model, groups=groups, seed=seed, on_eval=on_eval, tag=tag, on_test=on_test)

    def outcome(self, end: SlotEnd) -> float:
        """The trial's value, or raise what the unpacked objective raises for this end."""
        tag: _Tagged = end.job.tag
        tag.trial.set_user_attr("pack_slot", end.slot)
        if isinstance(end.error, DivergedError):
            raise self.objective.diverged(tag.trial, end.error, tag.evals) from None
        if end.error is not None or end.result is None:
            raise end.error or RuntimeError("a packed slot ended with neither a result nor an error")
        return self.objective.record(tag.trial, end.result, tag.evals, tag.overhead, alone=False)

    def run(self, first: list[PackJob], next_job: Callable[[], PackJob | None], on_end: Callable[[SlotEnd], None]) -> None:
        """Train ``first`` and the refills of ``next_job`` as packs of ``k``. Out of device memory,
        the pack is dropped, its memory released, ``k`` halved (for this worker's later packs too)
        and every trial it was still training starts again, with its parameters, in a smaller pack:
        no trial is lost and none is told twice. At ``k = 1`` the error propagates."""
        queue, live = list(first), {}
        first.clear()  # the pack holds its jobs from here: an out-of-memory frees them all

        def take() -> PackJob | None:
            job = queue.pop(0) if queue else next_job()
            if job is not None:
                live[id(job)] = job
            return job

        def ended(end: SlotEnd) -> None:
            live.pop(id(end.job), None)
            on_end(end)

        while queue:
            jobs = [job for job in (take() for _ in range(min(self.k, len(queue)))) if job is not None]
            packed = len(jobs)
            if not self._train(jobs, take, ended):
                return
            # Out of memory. The pack's tensors went with the traceback; its jobs' models go now.
            trials = [job.tag.trial for job in live.values()]
            jobs.clear()
            live.clear()
            release_memory(self.objective.device)
            self.k = max(1, self.k // 2)
            log.warning("out of device memory with %d trials packed; the %d unfinished start again, %d per pack", packed, len(trials), self.k)
            queue = [self.job(trial) for trial in trials] + queue  # a fresh model, the same trial and parameters

    def _train(self, jobs: list[PackJob], take: Callable[[], PackJob | None], ended: Callable[[SlotEnd], None]) -> bool:
        """One pack; True when it ran out of device memory with more than one trial packed."""
        o = self.objective
        try:
            train_packed(jobs, o.task, self.spec.train, next_job=take, on_end=ended, pad_id=o.pad_id, device=o.device, dtype=o.dtype,
                         on_step=step_callback(o.on_step))
        except Exception as err:
            if self.k <= 1 or not is_out_of_memory(err):
                raise
            return True
        return False


@dataclass
class _Tagged:
    """What a slot's job carries for its trial: the trial, its evaluations so far, its setup time."""

    trial: optuna.Trial
    evals: list[dict]
    overhead: float
