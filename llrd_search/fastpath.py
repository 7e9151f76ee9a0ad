"""Training-time stand-ins that make a CPU trial faster without changing what is trained.

:func:`speed_up` swaps them into a model for the length of one ``train_and_evaluate`` call and
returns the function that puts the original modules back, with the trained values:

* :class:`TrainVocabEmbedding`: only the word-embedding rows of tokens in the training data are a
  parameter. Exact: every other row has a zero gradient at every step, so its AdamW update is weight
  decay alone, a scalar that is applied lazily. MiniLM's 30522-row table is half its parameters.
* :class:`FusedQKV`: query, key and value projections as one matmul over one [3d, in] parameter.
  Exact: AdamW is elementwise and the clipping norm a sum of squares.
* :class:`FastDropout` (CPU): dropout masks from numpy's PCG64; torch's CPU ``bernoulli_`` took
  ~40 % of MiniLM's forward pass here. Same distribution, another random stream.
* attention (CPU, models using the transformers attention interface): with dropout, SDPA falls back
  to its fp32 math path (upcasting q, k, v, then ``bernoulli_``); ours multiplies q·k and p·v in bf16
  like every autocast matmul, softmax in fp32, and draws the dropout mask with :class:`FastDropout`.

Each is measured in ``docs/performance.md`` (``bench/ablation.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ATTENTION = "llrd_sdpa"


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


QKV_NAMES = (("query", "key", "value"), ("q", "k", "v"), ("q_lin", "k_lin", "v_lin"), ("query_proj", "key_proj", "value_proj"))


class FusedQKV(torch.nn.Module):
    """Stands in for a self-attention's ``query`` Linear and owns one [3d, in] weight for query, key
    and value: called with the same input, the three projections are one matmul (one bf16 cast of the
    input instead of three). :class:`_QKVPart` stands in for ``key`` and ``value``."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        self.originals = linears  # a plain list: not submodules, their weights are not trained here
        self.size = linears[0].out_features
        self.weight = torch.nn.Parameter(torch.cat([m.weight.detach() for m in linears]))
        self.bias = torch.nn.Parameter(torch.cat([m.bias.detach() for m in linears])) if linears[0].bias is not None else None
        self._cache: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = None

    def project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        cache = self._cache
        if cache is not None and cache[0] is x and part not in cache[2]:
            cache[2].add(part)
            if len(cache[2]) == 3:
                self._cache = None
            return cache[1][part]
        if part == 0:
            out = torch.nn.functional.linear(x, self.weight, self.bias).split(self.size, dim=-1)
            self._cache = (x, out, {0})
            return out[0]
        rows = slice(part * self.size, (part + 1) * self.size)
        return torch.nn.functional.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, 0)

    @torch.no_grad()
    def sync(self) -> None:
        for i, m in enumerate(self.originals):
            m.weight.copy_(self.weight[i * self.size : (i + 1) * self.size])
            if self.bias is not None:
                m.bias.copy_(self.bias[i * self.size : (i + 1) * self.size])


class _QKVPart(torch.nn.Module):
    def __init__(self, fused: FusedQKV, part: int):
        super().__init__()
        self.fused, self.part = [fused], part  # a list: the weight is registered once, on FusedQKV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].project(x, self.part)


def _fuse_qkv(model: torch.nn.Module, groups: list[dict]) -> tuple[list[dict], Callable[[], None]]:
    """Swap :class:`FusedQKV` into every attention with three same-shape q/k/v Linears whose weights
    (and biases) share an optimizer group. Exact: AdamW is elementwise, the norm a sum of squares."""
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    replace: dict[int, torch.Tensor] = {}  # id(old param) -> fused param (first of three) or None
    undo: list[Callable[[], None]] = []
    fused_all: list[FusedQKV] = []
    for module in list(model.modules()):
        for names in QKV_NAMES:
            linears = [getattr(module, n, None) for n in names]
            if not all(type(m) is torch.nn.Linear for m in linears):
                continue
            shapes = {(m.in_features, m.out_features, m.bias is not None, m.weight.dtype) for m in linears}
            tensors = [t for m in linears for t in (m.weight, m.bias) if t is not None]
            if len(shapes) != 1 or any(id(t) not in group_of or not t.requires_grad for t in tensors):
                continue
            if len({group_of[id(m.weight)] for m in linears}) != 1 or (linears[0].bias is not None and len({group_of[id(m.bias)] for m in linears}) != 1):
                continue
            fused = FusedQKV(linears)
            fused.train(module.training)
            for i, (name, m) in enumerate(zip(names, linears, strict=True)):
                setattr(module, name, fused if i == 0 else _QKVPart(fused, i))
                replace[id(m.weight)] = fused.weight if i == 0 else None
                if m.bias is not None:
                    replace[id(m.bias)] = fused.bias if i == 0 else None
            undo.append(lambda module=module, names=names, linears=linears: [setattr(module, n, m) for n, m in zip(names, linears, strict=True)])
            fused_all.append(fused)
    if not fused_all:
        return groups, lambda: None
    new_groups = []
    for g in groups:
        params = [replace.get(id(p), p) for p in g["params"]]
        new_groups.append({**g, "params": [p for p in params if p is not None]})

    def restore() -> None:
        for f in fused_all:
            f.sync()
        for fn in undo:
            fn()

    return new_groups, restore


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


