"""What each training-loop optimisation gives: steady-state train examples/s of MiniLM on SST-2.

    python bench/ablation.py                 # 2 threads, then 1 thread (~6 min on 2 cores)
    python bench/ablation.py --threads 2 --batches 30 --repeats 1
    python bench/ablation.py --device cuda --threads 4 --only 0 5   # stand-ins off vs all on, on a GPU

Runs one epoch's batches (2,000 sentences, batch 32, length-bucketed, bf16 autocast where the CPU
runs it fast, else fp32) through the
same step as ``train.train_and_evaluate`` (forward, backward, clip, AdamW), adding one change at a
time, variants interleaved and the best of ``--repeats`` kept so a busy neighbour hurts less.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from llrd_search.engine.fastpath import FastPath

OFF = FastPath.off()
# name -> (fastpath options, word embeddings frozen); each row adds one change to the one above.
VARIANTS = {
    "baseline: foreach AdamW, bucketing (bf16 autocast where fast)": (OFF, False),
    "+ fused AdamW": (FastPath(vocab_rows=False, numpy_dropout=False, bf16_attention=False, fused_qkv=False), False),
    "+ train-vocabulary embedding rows (exact)": (FastPath(numpy_dropout=False, bf16_attention=False, fused_qkv=False), False),
    "+ numpy dropout masks": (FastPath(bf16_attention=False, fused_qkv=False), False),
    "+ bf16 attention with numpy dropout": (FastPath(fused_qkv=False), False),
    "+ fused q/k/v projection (all on: the default)": (FastPath(), False),
    "(for scale) word embeddings frozen, not exact": (FastPath(), True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="*", default=[2, 1])
    p.add_argument("--batches", type=int, default=63, help="batches per measurement (63 = one epoch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--accuracy-seeds", type=int, default=0, help="also train full trials, all stand-ins on vs off, for these seeds")
    p.add_argument("--only", nargs="*", type=int, help="run only these rows of the table (0-based)")
    p.add_argument("--profile", action="store_true", help="also print where a step's time goes (torch profiler, all stand-ins on)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the CPU has AMX/AVX512-BF16, else fp32 (as llrd-search's train.precision)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (cuda: the first visible GPU; bench/gpu.sh)")
    args = p.parse_args()

    from compare_hf import cpu_name  # bench/ is on sys.path when this script runs

    from llrd_search.engine import train as tr
    from llrd_search.engine.fastpath import fast_path
    from llrd_search.engine.objective import Objective
    from llrd_search.engine.param_groups import build_param_groups
    from llrd_search.spec import parse_spec

    spec = parse_spec({
        "study": {"name": "ablation", "n_trials": 1},
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 128},
        "data": {"path": str(Path(__file__).resolve().parents[1] / "studies" / "data" / "sst2"), "train_limit": 2000},
        "train": {"epochs": 1, "batch_size": 32},
        "space": {"base_lr": [1e-4], "head_lr": [1e-3], "decay": [0.9]},
    })
    objective = Objective(spec)
    task = objective.task
    order = tr.batch_order(task.train.lengths, 32, np.random.default_rng(0), True)[: args.batches]
    device = torch.device(args.device)
    batches = [{k: v.to(device) for k, v in task.train.batch(idx, objective.pad_id).items()} for idx in order]
    dtype = tr.pick_precision(args.precision, device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU: {cpu_name()}"
    print(f"precision: {'bf16 autocast' if dtype else 'fp32'}; {where}")

    def sync() -> None:  # CUDA runs asynchronously: time only what has finished
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(fast: FastPath, freeze: bool, profile: bool = False) -> float:
        model = tr.fresh_model(objective.template, 0).to(device).train()
        groups = build_param_groups(model, base_lr=1e-4, decay=0.9, head_lr=1e-3, weight_decay=0.01)
        if freeze:
            frozen = model.get_input_embeddings().weight.requires_grad_(False)
            groups = [{**g, "params": [q for q in g["params"] if q is not frozen]} for g in groups]
        examples, t0 = 0, time.perf_counter()
        prof = None
        with fast_path(model, groups, fast, token_ids=task.train.ids, seed=0, device=device) as fast_run:
            for i, batch in enumerate(batches):
                if i == 3:  # the first steps pay one-off costs (kernel selection, allocations)
                    sync()
                    examples, t0 = 0, time.perf_counter()
                    if profile:
                        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                        prof.__enter__()
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(fast_run.params, 1.0, foreach=True)
                fast_run.step()
                fast_run.optimizer.zero_grad(set_to_none=True)
                examples += len(batch["labels"])
            sync()
            wall = time.perf_counter() - t0
            rate = examples / wall
        if prof is not None:
            prof.__exit__(None, None, None)
            print_profile(prof, wall, len(batches) - 3, examples)
        return rate

    for threads in args.threads:
        torch.set_num_threads(threads)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (fast, freeze) in [v for i, v in enumerate(VARIANTS.items()) if args.only is None or i in args.only]:
                best[name] = max(best.get(name, 0.0), run(fast, freeze))
        base = next(iter(best.values()))
        print(f"\n{threads} thread(s), {len(batches)} batches, load {Path('/proc/loadavg').read_text().split()[0]}")
        print("| change | train examples/s | vs baseline |\n|---|---:|---:|")
        for name, rate in best.items():
            print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")
        if args.profile:
            run(FastPath(), False, profile=True)
    if args.accuracy_seeds:
        accuracy(objective, args.accuracy_seeds)


CATEGORIES = {
    "matmul (mm, addmm, bmm, attention)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "dtype casts (autocast, attention softmax)": ("aten::copy_",),
    "AdamW (fused)": ("aten::_fused_adamw_", "Optimizer.step#AdamW.step"),
    "gradient norm (clipping)": ("aten::linalg_vector_norm",),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "other elementwise (dropout, residual, scaling, masks)": ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::ge", "aten::where",
                                                            "aten::masked_fill_", "aten::sum", "aten::fill_", "aten::div_", "aten::index_select"),
}


def print_profile(prof, wall: float, steps: int, examples: int) -> None:
    """Self time per category, per step, against the wall time (the rest: framework, numpy, Python)."""
    totals = {name: 0.0 for name in CATEGORIES}
    all_ops = 0.0
    for e in prof.key_averages():
        all_ops += e.self_cpu_time_total
        for name, ops in CATEGORIES.items():
            if e.key in ops:
                totals[name] += e.self_cpu_time_total
    threads = torch.get_num_threads()
    ms = 1000 * wall / steps
    print(f"\nwhere a step goes: {ms:.0f} ms per step of 32 (profiled, {examples / wall:.0f} examples/s, {threads} thread(s))")
    print("| part | ms per step | share |\n|---|---:|---:|")
    for name, t in [*totals.items(), ("everything else in torch ops (allocation, views, autograd)", all_ops - sum(totals.values()))]:
        part = t / 1000 / steps  # the profiler times an op once, however many threads run it
        print(f"| {name} | {part:.1f} | {100 * part / ms:.0f} % |")
    rest = ms - all_ops / 1000 / steps
    print(f"| outside torch ops (Python, numpy dropout masks, profiler) | {rest:.1f} | {100 * rest / ms:.0f} % |")


def accuracy(objective, seeds: int) -> None:
    """Full trials of the benchmark's fixed config with every stand-in on vs off: same seeds."""
    from llrd_search.engine import train as tr
    from llrd_search.engine.param_groups import build_param_groups

    off = replace(FastPath.off(), fused_adamw=True)  # both arms step fused AdamW, as when docs/performance.md was measured
    print(f"\nfixed config base_lr 1e-4, head_lr 1e-3, decay 0.9; final validation accuracy, seeds 0..{seeds - 1}")
    for label, fast in (("stand-ins on", FastPath()), ("stand-ins off", off)):
        accs = []
        for seed in range(seeds):
            model = tr.fresh_model(objective.template, seed)
            groups = build_param_groups(model, base_lr=1e-4, decay=0.9, head_lr=1e-3, weight_decay=0.01)
            result = tr.train_and_evaluate(model, objective.task, groups, objective.spec.train, seed=seed, pad_id=objective.pad_id,
                                           device=objective.device, dtype=objective.dtype, fast=fast)
            accs.append(result.evals[-1][1])
        print(f"{label}: mean {np.mean(accs):.4f} ± {np.std(accs):.4f} {[round(a, 4) for a in accs]}")


if __name__ == "__main__":
    main()
