"""The fine-tuning loop of one trial, and the device and precision it runs in.

The loop is deliberately plain PyTorch: AdamW over the LLRD groups, linear warmup then linear decay
applied to every group in proportion, gradient clipping, length-bucketed dynamic padding and bf16
autocast where the hardware runs it fast. For the length of a trial, :func:`llrd_search.engine.fastpath.fast_path`
swaps in faster stand-ins for a few modules and builds the (fused) AdamW; ``[train] fast_path = false``
trains without them (see docs/performance.md). The model itself comes from :mod:`llrd_search.engine.model`.
For big models a step can run as ``[train] grad_accum`` micro-batches, with ``gradient_checkpointing``;
running out of device memory ends the trial with one line naming the fix (:mod:`llrd_search.engine.memory_guard`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from llrd_search.engine.data import Encoded, TaskData
from llrd_search.engine.divergence import DivergenceGuard
from llrd_search.engine.fastpath import FastPath, fast_path
from llrd_search.engine.memory_guard import checkpointing, is_out_of_memory, out_of_memory_error
from llrd_search.engine.metrics import score

# Model loading moved to model.py; its names stay importable from here (tests and bench/ use them).
from llrd_search.engine.model import ModelTemplate, fresh_model, load_template, load_tokenizer, position_limit, resolve_model_path  # noqa: F401
from llrd_search.exceptions import TrainingError
from llrd_search.spec import TrainSection

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- hardware


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmul is several times fp32 there (4x measured on this project's CI CPU)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: read the flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if choice == "fp32":
        return None
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    if choice == "bf16" and not fast and device.type == "cpu":
        log.warning(
            "train.precision = 'bf16' on a CPU without AMX or AVX512-BF16: torch's bf16 matmul is a slow "
            "fallback there (~200x slower than fp32 measured on an AVX2 EPYC); 'auto' would train in fp32"
        )
    if choice == "bf16" or fast:
        return torch.bfloat16
    return None


def set_threads(n: int | None) -> None:
    """Intra-op threads; K local workers get cores // K each so they do not oversubscribe."""
    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


# --------------------------------------------------------------------------- loop