def _swap(model: torch.nn.Module, module: torch.nn.Module, new: torch.nn.Module) -> Callable[[], None]:
    """Put ``new`` where ``module`` sits in ``model``; returns the function undoing it."""
    parent_name, _, attr = next(n for n, m in model.named_modules() if m is module).rpartition(".")
    parent = model.get_submodule(parent_name)
    new.train(module.training)
    setattr(parent, attr, new)
    return lambda: setattr(parent, attr, module)


def _train_vocab(model: torch.nn.Module, groups: list[dict], token_ids: np.ndarray) -> tuple[list[dict], Callable[[], None]]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    if not isinstance(emb, torch.nn.Embedding) or type(emb).forward is not torch.nn.Embedding.forward:
        return groups, lambda: None
    weight = emb.weight
    uses = sum(p is weight for _, p in model.named_parameters(remove_duplicate=False))
    holders = [g for g in groups if any(p is weight for p in g["params"])]
    if emb.max_norm is not None or emb.sparse or uses != 1 or len(holders) != 1:
        return groups, lambda: None  # tied, renormed or untrained tables stay dense
    ids = np.unique(token_ids)  # the caller includes the id its batches are padded with
    if emb.padding_idx is not None:
        ids = np.union1d(ids, [emb.padding_idx])
    if len(ids) >= emb.num_embeddings:
        return groups, lambda: None
    vocab = TrainVocabEmbedding(emb, torch.as_tensor(ids, dtype=torch.long, device=weight.device))
    undo = _swap(model, emb, vocab)
    new_groups = [{**g, "params": [vocab.rows if p is weight else p for p in g["params"]]} if g is holders[0] else g for g in groups]

    def restore() -> None:
        vocab.sync()
        undo()

    return new_groups, restore


def speed_up(
    model: torch.nn.Module,
    groups: list[dict],
    token_ids: np.ndarray,
    *,
    seed: int,
    device: torch.device,
    vocab: bool = True,
    fuse_qkv: bool = True,
    dropout: bool = True,
    attention: bool = True,
) -> tuple[list[dict], Callable[[], None]]:
    """Swap the stand-ins into ``model`` (already on ``device``; ``token_ids``: every token id the
    training batches hold, padding included). Each flag turns one on; dropout and attention apply on a CPU only (CUDA has fast
    ones). Returns the optimizer groups to use and the function restoring the original modules."""
    groups, restore_vocab = _train_vocab(model, groups, token_ids) if vocab else (groups, lambda: None)
    groups, restore_qkv = _fuse_qkv(model, groups) if fuse_qkv else (groups, lambda: None)
    undo: list[Callable[[], None]] = [restore_qkv]
    cpu = device.type == "cpu"
    if cpu and (dropout or attention):
        rng = np.random.default_rng(seed)
        for module in [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0 and not m.inplace]:
            # The attention reads its dropout module's rate; only our attention samples from it.
            if dropout or any(getattr(parent, "dropout", None) is module for parent in model.modules() if hasattr(parent, "query")):
                undo.append(_swap(model, module, FastDropout(module.p, rng)))
    config = getattr(model, "config", None)
    if cpu and attention and getattr(config, "_attn_implementation", None) == "sdpa" and _register_attention():
        config._attn_implementation = ATTENTION
        undo.append(lambda: setattr(config, "_attn_implementation", "sdpa"))

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        restore_vocab()

    return groups, restore


def before_step(model: torch.nn.Module) -> Callable[[], None]:
    """The hook to call right before each optimizer step (accrues the vocabulary rows' decay)."""
    vocab = next((m for m in model.modules() if isinstance(m, TrainVocabEmbedding)), None)
    return vocab.before_step if vocab is not None else lambda: None


def bind_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Tell the vocabulary stand-in which optimizer group (LR, weight decay) its rows are in."""
    for vocab in (m for m in model.modules() if isinstance(m, TrainVocabEmbedding)):
        vocab.group = next(g for g in optimizer.param_groups if any(p is vocab.rows for p in g["params"]))
