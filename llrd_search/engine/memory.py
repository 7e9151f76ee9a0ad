"""How much accelerator memory one trial needs: a cheap estimate from the model's shape.

One number shared by whoever has to decide before a trial runs: how many workers fit on a GPU
(``run --workers-per-gpu auto``), how many trials to pack into one process (``[train] pack =
"auto"``) and whether a trial will fit at all (preflight's warning). Pure arithmetic on the
config: no model is built and no device is touched.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3

# fp32 weights, gradients and AdamW's two moments: 4 copies of 4 bytes per parameter.
TRAIN_STATE_BYTES_PER_PARAM = 16

# Activations kept for the backward pass, per layer and token, in elements: 34 x hidden for the
# linear layers, layer norms, GELU and dropout masks of a BERT block with a 4 x hidden FFN, plus
# 5 x heads x seq for the attention scores, softmax and its dropout (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models", table 2). SDPA's fused kernels
# keep less than the 5 x heads x seq term: the estimate errs on the large side.
ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN = 34
ACTIVATION_ELEMENTS_PER_TOKEN_HEAD_SEQ = 5


def _dtype_bytes(dtype: Any) -> int:
    """Bytes per activation element: 2 under bf16/fp16 autocast, else 4 (fp32)."""
    if dtype is None:
        return 4
    name = str(dtype).removeprefix("torch.")
    return 2 if name in ("bfloat16", "float16", "bf16", "fp16", "half") else 4


def activation_bytes(config: Any, batch_size: int, max_length: int, dtype: Any = None) -> int:
    """What the forward pass of one training step keeps for the backward pass (all layers)."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    per_token = ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN * hidden + ACTIVATION_ELEMENTS_PER_TOKEN_HEAD_SEQ * heads * max_length
    return layers * batch_size * max_length * per_token * _dtype_bytes(dtype)


def trial_memory_estimate(config: Any, n_params: int, batch_size: int, max_length: int, dtype: Any = None) -> int:
    """Bytes one trial needs on its device at its peak: fp32 weights, gradients and AdamW moments
    (16 bytes a parameter) plus the activations of one step of ``batch_size`` x ``max_length``
    tokens (:func:`activation_bytes`; ``dtype`` the autocast dtype, None for fp32). Not included:
    the CUDA context of the process (~0.5 GiB, counted once per worker by ``workers_per_gpu``).

    ``config``: anything with ``hidden_size``, ``num_hidden_layers`` and ``num_attention_heads``
    (a transformers config). Padded batches are shorter than ``max_length`` with length bucketing,
    so this is an upper bound for a plain fine-tuning step.
    """
    return TRAIN_STATE_BYTES_PER_PARAM * n_params + activation_bytes(config, batch_size, max_length, dtype)


def param_count_estimate(config: Any) -> int:
    """Parameters of a BERT-like encoder from its config alone (embeddings, layers, pooler; the
    classification head is left out: a few thousand), for when the model is not loaded."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    positions = getattr(config, "max_position_embeddings", 512)
    types = getattr(config, "type_vocab_size", 0) or 0
    embeddings = (config.vocab_size + positions + types) * h + 2 * h  # + LayerNorm
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, output + LayerNorm
    ffn = (h * inter + inter) + (inter * h + h) + 2 * h  # up, down + LayerNorm
    pooler = h * h + h
    return embeddings + layers * (attention + ffn) + pooler


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
