"""The packed step, counted: operators dispatched and host reads, measurable on a CPU.

A launch-bound GPU step costs about one kernel launch per operator; a host read (``.item()``,
``.tolist()``, ``.cpu()``, a tensor in an ``if``) makes the host wait for the device to drain. Both
are counted here without a GPU: :class:`OpCounter` sees every aten operator the Python code
dispatches (a ``TorchDispatchMode``; a ``_foreach_*`` or ``_fused_adamw_`` call is one operator, as it
is one multi-tensor kernel on CUDA), :class:`HostReads` every ``aten::_local_scalar_dense`` and every
``tolist``/``item``/``cpu``/``numpy`` call. bench/packed_step_profile.py prints them for MiniLM;
tests/test_packed_profile.py holds the packed step to them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llrd_search.engine.packed import PackJob, pack_with_optimizer
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.engine.train import linear_schedule

SCALAR_SYNC = "aten._local_scalar_dense.default"


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class HostReads:
    """Counts scalar syncs (``_local_scalar_dense``) and the tensor methods that read values back."""

    METHODS = ("tolist", "item", "cpu", "numpy")

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._ops = OpCounter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostReads:
        for name in self.METHODS:
            original = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, original))
        self._ops.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ops.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _counted(self, name: str, original: Callable) -> Callable:
        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(tensor, *args, **kwargs)

        return method

    @property
    def scalar_syncs(self) -> int:
        return self._ops.ops[SCALAR_SYNC]

    @property
    def reads(self) -> int:
        """Every read: scalar syncs plus the counted methods (a ``.cpu()`` followed by ``.numpy()`` is one)."""
        return self.scalar_syncs + sum(self.calls.values()) - min(self.calls["cpu"], self.calls["numpy"])


def _groups(model: torch.nn.Module, seed: int) -> list[dict]:
    return build_param_groups(model, base_lr=1e-4 * (1 + seed), decay=0.9, head_lr=1e-3, weight_decay=0.01)


def optimizer_step_ops(make_model: Callable[[int], torch.nn.Module], k: int, warm: int = 2) -> dict[str, Any]:
    """Operators dispatched by one optimizer step (clipping, schedule, AdamW, zeroing): a pack of
    ``k`` copies of ``make_model(seed)`` against ``k`` unpacked steps with torch's fused AdamW and
    ``clip_grad_norm_(foreach=True)``, after ``warm`` steps (state and views are built once)."""
    jobs = []
    for seed in range(k):
        model = make_model(seed)
        jobs.append(PackJob(model=model, groups=_groups(model, seed), seed=seed))
    _model, _state, opt, _ = pack_with_optimizer(jobs, torch.device("cpu"))
    for i in range(k):
        opt.set_schedule(i, 100, 0.1)

    def packed_grads() -> None:  # kept between steps (zeroed in place): made once
        for p in opt.params:
            if p.grad is None:
                p.grad = torch.randn_like(p)

    def packed_step() -> None:
        opt.clip_grad_norm_(1.0)
        opt.step(opt.schedule())
        opt.zero_grad()

    unpacked = []
    for seed in range(k):
        model = make_model(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(_groups(model, seed), fused=True)
        unpacked.append((params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(100, 0.1))))

    def unpacked_grads() -> None:  # what each backward would leave: freed again by zero_grad
        for params, _, _ in unpacked:
            for p in params:
                p.grad = torch.randn_like(p)

    def unpacked_steps() -> None:
        for params, optimizer, scheduler in unpacked:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    counts = {}
    for name, grads, step in (("packed", packed_grads, packed_step), ("unpacked", unpacked_grads, unpacked_steps)):
        for _ in range(warm + 1):
            grads()
            if _ == warm:
                with OpCounter() as counter:
                    step()
            else:
                step()
        counts[name] = counter
    n_params = sum(1 for p in jobs[0].model.parameters() if p.requires_grad)
    return {
        "k": k,
        "param_tensors": n_params,
        "groups": len(opt.groups),
        "packed_ops": counts["packed"].total,
        "unpacked_ops": counts["unpacked"].total,
        "packed_by_op": dict(counts["packed"].ops.most_common()),
    }


def loop_reads(jobs: list[PackJob], task: Any, cfg: Any, *, check_every: int, pad_id: int = 0) -> dict[str, int]:
    """Run ``jobs`` through :func:`train_packed` on the CPU, counting its host reads, pack steps and
    evaluation passes (validation and test each count) and the steps that had one."""
    from llrd_search.engine import packed

    seen = {"steps": 0, "evaluations": 0, "eval_steps": 0}
    last_eval_step = [-1]
    evaluate = packed.evaluate_packed

    def counted(*args: Any, **kwargs: Any) -> list[float]:
        seen["evaluations"] += 1
        if last_eval_step[0] != seen["steps"]:
            seen["eval_steps"] += 1
            last_eval_step[0] = seen["steps"]
        return evaluate(*args, **kwargs)

    def on_step(_step: int, _total: int) -> None:
        seen["steps"] += 1

    packed.evaluate_packed = counted
    try:
        with HostReads() as reads:
            packed.train_packed(jobs, task, cfg, next_job=lambda: None, on_end=lambda end: None, pad_id=pad_id,
                                device=torch.device("cpu"), dtype=None, on_step=on_step, check_every=check_every)
    finally:
        packed.evaluate_packed = evaluate
    return {**seen, "check_every": check_every, "scalar_syncs": reads.scalar_syncs, "reads": reads.reads, **{f"{n}_calls": c for n, c in reads.calls.items()}}
