"""The training step's speed stand-ins, behind one switch: ``with fast_path(model, groups, options) as run:``.

For one training run :func:`fast_path` swaps faster stand-ins into the model and builds the
optimizer; on leaving it puts the original modules back, holding the trained values. Evaluation
never runs through a stand-in: in eval mode the full embedding table is read, nothing is dropped
and attention is SDPA. Each stand-in is a field of :class:`FastPath`; ``[train] fast_path = false``
turns them all off (the plain transformers modules and foreach AdamW).

Exact up to float rounding (the same update in another order of operations; ``tests/test_train.py``
compares every trained weight with the plain path, across eight encoder families):

* ``fused_adamw``: ``torch.optim.AdamW(fused=True)``, one pass per tensor instead of ~10 (foreach
  where torch has no fused kernel for the device).
* ``vocab_rows`` (:class:`TrainVocabEmbedding`): only the word-embedding rows of tokens in the
  training data are a parameter. Every other row has a zero gradient at every step, so its AdamW
  update is weight decay alone: a scalar, accrued per step and applied when the table is read.
  MiniLM's 30522-row table is half its parameters.
* ``fused_qkv`` (:class:`~llrd_search.engine.fused_qkv.FusedQKV`): query, key and value projections as
  one matmul over one [3d, in] parameter. AdamW is elementwise and the clipping norm a sum of squares.

Not exact: these change the numbers a seed trains (CPU only; CUDA's own kernels are fast):

* ``numpy_dropout`` (:class:`FastDropout`): dropout masks from numpy's PCG64; torch's CPU
  ``bernoulli_`` took ~40 % of MiniLM's forward pass. Same distribution (p rounded to a multiple of
  1/65536), another random stream: a seed draws other masks than torch would.
* ``bf16_attention`` (:func:`attention`; models on the transformers attention interface, while
  training with dropout): SDPA falls back to its fp32 math path there (upcasting q, k, v, then
  ``bernoulli_``). The stand-in multiplies q·kᵀ and p·v in the autocast dtype like every autocast
  matmul, so under bf16 the scores and probabilities are rounded to bf16; softmax stays fp32. Its
  masks come from :class:`FastDropout` (numpy's stream) even with ``numpy_dropout`` off. In fp32
  it matches SDPA to float tolerance, but for the mask stream.

Why the inexact two are on by default: together they give +14-19 % train examples/s on a bf16 CPU
and do not move accuracy. Every stand-in on vs off (fused AdamW in both), same seeds 0-3, fixed config
on SST-2: 0.8268 ± 0.0033 vs 0.8245 ± 0.0087 (``docs/performance.md``, from ``bench/ablation.py
--accuracy-seeds 4``). ``tests/test_train.py`` bounds the bf16 attention against SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from llrd_search.engine.fused_qkv import fuse_qkv

ATTENTION = "llrd_sdpa"


@dataclass(frozen=True)
class FastPath:
    """Which stand-ins a training run uses (see the module docstring); all on by default."""

    fused_adamw: bool = True
    vocab_rows: bool = True
    numpy_dropout: bool = True
    bf16_attention: bool = True
    fused_qkv: bool = True

    @classmethod
    def for_device(cls, device: torch.device | str) -> FastPath:
        """What ``[train] fast_path = true`` uses on ``device``. On a CPU every stand-in (as before).
        On CUDA the two that exist to dodge CPU kernels are off: SDPA's flash and memory-efficient
        kernels do attention with dropout in bf16 there (``bf16_attention`` would materialise the
        scores SDPA never does), and torch's CUDA dropout draws its mask on the device
        (``numpy_dropout`` would draw it on the host and copy it over at every layer). Fused AdamW
        has a CUDA kernel, so it stays. ``vocab_rows`` stays: AdamW reads and writes every trained
        tensor at each step, memory-bound work that the untrained rows (half of MiniLM) only add to.
        ``fused_qkv`` stays: one [3d, d] matmul instead of three small ones is fewer kernel launches,
        which is what a small encoder's step is made of on a GPU. Their GPU timing is pending a lent
        GPU (docs/performance.md)."""
        if torch.device(device).type == "cuda":
            return cls(numpy_dropout=False, bf16_attention=False)
        return cls()

    @classmethod
    def off(cls) -> FastPath:
        """Every stand-in off: the model's own modules and foreach AdamW (``[train] fast_path = false``)."""
        return cls(**{f.name: False for f in fields(cls)})


