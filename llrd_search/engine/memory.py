"""How much accelerator memory one trial needs, for scheduling, and what trials really took.

The scheduling view of :mod:`llrd_search.engine.memory_check`'s estimate (the one preflight and
``validate`` warn with): how many workers fit on a GPU (``run --workers-per-gpu auto``) and how
many trials to pack into one process (``[train] pack = "auto"``). Pure arithmetic on the config: no
model is built and no device is touched. A trial's measured peak (:data:`PEAK_ATTR`) replaces the
estimate once a study has one.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3
# Workers sharing this process's GPU (set by `run`/`confirm`'s GPU plan, study/gpus.py): pack =
# "auto" packs into 1/N of the free memory, since its neighbours start at the same moment.
GPU_SHARE_ENV = "LLRD_SEARCH_GPU_SHARE"


def _is_half(dtype: Any) -> bool:
    """bf16/fp16 autocast (2-byte activations); None or anything else is fp32."""
    if dtype is None:
        return False
    return str(dtype).removeprefix("torch.") in ("bfloat16", "float16", "bf16", "fp16", "half")


def trial_memory_estimate(
    config: Any, n_params: int, batch_size: int, max_length: int, dtype: Any = None, *, grad_accum: int = 1, gradient_checkpointing: bool = False
) -> int:
    """Bytes one trial needs on a GPU at its peak, for scheduling: the calibrated estimate of
    :func:`llrd_search.engine.memory_check.estimate_trial_memory` (weights, gradients, AdamW moments,
    the activations of one micro-batch of ``batch_size / grad_accum`` rows of ``max_length`` tokens,
    autocast's bf16 weight copy when ``dtype`` is bf16/fp16), less the process's CUDA context, which
    ``workers_per_gpu`` counts once per worker and packing shares between a pack's trials."""
    from llrd_search.engine.memory_check import RUNTIME, estimate_trial_memory
    from llrd_search.spec import TrainSection

    cfg = TrainSection(batch_size=batch_size, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing)
    estimate = estimate_trial_memory(config, n_params, cfg, max_length=max_length, bf16=_is_half(dtype), device_type="cuda")
    return estimate.total - RUNTIME["cuda"]


def pack_extra_bytes(config: Any, n_params: int, k: int, eval_batch_size: int, max_length: int, dtype: Any = None) -> int:
    """What a pack of ``k`` trials needs beyond ``k`` times :func:`trial_memory_estimate`, at its peak:
    either its evaluation (one encoder layer's activations at ``k x eval_batch_size`` rows of
    ``max_length`` tokens, plus the due copies' weights gathered when not every slot is due) or a
    dropped slot (the kept copies' parameters and AdamW moments are re-sliced before the old ones are
    freed). The optimizer itself (fused AdamW, foreach clipping) allocates nothing parameter-sized."""
    from llrd_search.engine.memory_check import Shape, layer_activation_bytes

    if k <= 1:
        return 0
    shape, elem = Shape.of(config), 2 if _is_half(dtype) else 4
    rows = k * eval_batch_size
    tokens = rows * max_length
    evaluation = layer_activation_bytes(shape, tokens, rows, max_length, elem=elem, materialised_scores=False) + 4 * n_params * (k - 1)
    dropping = 12 * n_params * (k - 1)
    return max(evaluation, dropping)


def param_count_estimate(config: Any) -> int:
    """Parameters of a BERT-like encoder from its config alone, for when the model is not loaded
    (:func:`llrd_search.engine.memory_check.count_params`)."""
    from llrd_search.engine.memory_check import count_params

    return count_params(config)


PEAK_ATTR = "cuda_peak_bytes"  # the trial user attribute: what a trial really took on its GPU


def reset_peak(device: Any) -> None:
    """Start measuring a trial's peak memory on ``device`` (CUDA only; nothing elsewhere)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: Any) -> int | None:
    """The peak memory allocated on ``device`` since :func:`reset_peak`; None off CUDA."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def measured_trial_bytes(trials: Any) -> int | None:
    """The largest :data:`PEAK_ATTR` of finished trials (a resumed study), else None."""
    peaks = [t.user_attrs[PEAK_ATTR] for t in trials if t.state.is_finished() and PEAK_ATTR in t.user_attrs]
    return max(peaks) if peaks else None


def gib(n_bytes: float) -> str:
    """``3.1`` for 3.1 GiB: one decimal under 10 GiB, none above."""
    value = n_bytes / GIB
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"
