"""What packing trials does on a CPU: trials/hour of MiniLM on an SST-2 slice, pack = 1, 2, 4.

    python bench/pack_cpu.py                       # 4 trials per row, 2 threads (~3 min on 2 cores)
    python bench/pack_cpu.py --trials 8 --threads 1

Every row trains the same ``--trials`` trials (same seeds and LRs, one epoch of ``--train``
sentences, batch 32, one evaluation on ``--validation`` sentences) and times them end to end:
``pack = 1`` runs them one after another through ``train_and_evaluate`` (with the fast path, the
CPU default, and without it, the like-for-like baseline: the packed loop has no stand-ins);
``pack = K`` through ``train_packed``, K at a time, freed slots refilled. Precision as ``auto``.
Besides wall time it reports this process's CPU time: on a machine shared with other jobs the wall
time swings with their load, CPU seconds much less (trials per CPU-hour compare the rows there).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

LRS = [(1e-4, 0.9, 1e-3), (5e-5, 0.8, 2e-3), (2e-4, 0.95, 5e-4), (8e-5, 0.7, 1e-3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", type=int, default=320, help="training sentences per trial (one epoch)")
    p.add_argument("--validation", type=int, default=200)
    p.add_argument("--packs", type=int, nargs="*", default=[2, 4])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from compare_hf import cpu_name  # bench/ is on sys.path when this script runs

    from llrd_search.engine.model import fresh_model
    from llrd_search.engine.objective import Objective
    from llrd_search.engine.packed import PackJob, train_packed
    from llrd_search.engine.param_groups import build_param_groups
    from llrd_search.engine.train import train_and_evaluate
    from llrd_search.spec import parse_spec

    spec = parse_spec({
        "study": {"name": "pack-cpu", "n_trials": args.trials},
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 128},
        "data": {"path": str(Path(__file__).resolve().parents[1] / "studies" / "data" / "sst2"), "train_limit": args.train,
                 "validation_limit": args.validation},
        "train": {"epochs": 1, "batch_size": 32, "evals_per_epoch": 1},
    })
    objective = Objective(spec)
    cfg = spec.train
    print(f"CPU: {cpu_name()}; {args.threads} thread(s); precision: {objective.precision_name}; {args.trials} trials of "
          f"{len(objective.task.train)} sentences (1 epoch, batch 32) + 1 evaluation on {len(objective.task.validation)}")

    def job(i: int) -> PackJob:
        model = fresh_model(objective.template, i)
        base_lr, decay, head_lr = LRS[i % len(LRS)]
        return PackJob(model, build_param_groups(model, base_lr=base_lr, decay=decay, head_lr=head_lr, weight_decay=0.01), seed=i)

    def unpacked(fast: bool) -> list[float]:
        scores = []
        for i in range(args.trials):
            j = job(i)
            result = train_and_evaluate(j.model, objective.task, j.groups, cfg.model_copy(update={"fast_path": fast}), seed=i,
                                        pad_id=objective.pad_id, device=objective.device, dtype=objective.dtype)
            scores.append(result.best_score)
        return scores

    def packed(k: int) -> list[float]:
        ends: list = []
        queue = [job(i) for i in range(k, args.trials)]
        train_packed([job(i) for i in range(min(k, args.trials))], objective.task, cfg, next_job=lambda: queue.pop(0) if queue else None,
                     on_end=ends.append, pad_id=objective.pad_id, device=objective.device, dtype=objective.dtype)
        return [e.result.best_score for e in sorted(ends, key=lambda e: e.job.seed)]

    rows = [("pack = 1, fast_path on (the CPU default)", lambda: unpacked(True)), ("pack = 1, fast_path off", lambda: unpacked(False))]
    rows += [(f"pack = {k}", lambda k=k: packed(k)) for k in args.packs]
    print("| mode | wall s | trials/hour | CPU s | trials per CPU-hour | vs pack = 1 (CPU time) | accuracies |\n|---|---:|---:|---:|---:|---:|---|")
    base = None
    for name, run in rows:
        t0, c0 = time.perf_counter(), time.process_time()
        scores = run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rate = args.trials / cpu * 3600
        base = base or rate
        print(f"| {name} | {wall:.1f} | {args.trials / wall * 3600:.0f} | {cpu:.1f} | {rate:.0f} | {rate / base:.2f}x | "
              f"{', '.join(f'{s:.3f}' for s in scores)} |", flush=True)
    print(f"load average at the end: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
