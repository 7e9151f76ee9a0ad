"""AdamW for packed trials: a learning rate per copy *and* per LLRD group, clipping per copy.

Every stacked parameter ``[K, ...]`` of :mod:`llrd_search.engine.packed_model` belongs to one LLRD
group (the group its unpacked twin has in :func:`~llrd_search.engine.param_groups.build_param_groups`,
so the layer rules live in one place) and copy k updates it at ``lr[k] = copy k's group LR x copy k's
schedule multiplier``. Each copy has its own step count (bias correction) and its own gradient norm:
the update equals ``torch.optim.AdamW`` + ``clip_grad_norm_`` of the unpacked loop to float rounding.

Few launches, no host syncs: the update is ``torch._fused_adamw_`` (the kernel of ``AdamW(fused=True)``)
once per (copy, group) over per-copy views of the stacked tensors, with that pair's LR read from a
device tensor; the clipping norms are one ``_foreach_norm`` over every copy's views and the scaling
one ``_foreach_mul_`` per copy by a device scalar. LRs, schedule multipliers (the linear warmup/decay
of :func:`~llrd_search.engine.train.linear_schedule`, computed on the device from each copy's step
count) and step counts live on the device and are updated in place, so a step reads nothing from the
host and builds no tensor there. The views point into the gradients, so gradients are kept between
steps and zeroed in place (:meth:`zero_grad`) rather than freed; a parameter with no gradient at the
first step (one the loss never reaches) is left out, as torch's optimizers skip it.
"""

from __future__ import annotations

import math

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
        self.weight_decay = [float(weight_decay[g]) for g in self.groups]  # a kernel argument, not a tensor
        self.betas, self.eps = betas, eps
        self.params = [params[n] for n in self.names]
        device = self.params[0].device
        k = len(lrs)
        self.base_lr = torch.tensor([[lr[g] for g in self.groups] for lr in lrs], dtype=torch.float64, device=device)  # [K, G]
        self.lr = self.base_lr.clone()  # the LRs of the last step, [K, G]
        self.steps = torch.zeros(k, dtype=torch.float32, device=device)  # the fused kernel's state_steps
        self.mult = torch.ones(k, dtype=torch.float64, device=device)
        # The schedule per copy (set_schedule): without one a copy steps at its base LRs.
        self.warmup = torch.zeros(k, dtype=torch.float64, device=device)
        self.total = torch.full((k,), math.inf, dtype=torch.float64, device=device)
        self.coef = torch.ones(k, dtype=torch.float32, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self._views: _Views | None = None

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """Point at ``params`` again (after the model's stacked parameters were replaced)."""
        self.params = [params[n] for n in self.names]
        self._views = None

    @property
    def k(self) -> int:
        return self.base_lr.shape[0]

    def lr_table(self, multipliers: list[float] | torch.Tensor) -> list[dict[str, float]]:
        """Per copy, group -> the LR a step with these schedule multipliers applies (a host read: tests, logs)."""
        lr = self.base_lr * torch.as_tensor(multipliers, dtype=torch.float64, device=self.base_lr.device).unsqueeze(1)
        return [dict(zip(self.groups, row, strict=True)) for row in lr.tolist()]

    def set_schedule(self, k: int, total_steps: int, warmup_ratio: float) -> None:
        """Copy ``k`` follows ``linear_schedule(total_steps, warmup_ratio)`` (set when its trial starts)."""
        self.total[k] = float(total_steps)
        self.warmup[k] = float(math.ceil(total_steps * warmup_ratio))

    def reset(self, k: int, lrs: dict[str, float]) -> None:
        """Slot ``k`` holds a new trial: its LRs, step 0, empty moments (at a slot's end, not in a step)."""
        self.base_lr[k] = torch.tensor([lrs[g] for g in self.groups], dtype=torch.float64)
        self.steps[k] = 0
        torch._foreach_zero_([m[k] for m in self.exp_avg] + [v[k] for v in self.exp_avg_sq])

    def keep(self, keep: list[int], params: dict[str, nn.Parameter]) -> None:
        """Only the copies ``keep`` remain (in that order); ``params`` are the sliced parameters."""
        index = torch.as_tensor(keep, dtype=torch.long, device=self.base_lr.device)
        for attr in ("base_lr", "lr", "steps", "mult", "warmup", "total", "coef"):
            setattr(self, attr, getattr(self, attr)[index])
        self.exp_avg = [m.index_select(0, index) for m in self.exp_avg]
        self.exp_avg_sq = [v.index_select(0, index) for v in self.exp_avg_sq]
        self.bind(params)

    def views(self) -> _Views:
        """The per-copy views the kernels take, rebuilt when a gradient or parameter was replaced."""
        grads = [p.grad for p in self.params]
        if self._views is None or not self._views.matches(grads):
            self._views = _Views(self, grads)
        return self._views

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Each copy's gradients scaled as ``clip_grad_norm_`` scales an unpacked model's; returns the K norms."""
        views = self.views()
        if not views.grads:
            return torch.zeros(self.k, device=self.coef.device)
        norms = torch.stack(torch._foreach_norm(views.grads)).reshape(self.k, -1)  # [K, P]
        total = torch.linalg.vector_norm(norms, dim=1)
        torch.clamp(max_norm / (total + 1e-6), max=1.0, out=self.coef)
        for k, grads in enumerate(views.copy_grads):
            torch._foreach_mul_(grads, views.coef[k])
        return total

    @torch.no_grad()
    def schedule(self) -> torch.Tensor:
        """The K schedule multipliers of the coming step, computed on the device from each copy's step
        count as :func:`~llrd_search.engine.train.linear_schedule` does on the host (same float64 math)."""
        s = self.steps.double()
        warm = (s + 1) / (self.warmup + 1)
        decay = ((self.total - s) / (self.total - self.warmup).clamp(min=1)).clamp(min=0)
        decay = torch.where(torch.isinf(self.total), torch.ones_like(decay), decay)  # no schedule set: 1
        torch.where(s < self.warmup, warm, decay, out=self.mult)
        return self.mult

    @torch.no_grad()
    def step(self, multipliers: list[float] | torch.Tensor | None = None) -> None:
        """One AdamW step; copy k's LRs are its base LRs times ``multipliers[k]`` (None: the device
        schedule of :meth:`schedule`; a list is copied to the device: for tests and benchmarks)."""
        if multipliers is None:
            multipliers = self.schedule()
        elif not isinstance(multipliers, torch.Tensor):
            multipliers = torch.as_tensor(multipliers, dtype=torch.float64, device=self.base_lr.device)
        torch.mul(self.base_lr, multipliers.unsqueeze(1), out=self.lr)
        self.steps.add_(1)
        beta1, beta2 = self.betas
        views = self.views()
        for (k, g), (params, grads, ms, vs) in views.pairs.items():
            torch._fused_adamw_(
                params, grads, ms, vs, [], [views.steps[k]] * len(params), lr=views.lr[k][g], beta1=beta1, beta2=beta2,
                weight_decay=self.weight_decay[g], eps=self.eps, amsgrad=False, maximize=False,
            )

    def zero_grad(self) -> None:
        """Zero the gradients in place (the views point into them); before the first step, nothing to zero."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)


