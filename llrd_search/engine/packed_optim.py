"""AdamW for packed trials: a learning rate per copy *and* per LLRD group, clipping per copy.

Every stacked parameter ``[K, ...]`` of :mod:`llrd_search.engine.packed_model` belongs to one LLRD
group (the group its unpacked twin has in :func:`~llrd_search.engine.param_groups.build_param_groups`,
so the layer rules live in one place) and copy k updates it at ``lr[k] = copy k's group LR x copy k's
schedule multiplier``. Each copy has its own step count (bias correction) and its own gradient norm:
the update equals ``torch.optim.AdamW`` + ``clip_grad_norm_`` of the unpacked loop to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedAdamW:
    """``params``: name -> stacked parameter; ``group_of``: name -> LLRD group name; ``weight_decay``:
    group name -> its weight decay (0 for the ``.no_decay`` halves); ``lrs``: one dict group -> LR per copy."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        group_of: dict[str, str],
        weight_decay: dict[str, float],
        lrs: list[dict[str, float]],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.names = list(params)
        self.groups = list(weight_decay)
        self.group_index = [self.groups.index(group_of[n]) for n in self.names]
        self.weight_decay = [weight_decay[g] for g in self.groups]
        self.betas, self.eps = betas, eps
        self.bind(params)
        device = self.params[0].device
        self.base_lr = torch.tensor([[lr[g] for g in self.groups] for lr in lrs], dtype=torch.float64, device=device)  # [K, G]
        self.steps = torch.zeros(len(lrs), dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lr = self.base_lr.clone()  # the LRs of the last step, [K, G]

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """Point at ``params`` again (after the model's stacked parameters were replaced)."""
        self.params = [params[n] for n in self.names]

    @property
    def k(self) -> int:
        return self.base_lr.shape[0]

    def lr_table(self, multipliers: list[float] | torch.Tensor) -> list[dict[str, float]]:
        """Per copy, group -> the LR a step with these schedule multipliers applies."""
        lr = self.base_lr * torch.as_tensor(multipliers, dtype=torch.float64, device=self.base_lr.device).unsqueeze(1)
        return [dict(zip(self.groups, row, strict=True)) for row in lr.tolist()]

    def reset(self, k: int, lrs: dict[str, float]) -> None:
        """Slot ``k`` holds a new trial: its LRs, step 0, empty moments."""
        self.base_lr[k] = torch.tensor([lrs[g] for g in self.groups], dtype=torch.float64)
        self.steps[k] = 0
        for m, v in zip(self.exp_avg, self.exp_avg_sq, strict=True):
            m[k].zero_()
            v[k].zero_()

    def keep(self, keep: list[int], params: dict[str, nn.Parameter]) -> None:
        """Only the copies ``keep`` remain (in that order); ``params`` are the sliced parameters."""
        index = torch.as_tensor(keep, dtype=torch.long, device=self.base_lr.device)
        self.base_lr, self.steps, self.lr = self.base_lr[index], self.steps[index], self.lr[index]
        self.exp_avg = [m.index_select(0, index) for m in self.exp_avg]
        self.exp_avg_sq = [v.index_select(0, index) for v in self.exp_avg_sq]
        self.bind(params)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Each copy's gradients scaled as ``clip_grad_norm_`` scales an unpacked model's; returns the K norms."""
        grads = [p.grad for p in self.params if p.grad is not None]
        sq = torch.stack([g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in grads]).sum(0)
        norms = sq.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1))))
        return norms

    @torch.no_grad()
    def step(self, multipliers: list[float]) -> None:
        """One AdamW step; copy k's LRs are its base LRs times ``multipliers[k]``."""
        beta1, beta2 = self.betas
        mult = torch.as_tensor(multipliers, dtype=torch.float64, device=self.base_lr.device)
        self.steps += 1
        self.lr = self.base_lr * mult.unsqueeze(1)
        bias1 = 1 - beta1**self.steps
        bias2_sqrt = (1 - beta2**self.steps).sqrt()
        step_size = (self.lr / bias1.unsqueeze(1)).float()  # [K, G]
        decay = (1 - self.lr * torch.tensor(self.weight_decay, dtype=torch.float64, device=mult.device)).float()
        bias2_sqrt = bias2_sqrt.float()
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, self.group_index, strict=True):
            grad = p.grad
            if grad is None:
                continue
            shape = (-1, *([1] * (p.ndim - 1)))
            if self.weight_decay[g]:
                p.mul_(decay[:, g].reshape(shape))
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt.reshape(shape)).add_(self.eps)
            p.sub_(m / denom * step_size[:, g].reshape(shape))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