def batch_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucketing: bool) -> list[np.ndarray]:
    """One epoch of batches. With bucketing, examples are sorted by length inside shuffled
    mega-batches of 50 batches and the resulting batches shuffled: little padding, still random."""
    perm = rng.permutation(len(lengths))
    if not bucketing:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(perm), mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Multiplier on every group's own LR: linear warmup to 1 then linear decay to 0.
    A multiplier (not a new LR) keeps each group's ratio to the others at every step."""
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def micro_batches(idx: np.ndarray, grad_accum: int) -> list[np.ndarray]:
    """One optimizer step's examples in ``grad_accum`` consecutive pieces (fewer for a short last
    batch). Consecutive: with length bucketing a batch is sorted by length, so each piece is too."""
    if grad_accum == 1:
        return [idx]
    return [piece for piece in np.array_split(idx, grad_accum) if len(piece)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on ``device``, without a sync where the copy can be queued (the packed loop too)."""
    if device.type == "cuda":
        # From pageable memory a "non-blocking" copy waits for the GPU to drain its queue: one sync a
        # step, and a small model's step is all launch overhead the host can no longer run ahead of.
        # From pinned memory (torch caches the pinned blocks) it is queued and the host moves on, as
        # the Trainer's DataLoader does with pin_memory=True.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def prepared_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The 2D attention mask as the 4D one the model's attention takes, where the model's code
    (transformers' ``masking_utils``) passes a 4D mask through as it is: made from a 2D mask, it asks
    ``padding_mask.all()`` first, a device sync every forward. sdpa: boolean, True attends; eager:
    additive, in the compute dtype. Any other model or attention: the 2D mask, unchanged."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    module = sys.modules.get(type(getattr(model, "base_model", model)).__module__)
    if module is None or not hasattr(module, "create_bidirectional_mask") or impl not in ("sdpa", "eager"):
        return mask
    keep = mask[:, None, None, :]
    if impl == "sdpa":
        return keep.bool()
    compute = dtype or torch.float32
    return (1.0 - keep.to(compute)) * torch.finfo(compute).min


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    data: Encoded,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    metric: str = "accuracy",
) -> float:
    """``metric`` (see :mod:`llrd_search.engine.metrics`) on ``data``. Sorted by length, so eval batches
    carry almost no padding."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    predictions = []
    for i in range(0, len(order), batch_size):
        batch = to_device(data.batch(order[i : i + batch_size], pad_id), device)
        batch.pop("labels")
        batch["attention_mask"] = prepared_mask(model, batch["attention_mask"], dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**batch).logits
        predictions.append(logits.argmax(-1))  # stays on the device: no per-batch sync
    model.train(was_training)
    predicted = torch.cat(predictions).cpu().numpy() if predictions else np.array([], dtype=np.int64)
    return score(metric, predicted, data.labels[order])


@dataclass
class TrainResult:
    best_score: float  # the best evaluation's train.metric (accuracy by default)
    best_step: int
    steps: int
    train_seconds: float
    eval_seconds: float
    examples_per_second: float
    evals: list[tuple[int, float]] = field(default_factory=list)

    @property
    def best_accuracy(self) -> float:
        """The best score, under its name from before ``train.metric`` existed."""
        return self.best_score


def _check_losses(losses: list[torch.Tensor], first_step: int, guard: DivergenceGuard) -> None:
    """Hand the losses to the divergence guard (it raises); one device sync for many steps."""
    guard.update(torch.stack(losses).float().tolist(), first_step)
    losses.clear()


@dataclass
class _Progress:
    """Where a run is: what :class:`TrainResult` is built from, and what an out-of-memory names."""

    step: int = 0
    examples: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    evals: list[tuple[int, float]] = field(default_factory=list)
    evaluating: bool = False


def train_and_evaluate(
    model: torch.nn.Module,
    task: TaskData,
    groups: list[dict],
    cfg: TrainSection,
    *,
    seed: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
    on_eval: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    fast: FastPath | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with the LLRD ``groups``; evaluate ``evals_per_epoch`` times an epoch.

    ``on_eval(step, score)`` (score: ``cfg.metric``) may raise (e.g. ``optuna.TrialPruned``) to stop early. A loss that
    is not finite or climbs far above its start raises :class:`DivergedError` naming the step. The training-time stand-ins of
    :mod:`llrd_search.engine.fastpath` are on when ``cfg.fast_path`` is (those for ``device``: :meth:`FastPath.for_device`);
    ``fast`` overrides that, e.g. ``FastPath(vocab_rows=False)``. Each optimizer step runs ``cfg.grad_accum`` micro-batches;
    ``cfg.gradient_checkpointing`` recomputes the layers in the backward. Out of device memory, it frees what the trial
    held and raises :class:`~llrd_search.exceptions.OutOfMemoryError` naming the keys that make the trial fit.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if fast is None:
        fast = FastPath.for_device(device) if cfg.fast_path else FastPath.off()
    if cfg.gradient_checkpointing:
        # Checkpointing runs each layer's forward again in the backward: torch's dropout draws the
        # same masks again (the checkpoint saves its RNG state), numpy's stream would not, and the
        # gradient would be that of other masks than the loss's.
        fast = replace(fast, numpy_dropout=False, bf16_attention=False)
    progress = _Progress()
    try:
        _train(model, task, groups, cfg, progress, rng=rng, seed=seed, pad_id=pad_id, device=device, dtype=dtype, on_eval=on_eval, on_step=on_step, fast=fast)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
    else:
        best_step, best = max(progress.evals, key=lambda e: (e[1], -e[0]))
        return TrainResult(
            best_score=best,
            best_step=best_step,
            steps=progress.step,
            train_seconds=progress.train_s,
            eval_seconds=progress.eval_s,
            examples_per_second=progress.examples / progress.train_s if progress.train_s > 0 else 0.0,
            evals=progress.evals,
        )
    # Out of the except block: the error's traceback, and with it every activation and the optimizer
    # its frames held, is gone; free the cache so the worker's next trial (or another process) gets it.
    raise out_of_memory_error(model, cfg, longest=int(task.train.lengths.max()), evaluating=progress.evaluating, device=device, dtype=dtype)


def _train(
    model: torch.nn.Module,
    task: TaskData,
    groups: list[dict],
    cfg: TrainSection,
    progress: _Progress,
    *,
    rng: np.random.Generator,
    seed: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
    on_eval: Callable[[int, float], None] | None,
    on_step: Callable[[int, int], None] | None,
    fast: FastPath,
) -> None:
    """The loop of :func:`train_and_evaluate`, in a frame of its own: an error's traceback holds
    its tensors (the optimizer, the last batch and loss) and nothing of the caller's."""
    model.to(device).train()  # in here: a model too big for the device is an out-of-memory too
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    eval_every = {min(steps_per_epoch, round(steps_per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
    # On CPU a finiteness check is free; on a GPU it is a sync, so check in chunks of steps.
    check_every = 1 if device.type == "cpu" else 32
    guard = DivergenceGuard(getattr(getattr(model, "config", None), "num_labels", 2))

    losses: list[torch.Tensor] = []
    with checkpointing(model, cfg.gradient_checkpointing), \
            fast_path(model, groups, fast, token_ids=np.append(task.train.ids, pad_id), seed=seed, device=device) as run:
        scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, linear_schedule(total, cfg.warmup_ratio))
        for _epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            for i, idx in enumerate(batch_order(task.train.lengths, cfg.batch_size, rng, cfg.length_bucketing), 1):
                pieces = micro_batches(idx, cfg.grad_accum)
                step_loss = None
                for k, piece in enumerate(pieces, 1):
                    batch = to_device(task.train.batch(piece, pad_id), device)
                    batch["attention_mask"] = prepared_mask(model, batch["attention_mask"], dtype)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        loss = model(**batch).loss
                    if len(pieces) > 1:
                        # Each micro-batch's mean loss weighted by its share of the batch's examples: the
                        # accumulated gradient is the full batch's mean gradient.
                        loss = loss * (len(piece) / len(idx))
                    step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                    if k == len(pieces):  # the guard sees one loss per optimizer step
                        losses.append(step_loss)
                        if len(losses) >= check_every or i in eval_every:
                            _check_losses(losses, progress.step + 1 - len(losses), guard)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True)
                run.step()
                scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.examples += len(idx)
                if on_step:
                    on_step(progress.step, total)
                if i in eval_every:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    progress.train_s += time.perf_counter() - t0
                    t1 = time.perf_counter()
                    progress.evaluating = True
                    acc = evaluate(model, task.validation, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, dtype=dtype, metric=cfg.metric)
                    progress.evaluating = False
                    progress.eval_s += time.perf_counter() - t1
                    progress.evals.append((progress.step, acc))
                    if on_eval:
                        on_eval(progress.step, acc)
                    t0 = time.perf_counter()
            progress.train_s += time.perf_counter() - t0