class _Views:
    """Per-copy views of the stacked parameters, gradients and moments, grouped per (copy, group), and
    of the device scalars (step count, LR, clip coefficient) each kernel call reads. Built once, not
    per step: every view is an operator call of its own."""

    def __init__(self, opt: PackedAdamW, grads: list[torch.Tensor | None]):
        self.sources = list(grads)
        self.param_ids = [id(p) for p in opt.params]
        live = [i for i, g in enumerate(grads) if g is not None]
        self.copy_grads = [[grads[i][k] for i in live] for k in range(opt.k)]
        self.grads = [g for per_copy in self.copy_grads for g in per_copy]  # copy-major: norms reshape to [K, P]
        self.steps = [opt.steps[k] for k in range(opt.k)]
        self.lr = [[opt.lr[k, g] for g in range(len(opt.groups))] for k in range(opt.k)]
        self.coef = [opt.coef[k] for k in range(opt.k)]
        self.pairs: dict[tuple[int, int], tuple[list, list, list, list]] = {}
        for k in range(opt.k):
            for n, i in enumerate(live):
                lists = self.pairs.setdefault((k, opt.group_index[i]), ([], [], [], []))
                for out, value in zip(lists, (opt.params[i][k], self.copy_grads[k][n], opt.exp_avg[i][k], opt.exp_avg_sq[i][k]), strict=True):
                    out.append(value)
        self._opt = opt
        self._state = (opt.lr, opt.steps, opt.coef, opt.exp_avg)

    def matches(self, grads: list[torch.Tensor | None]) -> bool:
        opt = self._opt
        return (
            len(grads) == len(self.sources)
            and all(a is b for a, b in zip(grads, self.sources, strict=True))
            and [id(p) for p in opt.params] == self.param_ids
            and self._state[0] is opt.lr and self._state[1] is opt.steps and self._state[2] is opt.coef and self._state[3] is opt.exp_avg
        )
