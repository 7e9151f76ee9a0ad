"""The fused q/k/v stand-in of :mod:`llrd_search.engine.fastpath` (``FastPath.fused_qkv``).

Query, key and value projections called with the same input become one matmul over one [3d, in]
parameter (one bf16 cast of the input instead of three). Exact up to float rounding: AdamW is
elementwise and the clipping norm a sum of squares, so one fused tensor trains like its three parts.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

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


def fuse_qkv(model: torch.nn.Module, groups: list[dict], undo: ExitStack) -> list[dict]:
    """Swap :class:`FusedQKV` into every attention with three same-shape q/k/v Linears whose weights
    (and biases) share an optimizer group; returns the groups holding the fused parameters."""
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    replace: dict[int, torch.Tensor | None] = {}  # id(old param) -> fused param (first of three) or None
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

            def restore(fused: FusedQKV = fused, module: torch.nn.Module = module, names: tuple = names, linears: list = linears) -> None:
                fused.sync()
                for name, m in zip(names, linears, strict=True):
                    setattr(module, name, m)

            undo.callback(restore)
    if not replace:
        return groups
    new_groups = []
    for g in groups:
        params = [replace.get(id(p), p) for p in g["params"]]
        new_groups.append({**g, "params": [p for p in params if p is not None]})
    return new_groups
