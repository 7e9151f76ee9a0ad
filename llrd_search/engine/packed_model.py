"""K copies of one model as one batched model (packed trials, the HFTA way: Wang et al., MLSys 2021).

:func:`pack_models` turns K same-shaped models into one: every ``nn.Linear``, ``nn.LayerNorm`` and
``nn.Embedding`` becomes a packed module holding the K copies' weights stacked on a leading axis,
and every other module (attention, activations, dropout, the transformers glue) is shared code.
Copy k's examples occupy rows ``k*B:(k+1)*B`` of every batch, so each row only ever meets its own
copy's weights: a linear layer reshapes ``[K*B, ..., in]`` to ``[K, B*..., in]`` and runs one
batched matmul, a norm scales row block k by copy k's weight, an embedding reads copy k's table.
The K copies are independent: copy k's outputs and gradients equal the unpacked model's with copy
k's weights (to float rounding: one batched matmul instead of K; tests/test_packed.py).

Not vmap: ``torch.func.vmap`` over a transformers model trips on the data-dependent control flow
of its mask creation; module surgery has no such limit. A model with a parameter outside those
three module types (a bare ``nn.Parameter``) cannot be packed: :class:`ModelError` names it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from llrd_search.exceptions import ModelError


class PackState:
    """What every packed module of one model shares: K copies, B rows per copy in the current batch."""

    def __init__(self, k: int):
        self.k = k
        self.rows = 1
        # While set (:func:`only_copies`): the forward runs these copies alone, ``k`` is their count.
        self.only: torch.Tensor | None = None


def _weights(module: nn.Module, attr: str) -> torch.Tensor | None:
    """A packed module's stacked ``attr``, cut to the copies of ``state.only`` when set."""
    value = getattr(module, attr)
    only = module.state.only
    return value if value is None or only is None else value.index_select(0, only)


class PackedLinear(nn.Module):
    def __init__(self, state: PackState, sources: Sequence[nn.Linear]):
        super().__init__()
        self.state = state
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in sources]).clone())  # [K, out, in]
        has_bias = sources[0].bias is not None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in sources]).unsqueeze(1).clone()) if has_bias else None  # [K, 1, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, bias = self.state.k, _weights(self, "bias")
        flat = x.reshape(k, -1, x.shape[-1])
        wt = _weights(self, "weight").transpose(1, 2)
        out = torch.baddbmm(bias, flat, wt) if bias is not None else torch.bmm(flat, wt)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class PackedLayerNorm(nn.Module):
    def __init__(self, state: PackState, sources: Sequence[nn.LayerNorm]):
        super().__init__()
        first = sources[0]
        if len(first.normalized_shape) != 1 or not first.elementwise_affine:
            raise ModelError(f"cannot pack a LayerNorm over {tuple(first.normalized_shape)} without an affine weight")
        self.state, self.eps, self.shape = state, first.eps, tuple(first.normalized_shape)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in sources]).clone())  # [K, d]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in sources]).clone()) if first.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.state.k
        normed = F.layer_norm(x, self.shape, None, None, self.eps).reshape(k, -1, self.shape[0])
        weight, bias = _weights(self, "weight"), _weights(self, "bias")
        out = normed * weight.unsqueeze(1).to(normed.dtype)
        if bias is not None:
            out = out + bias.unsqueeze(1).to(normed.dtype)
        return out.reshape(x.shape)


class PackedEmbedding(nn.Module):
    def __init__(self, state: PackState, sources: Sequence[nn.Embedding]):
        super().__init__()
        first = sources[0]
        if first.max_norm is not None or first.sparse or first.scale_grad_by_freq:
            raise ModelError("cannot pack an Embedding with max_norm, sparse or scale_grad_by_freq")
        self.state, self.padding_idx = state, first.padding_idx
        self.num_embeddings = first.num_embeddings
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in sources]).clone())  # [K, V, d]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        k = self.state.k
        if ids.shape[0] == 1 and k * self.state.rows != 1:
            ids = ids.expand(k * self.state.rows, *ids.shape[1:])  # a broadcast input (position ids): every copy reads it
        per_copy = ids.reshape(k, -1)
        offset = torch.arange(k, device=ids.device).unsqueeze(1) * self.num_embeddings
        weight = _weights(self, "weight")
        out = F.embedding(per_copy + offset, weight.reshape(-1, weight.shape[-1]))
        if self.padding_idx is not None:
            # nn.Embedding gives the padding row no gradient: neither does copy k's padding row.
            out = torch.where((per_copy == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out.reshape(*ids.shape, self.weight.shape[-1])


_PACKED: dict[type, type] = {nn.Linear: PackedLinear, nn.LayerNorm: PackedLayerNorm, nn.Embedding: PackedEmbedding}
PACKED_TYPES = tuple(_PACKED.values())


def pack_models(models: Sequence[nn.Module]) -> tuple[nn.Module, PackState]:
    """One model running ``models`` as K packed copies; ``models[0]`` is rebuilt in place (its
    modules replaced), the others are only read. Raises ModelError for a module it cannot pack."""
    base = models[0]
    state = PackState(len(models))
    for name, module in list(base.named_modules()):
        kind = _PACKED.get(type(module))
        if kind is None or not name:
            continue
        sources = [m.get_submodule(name) for m in models]
        parent, _, attr = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, attr, kind(state, sources))
    for name, module in base.named_modules():
        if isinstance(module, PACKED_TYPES):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            raise ModelError(
                f"cannot pack {type(base).__name__}: module '{name}' ({type(module).__name__}) holds parameters "
                f"({', '.join(own)}) outside nn.Linear, nn.LayerNorm and nn.Embedding; use [train] pack = 1"
            )
    return base, state


@contextmanager
def only_copies(state: PackState, copies: Sequence[int] | None, device: torch.device | None = None) -> Iterator[None]:
    """Run the forward on ``copies`` alone (their weights gathered per call: for evaluating the
    slots that are due without computing the others); None or every copy: all of them."""
    if copies is None or len(copies) == state.k:
        yield
        return
    k = state.k
    state.only, state.k = torch.as_tensor(list(copies), dtype=torch.long, device=device), len(copies)
    try:
        yield
    finally:
        state.only, state.k = None, k


def packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PACKED_TYPES)}


@torch.no_grad()
def load_copy(model: nn.Module, k: int, source: nn.Module) -> None:
    """Write ``source``'s weights (an unpacked model of the same architecture) into copy ``k``."""
    for name, packed in packed_modules(model).items():
        src = source.get_submodule(name)
        packed.weight[k].copy_(src.weight)
        if getattr(packed, "bias", None) is not None:
            packed.bias[k].copy_(src.bias.reshape(packed.bias[k].shape))


@torch.no_grad()
def keep_copies(model: nn.Module, state: PackState, keep: Sequence[int]) -> None:
    """Drop every copy not in ``keep`` (slices each stacked parameter; they become new tensors)."""
    index = torch.as_tensor(list(keep), dtype=torch.long)
    for packed in packed_modules(model).values():
        for attr in ("weight", "bias"):
            param = getattr(packed, attr, None)
            if param is not None:
                setattr(packed, attr, nn.Parameter(param.index_select(0, index.to(param.device))))
    state.k = len(keep)


def copy_weights(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Copy ``k``'s parameters under the unpacked model's names and shapes (tests, export)."""
    out = {}
    for name, packed in packed_modules(model).items():
        out[f"{name}.weight"] = packed.weight[k].detach().clone()
        if getattr(packed, "bias", None) is not None:
            out[f"{name}.bias"] = packed.bias[k].detach().reshape(-1).clone()
    return out