def make_optimizer(groups: list[dict], *, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a kernel for the device and ``fused`` is asked for, else foreach."""
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, foreach=True)


class TrainVocabEmbedding(torch.nn.Module):
    """Stands in for the word embedding while training; see the module docstring. Weight decay owed
    by the rows outside ``token_ids`` accumulates in :meth:`before_step` and :meth:`sync` applies it
    when the full table is read again (evaluation, the end of training)."""

    def __init__(self, embedding: torch.nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        self.full = [embedding]  # a list hides it from .parameters(): its weight is not trained here
        self.register_buffer("token_ids", token_ids, persistent=False)
        pos = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=token_ids.device)
        pos[token_ids] = torch.arange(len(token_ids), device=token_ids.device)
        self.register_buffer("pos", pos, persistent=False)
        self.rows = torch.nn.Parameter(embedding.weight.detach()[token_ids].clone())
        self.padding_idx = None if embedding.padding_idx is None else int(pos[embedding.padding_idx])
        self.scale = 1.0  # weight decay owed by the rows outside token_ids
        self.group: dict | None = None  # the optimizer group holding self.rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.full[0](ids)
        return torch.nn.functional.embedding(self.pos[ids], self.rows, self.padding_idx)

    def before_step(self) -> None:
        if self.group is not None:
            self.scale *= 1.0 - self.group["lr"] * self.group["weight_decay"]

    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained rows (and the decay owed by the others) into the full table."""
        weight = self.full[0].weight
        if self.scale != 1.0:
            weight.mul_(self.scale)
            self.scale = 1.0
        weight.index_copy_(0, self.token_ids, self.rows.to(weight.dtype))

    def train(self, mode: bool = True) -> TrainVocabEmbedding:
        if not mode:
            self.sync()
        return super().train(mode)


class FastDropout(torch.nn.Module):
    """``nn.Dropout`` with its mask drawn by numpy's PCG64 (2-3x faster than torch's CPU
    ``bernoulli_`` here). The drop probability is p rounded to a multiple of 1/65536."""

    def __init__(self, p: float, rng: np.random.Generator):
        super().__init__()
        self.p, self.rng = p, rng
        self.cut = round(p * 65536) - 32768  # keep where a uniform int16 >= cut
        self.scale = 65536 / (65536 - round(p * 65536))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        bits = torch.from_numpy(self.rng.integers(0, 65536, x.numel(), dtype=np.uint16).view(np.int16))
        return x * (bits.view(x.shape) >= self.cut).to(x.dtype).mul_(self.scale)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The ``llrd_sdpa`` attention: SDPA, except when training with dropout (see module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    drop = getattr(module, "dropout", None)
    plain = not kwargs.get("is_causal") and kwargs.get("position_bias") is None and getattr(module, "num_key_value_groups", 1) == 1
    if dropout == 0.0 or not module.training or not isinstance(drop, FastDropout) or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = drop(torch.softmax(scores, dim=-1, dtype=torch.float32)).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # an older transformers without the interfaces: keep its attention
        return False
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def _swap(model: torch.nn.Module, module: torch.nn.Module, new: torch.nn.Module, undo: ExitStack) -> None:
    """Put ``new`` where ``module`` sits in ``model`` until ``undo`` unwinds."""
    parent_name, _, attr = next(n for n, m in model.named_modules() if m is module).rpartition(".")
    parent = model.get_submodule(parent_name)
    new.train(module.training)
    setattr(parent, attr, new)
    undo.callback(setattr, parent, attr, module)


def _train_vocab(model: torch.nn.Module, groups: list[dict], token_ids: np.ndarray, undo: ExitStack) -> list[dict]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    if not isinstance(emb, torch.nn.Embedding) or type(emb).forward is not torch.nn.Embedding.forward:
        return groups
    weight = emb.weight
    uses = sum(p is weight for _, p in model.named_parameters(remove_duplicate=False))
    holders = [g for g in groups if any(p is weight for p in g["params"])]
    if emb.max_norm is not None or emb.sparse or uses != 1 or len(holders) != 1:
        return groups  # tied, renormed or untrained tables stay dense
    ids = np.unique(token_ids)  # the caller includes the id its batches are padded with
    if emb.padding_idx is not None:
        ids = np.union1d(ids, [emb.padding_idx])
    if len(ids) >= emb.num_embeddings:
        return groups
    vocab = TrainVocabEmbedding(emb, torch.as_tensor(ids, dtype=torch.long, device=weight.device))
    _swap(model, emb, vocab, undo)
    undo.callback(vocab.sync)  # runs first: the trained rows go into the table, then the table goes back
    return [{**g, "params": [vocab.rows if p is weight else p for p in g["params"]]} if g is holders[0] else g for g in groups]


def _cpu_dropout_and_attention(model: torch.nn.Module, options: FastPath, seed: int, undo: ExitStack) -> None:
    if options.numpy_dropout or options.bf16_attention:
        rng = np.random.default_rng(seed)
        for module in [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0 and not m.inplace]:
            # The attention reads its dropout module's rate; only our attention samples from it.
            if options.numpy_dropout or any(getattr(parent, "dropout", None) is module for parent in model.modules() if hasattr(parent, "query")):
                _swap(model, module, FastDropout(module.p, rng), undo)
    config = getattr(model, "config", None)
    if options.bf16_attention and getattr(config, "_attn_implementation", None) == "sdpa" and _register_attention():
        config._attn_implementation = ATTENTION
        undo.callback(setattr, config, "_attn_implementation", "sdpa")


@dataclass
class FastRun:
    """What :func:`fast_path` yields to the training loop."""

    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # every trained tensor, the stand-ins' own included: what to clip
    _before_step: Callable[[], None]

    def step(self) -> None:
        """The optimizer step, with the vocabulary rows' weight decay accrued first."""
        self._before_step()
        self.optimizer.step()


@contextmanager
def fast_path(
    model: torch.nn.Module,
    groups: list[dict],
    options: FastPath = FastPath(),
    *,
    token_ids: np.ndarray,
    seed: int,
    device: torch.device,
) -> Iterator[FastRun]:
    """Swap the stand-ins ``options`` asks for into ``model`` (already on ``device``), build the
    optimizer over ``groups`` and yield both; on leaving, even by an exception, put every original
    module back with the trained values. ``token_ids``: every token id the training batches hold,
    padding included. Dropout and attention stand-ins apply on a CPU only."""
    with ExitStack() as undo:  # unwinds in reverse: attention, dropout, q/k/v, vocabulary
        if options.vocab_rows:
            groups = _train_vocab(model, groups, token_ids, undo)
        if options.fused_qkv:
            groups = fuse_qkv(model, groups, undo)
        if device.type == "cpu":
            _cpu_dropout_and_attention(model, options, seed, undo)
        optimizer = make_optimizer(groups, fused=options.fused_adamw)
        vocab = next((m for m in model.modules() if isinstance(m, TrainVocabEmbedding)), None)
        if vocab is not None:  # its rows' LR and weight decay, read at every step
            vocab.group = next(g for g in optimizer.param_groups if any(p is vocab.rows for p in g["params"]))
        yield FastRun(optimizer, [p for g in groups for p in g["params"]], vocab.before_step if vocab is not None else _no_op)


def _no_op() -> None:
    pass
