"""Workers over every GPU of one machine: how many per GPU, which GPU each runs on, and the line
that says so.

On a CUDA machine ``run`` and ``confirm`` start K workers on each visible GPU, each child pinned
with ``CUDA_VISIBLE_DEVICES`` and the CPU threads split between all of them. K (``--workers-per-gpu
auto``) is what the free memory of the smallest GPU holds of :func:`engine.memory.trial_memory_estimate`.
Everything here but :func:`cuda_gpus` is arithmetic on plain values, tested without a GPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llrd_search.engine.memory import GPU_SHARE_ENV, gib
from llrd_search.exceptions import LLRDSearchError

# One process's CUDA context, cuBLAS workspace and allocator slack: counted once per worker.
CUDA_CONTEXT_BYTES = 512 * 1024**2
# Of a GPU's free memory, what auto plans with: fragmentation and the odd longer batch need the rest.
AUTO_HEADROOM = 0.9
# More workers per GPU than this time-slice one GPU without training faster (docs/distributed.md:
# CUDA MPS) and TPE learns less from many trials at once.
MAX_WORKERS_PER_GPU = 4


@dataclass(frozen=True)
class Gpu:
    id: str  # the CUDA_VISIBLE_DEVICES entry a child is pinned with ("3", or a GPU-/MIG- UUID)
    name: str
    free: int  # bytes
    total: int


def workers_per_gpu(per_trial_bytes: int, free_bytes: int, *, cap: int = MAX_WORKERS_PER_GPU, measured: bool = False,
                    pack: int = 1) -> tuple[int, str]:
    """How many workers one GPU with ``free_bytes`` free holds when a trial needs ``per_trial_bytes``
    and a worker trains ``pack`` of them at once (``[train] pack``), each worker also holding its
    CUDA context (:data:`CUDA_CONTEXT_BYTES`): at least 1 and at most ``cap``; and why, for the
    start line (``measured``: the bytes are a finished trial's peak, not the estimate)."""
    per_worker = pack * per_trial_bytes + CUDA_CONTEXT_BYTES
    fits = int(free_bytes * AUTO_HEADROOM) // per_worker
    packs = f" x {pack} packed" if pack > 1 else ""
    why = f"auto: ~{gib(per_trial_bytes)} GiB per trial{' (measured)' * measured}{packs}, {gib(free_bytes)} GiB free on the smallest GPU"
    if fits < 1:
        return 1, f"{why}: may not fit, see [train] batch_size"
    if fits > cap:
        return cap, f"{why}; at most {cap} per GPU"
    return fits, why


def visible_gpu_ids(count: int, env: Mapping[str, str] | None = None) -> list[str]:
    """The ids of the ``count`` GPUs this process sees, as a child must be pinned to them: the
    entries of an already-set ``CUDA_VISIBLE_DEVICES`` (a job scheduler's share of the machine:
    device 0 of this process is its first entry, not physical GPU 0), else ``0 .. count-1``."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        return [str(i) for i in range(count)]
    # CUDA stops at the first invalid entry, so torch's count can be shorter than the list.
    return [e.strip() for e in raw.split(",") if e.strip()][:count]


@dataclass(frozen=True)
class Slot:
    """One worker: its index, the GPU it runs on, and what its child process's environment adds
    (nothing for worker 0 when it runs in the parent, which already sits on the first GPU)."""

    index: int
    gpu: str
    in_process: bool
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuPlan:
    gpus: list[str]
    slots: list[Slot]
    threads: int
    reason: str  # why this many: "auto: ...", "--workers-per-gpu 2", "--workers 5"

    @property
    def workers(self) -> int:
        return len(self.slots)

    def counts(self) -> list[int]:
        """Workers on each GPU, in the order of :attr:`gpus`."""
        return [sum(s.gpu == g for s in self.slots) for g in self.gpus]

    def share_here(self) -> None:
        """Tell this process (worker 0, when it runs here) how many workers share its GPU: its
        ``pack = "auto"`` then takes its share of the free memory, as the children do from their env."""
        if self.slots and self.slots[0].in_process:
            os.environ.update(self.slots[0].env)

    def line(self) -> str:
        """The start line: ``8 workers: 2 per GPU on 4 GPUs (auto: ...), 2 threads each``."""
        n, g, counts = self.workers, len(self.gpus), self.counts()
        each = f"{counts[0]} per GPU" if len(set(counts)) == 1 else "/".join(map(str, counts)) + " per GPU"
        return (f"{n} worker{'s' * (n > 1)}: {each} on {g} GPU{'s' * (g > 1)} ({self.reason}), "
                f"{self.threads} thread{'s' * (self.threads > 1)} each")


def gpu_plan(
    gpus: Sequence[str],
    *,
    per_gpu: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    cores: int,
    reason: str = "",
    in_process: bool = True,
) -> GpuPlan:
    """Place ``per_gpu`` workers on each of ``gpus`` (or ``workers`` in all, round-robin: worker i
    on ``gpus[i % len(gpus)]``). Worker 0 runs in the parent when ``in_process``: the parent holds
    the loaded model on its own device 0, which is ``gpus[0]``, so it is pinned nowhere and the
    children fill the rest. Threads: ``threads``, else ``cores // workers`` (at least 1)."""
    if not gpus:
        raise LLRDSearchError("no GPU to plan workers on")
    if (per_gpu is None) == (workers is None):
        raise LLRDSearchError("give exactly one of --workers (in all) and --workers-per-gpu (on each GPU)")
    total = workers if workers is not None else per_gpu * len(gpus)  # type: ignore[operator]
    if total < 1:
        raise LLRDSearchError(f"--workers: must be >= 1 (got {total})")
    gpus = list(gpus[: total]) if workers is not None and total < len(gpus) else list(gpus)
    threads = threads or max(1, cores // total)
    placed = [gpus[i % len(gpus)] for i in range(total)]
    slots = []
    for i, gpu in enumerate(placed):
        parent = in_process and i == 0
        # Each worker's pack = "auto" sizes itself by its share of its GPU's free memory: workers
        # started together all see the whole of it free (engine/packed_trials.resolve_pack).
        share = {GPU_SHARE_ENV: str(placed.count(gpu))}
        env = share if parent else {"CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": str(threads), **share}
        slots.append(Slot(i, gpu, parent, env))
    return GpuPlan(gpus, slots, threads, reason or (f"--workers {workers}" if workers is not None else f"--workers-per-gpu {per_gpu}"))


def choose_plan(
    gpus: Sequence[Gpu],
    *,
    workers: int | None,
    per_gpu: int | str | None,
    threads: int | None,
    per_trial_bytes: int | None,
    remaining: int,
    cores: int,
    in_process: bool = True,
    measured: bool = False,
    pack: int | str = 1,
    pack_blocked: str | None = None,
) -> GpuPlan:
    """The plan ``run``/``confirm`` use: ``workers`` (``--workers`` or ``$LLRD_SEARCH_WORKERS``, in
    all, round-robin), else ``--workers-per-gpu N``, else auto (:func:`workers_per_gpu` on the
    smallest free memory, fewer when fewer trials are left; 1 per GPU without an estimate, and with
    ``[train] pack = "auto"``, which fills each GPU with packed trials inside one worker, unless
    ``pack_blocked`` says why this model cannot pack: then as many unpacked workers as fit)."""
    ids = [g.id for g in gpus]
    if workers is not None and per_gpu not in (None, "auto"):
        raise LLRDSearchError("give --workers (in all) or --workers-per-gpu (on each GPU), not both")
    if workers is not None:
        return gpu_plan(ids, workers=workers, threads=threads, cores=cores, in_process=in_process)
    if isinstance(per_gpu, int):
        return gpu_plan(ids, per_gpu=per_gpu, threads=threads, cores=cores, in_process=in_process)
    if per_trial_bytes is None:
        k, why = 1, "auto: 1 per GPU, your own objective's memory is unknown"
    elif pack == "auto" and pack_blocked is None:
        k, why = 1, 'auto: 1 per GPU, [train] pack = "auto" fills it with packed trials'
    elif pack == "auto":
        k, why = workers_per_gpu(per_trial_bytes, min(g.free for g in gpus), measured=measured)
        why = f'{why}; [train] pack = "auto" cannot pack ({pack_blocked}): unpacked workers instead'
    else:
        k, why = workers_per_gpu(per_trial_bytes, min(g.free for g in gpus), measured=measured, pack=int(pack))
    if k * len(ids) > max(1, remaining):  # a worker with nothing to do only costs its start-up
        total = max(1, remaining)
        return gpu_plan(ids, workers=total, threads=threads, cores=cores, in_process=in_process,
                        reason=f"{why}; {remaining} trial{'s' * (remaining != 1)} left")
    return gpu_plan(ids, per_gpu=k, threads=threads, cores=cores, in_process=in_process, reason=why)


def parse_workers_per_gpu(value: str) -> int | str:
    """``--workers-per-gpu``: a whole number >= 1 or ``auto``."""
    value = value.strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit() or int(value) < 1:
        raise LLRDSearchError(f"--workers-per-gpu: must be a whole number >= 1 or 'auto' (got '{value}')")
    return int(value)


def cuda_gpus(env: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs this process sees, with their free memory; [] without CUDA. The memory comes from
    NVML (study/nvml.py), which opens no CUDA context; only where NVML cannot answer is each GPU
    asked through CUDA, which starts a context on it in this process (~0.3-0.5 GiB held for the
    run: the headroom of auto covers it)."""
    import torch

    from llrd_search.study.nvml import nvml_memory, nvml_uuid

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    ids = visible_gpu_ids(n, env)
    names = [torch.cuda.get_device_name(i) for i in range(len(ids))]
    try:  # device properties need no context; mem_get_info does
        uuids = [nvml_uuid(torch.cuda.get_device_properties(i).uuid, gpu_id) for i, gpu_id in enumerate(ids)]
    except Exception:  # a torch without the uuid property, or one that cannot say
        uuids = None
    memory = nvml_memory(uuids) if uuids is not None else None
    if memory is None:
        memory = [tuple(int(b) for b in torch.cuda.mem_get_info(i)) for i in range(len(ids))]
    return [Gpu(gpu_id, name, free, total) for gpu_id, name, (free, total) in zip(ids, names, memory, strict=True)]


def objective_trial_bytes(objective: Any) -> int | None:
    """:func:`trial_memory_estimate` for a loaded built-in objective; None for a user's own."""
    from llrd_search.engine.memory import trial_memory_estimate

    template = getattr(objective, "template", None)
    if template is None:
        return None
    model, spec = template.model, objective.spec
    n_params = sum(p.numel() for p in model.parameters())
    return trial_memory_estimate(model.config, n_params, spec.train.batch_size, spec.model.max_length, objective.dtype,
                                 grad_accum=spec.train.grad_accum, gradient_checkpointing=spec.train.gradient_checkpointing)


def spec_trial_bytes(spec: Any) -> int | None:
    """The same from a study's spec alone, without loading the model (``confirm``, whose workers
    load it themselves): the config's shape and :func:`param_count_estimate`."""
    from llrd_search.engine.memory import param_count_estimate, trial_memory_estimate

    if spec.train.objective:
        return None
    try:
        from transformers import AutoConfig

        from llrd_search.engine.model import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(spec.model.name), trust_remote_code=spec.model.trust_remote_code)
        n_params = param_count_estimate(config)
    except Exception:  # a config without the BERT-like fields: plan one per GPU rather than fail
        return None
    import torch

    from llrd_search.engine.train import pick_precision

    dtype = pick_precision(spec.train.precision, torch.device("cuda"))
    return trial_memory_estimate(config, n_params, spec.train.batch_size, spec.model.max_length, dtype,
                                 grad_accum=spec.train.grad_accum, gradient_checkpointing=spec.train.gradient_checkpointing)


def plan_run(objective: Any, *, user_objective: bool, workers: int | None, per_gpu: int | str | None, threads: int | None, remaining: int,
             measured: int | None = None) -> GpuPlan | None:
    """The GPU plan of ``run``, or None to plan on the CPU as before: the built-in objective on a
    CUDA device always plans, by ``measured`` (a resumed study's largest trial peak) or else the
    estimate; a user's own objective (whose device we do not know) only when asked for more than
    one worker (``--workers``, ``$LLRD_SEARCH_WORKERS``, ``--workers-per-gpu N``), so its workers
    do not all land on GPU 0."""
    from llrd_search.study.local_workers import usable_cores, workers_from_env

    # $LLRD_SEARCH_WORKERS is a default: an explicit --workers-per-gpu N wins over it.
    requested = workers or (None if isinstance(per_gpu, int) else workers_from_env())
    if user_objective:
        if not (requested or isinstance(per_gpu, int)):
            return None
        per_trial = None
    elif getattr(getattr(objective, "device", None), "type", None) != "cuda":
        return None
    else:
        per_trial = measured or objective_trial_bytes(objective)
    gpus = cuda_gpus()
    if not gpus:
        return None
    blocked = None if user_objective else pack_blocker(objective.spec, objective)
    return choose_plan(gpus, workers=requested, per_gpu=per_gpu, threads=threads, per_trial_bytes=per_trial, remaining=remaining,
                       cores=usable_cores(), measured=bool(measured) and not user_objective, pack=pack_of(objective.spec), pack_blocked=blocked)


def plan_confirm(storage: str, study: str, *, workers: int | None, per_gpu: int | str | None, threads: int | None, objective: str | None, runs: int) -> GpuPlan | None:
    """The GPU plan of ``confirm`` (``runs``: how many it queues at most), or None: no CUDA, a study
    trained on the CPU, or a user's objective without ``--workers``/``--workers-per-gpu N``. Its
    workers load the model themselves, so the estimate comes from the stored spec."""
    from llrd_search.study.local_workers import usable_cores
    from llrd_search.study.storage import opened_study, spec_of

    gpus = cuda_gpus()
    if not gpus:
        return None
    with opened_study(storage, study) as s:
        spec = spec_of(s)
    if spec.train.device == "cpu":
        return None
    user = bool(objective or spec.train.objective)
    if user and not (workers or isinstance(per_gpu, int)):
        return None
    per_trial = None if user else spec_trial_bytes(spec)
    return choose_plan(gpus, workers=workers, per_gpu=per_gpu, threads=threads, per_trial_bytes=per_trial, remaining=runs, cores=usable_cores(),
                       pack=pack_of(spec), pack_blocked=pack_blocker(spec))


def pack_of(spec: Any) -> int | str:
    """``[train] pack`` (packed trials: K trials a worker), 1 where the study file has no such key."""
    return getattr(getattr(spec, "train", None), "pack", 1)


def pack_blocker(spec: Any, objective: Any = None) -> str | None:
    """Why ``[train] pack = "auto"`` cannot pack this study's trials (the packed loop has no
    accumulation or checkpointing; the packed modules cover only some architectures, checked on
    the loaded ``objective`` when there is one), or None: it can, or pack is not "auto"."""
    train = getattr(spec, "train", None)
    if getattr(train, "pack", 1) != "auto":
        return None
    if train.grad_accum > 1:
        return f"grad_accum = {train.grad_accum}"
    if train.gradient_checkpointing:
        return "gradient_checkpointing = true"
    builtin = sys.modules.get("llrd_search.engine.objective")  # loaded whenever the objective is the built-in one
    if builtin is not None and isinstance(objective, builtin.Objective):
        from llrd_search.engine.packed_trials import check_packable

        why = check_packable(objective)
        return None if why is None else f"this model: {why}"
    return None
