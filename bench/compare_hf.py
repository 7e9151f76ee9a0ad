"""llrd-search against the Hugging Face Trainer: the same LLRD search, side by side, one invocation.

    python bench/compare_hf.py --json results.json                      # the full run (~18 min on 2 cores)
    python bench/compare_hf.py --trials 4 --train-limit 1000 --seeds 2   # a quick look (~5 min)
    python bench/compare_hf.py --gpu --model minilm                      # trials per GPU-hour on one GPU
                                                                         # (bench/compare_gpu.py; --gpu --smoke on a CPU)

Both sides get the same model, data slice (stratified, written to CSV once), epochs, batch size,
max_length, search space, enqueued first points, TPE sampler and seed. Each runs in its own process,
timed from spawn, so process start, imports, model load and tokenization count. Phases:

1. matmul peak (fp32, bf16) on this machine, and model FLOPs per train example;
2. the peer (``bench/hf_peer.py``), then ours (``llrd-search run``) with one worker and with one
   single-threaded worker per core, no pruning: throughput and overhead;
3. ours with Hyperband (3 evaluations an epoch): time to reach the peer's best accuracy;
4. one fixed config, several seeds each side: accuracy must agree within 0.5 points.

Results and how to read them: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "studies" / "data" / "sst2"  # shipped in the repo (studies/data/README.md)
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SPACE = {"base_lr": [1e-5, 3e-4, True], "head_lr": [1e-5, 3e-3, True], "decay": [0.6, 1.0, False]}
FIXED = {"base_lr": 1e-4, "head_lr": 1e-3, "decay": 0.9}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


# --------------------------------------------------------------------------- machine ceilings


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 1.0) -> dict[str, float | None]:
    """Best GFLOP/s of an n x n matmul over ``sizes``, fp32 and bf16. bf16 only where the CPU runs it
    natively (AMX / AVX512-BF16): elsewhere torch's bf16 matmul is a slow fallback (0.3 GFLOP/s on
    an AVX2 EPYC), llrd-search trains in fp32 there, and the bf16 peak is reported as None.
    On a CUDA machine: the GPU's peaks (fp32 without TF32, bf16), measured the same way."""
    import torch

    from llrd_search.engine.train import cpu_has_fast_bf16

    if torch.cuda.is_available():
        return gpu_matmul_peak()

    out: dict[str, float | None] = {"bf16": None}
    kinds = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if cpu_has_fast_bf16() else (("fp32", torch.float32),)
    for name, dtype in kinds:
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for _ in range(2):
                a @ b
            best, t_end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            out[name] = max(out.get(name) or 0.0, 2 * n**3 / best / 1e9)
    return out


def gpu_matmul_peak(n: int = 8192, reps: int = 10) -> dict[str, float | None]:
    """The GPU's dense matmul peaks in GFLOP/s (fp32 with TF32 off, as torch's default; bf16)."""
    import torch

    out: dict[str, float | None] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def device_name() -> str:
    """The GPU's name on a CUDA machine, else the CPU's."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()


def flops_per_example(model_path: str, lengths: np.ndarray) -> float:
    """Training FLOPs of one example: 6 x non-embedding params x tokens, plus attention scores
    (QK^T and AV: 4 T^2 d per layer forward, x3 with backward). Real tokens only, no padding."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_path)
    n = AutoModel.from_config(cfg).num_parameters(exclude_embeddings=True)
    dense = 6 * n * lengths.mean()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * (lengths.astype(float) ** 2).mean()
    return float(dense + attention)


# --------------------------------------------------------------------------- the two sides


def write_slice(folder: Path, train_limit: int, seed: int, source: Path = SST2) -> None:
    """The same stratified train slice for both sides, as CSV; the full validation split."""
    import pandas as pd

    from llrd_search.engine.data import stratified_indices

    train = pd.read_csv(source / "train.csv")
    if 0 < train_limit < len(train):
        idx = stratified_indices(train["label"].to_numpy(), train_limit / len(train), seed)[:train_limit]
        train = train.iloc[idx]
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    pd.read_csv(source / "validation.csv").to_csv(folder / "validation.csv", index=False)


def study_toml(path: Path, data: Path, args: argparse.Namespace, *, name: str, pruner: str, evals: int) -> Path:
    space = "\n".join(f"{k} = {{ low = {lo}, high = {hi}, log = {str(log).lower()} }}" for k, (lo, hi, log) in SPACE.items())
    path.write_text(f"""[study]
name = "{name}"
n_trials = {args.trials}
seed = 0
sampler = "tpe"
pruner = "{pruner}"
control_fraction = 0                 # the peer has no ξ = 1 arm: every trial counts on both sides
storage = "sqlite:///{path.with_suffix('.db')}"
[model]
name = "{args.model}"
max_length = {args.max_length}
[data]
path = "{data}"
[train]
epochs = {args.epochs}
batch_size = {args.batch_size}
evals_per_epoch = {evals}
[space]
{space}
""")
    return path


def run_ours(toml: Path, env: dict, workers: int) -> dict:
    """``llrd-search run [--workers K]`` in a fresh process with an empty tokenization cache."""
    import optuna

    shutil.rmtree(env["LLRD_SEARCH_CACHE"], ignore_errors=True)
    t0 = time.time()
    with open(toml.with_suffix(".log"), "w") as log:
        cmd = [sys.executable, "-m", "llrd_search", "run", str(toml), "--workers", str(workers)]
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    total = time.time() - t0
    study = optuna.load_study(study_name=toml.stem, storage=f"sqlite:///{toml.with_suffix('.db')}")
    trials = []
    for t in study.get_trials():
        a = t.user_attrs
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        trials.append({
            "number": t.number, "state": t.state.name, "value": t.value, "params": t.params, "wall": wall,
            "t_complete": t.datetime_complete.timestamp() - t0, "train_s": a.get("train_seconds"), "eval_s": a.get("eval_seconds"),
            "steps": a.get("steps", a.get("pruned_at_step")), "evals": a.get("evals", []), "n_train": a.get("n_train"),
        })
    first = min(t.datetime_start.timestamp() for t in study.get_trials()) - t0
    return {"total_s": total, "setup_s": first, "trials": trials, "workers": workers}


def run_peer(data: Path, args: argparse.Namespace, json_out: Path, env: dict, extra: list[str]) -> dict:
    from llrd_search.engine.train import resolve_model_path
    from llrd_search.spec import PAPER_POINTS

    t0 = time.time()
    cmd = [sys.executable, str(REPO / "bench" / "hf_peer.py"), "--data", str(data), "--model", resolve_model_path(args.model),
           "--json", str(json_out), "--spawn", str(t0), "--trials", str(args.trials), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--space", json.dumps(SPACE),
           "--enqueue", json.dumps(PAPER_POINTS), "--startup", str(min(10, max(2, args.trials // 3))), *extra]
    if args.cuda:
        cmd.append("--bf16")  # on a GPU a Trainer user turns bf16 on (TrainingArguments(bf16=True)); we train in bf16 there too
    with open(json_out.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"the peer failed (exit {done.returncode}); the end of {json_out.with_suffix('.log')}:\n" + json_out.with_suffix(".log").read_text()[-3000:])
    return {"workers": 1, **json.loads(json_out.read_text())}


def peer_seeds(data: Path, args: argparse.Namespace, work: Path, env: dict) -> dict:
    """The peer on FIXED for seeds 0..S-1: one single-threaded process per core, seeds split."""
    from concurrent.futures import ThreadPoolExecutor

    cores = 1 if args.cuda else max(1, min(os.cpu_count() or 1, args.seeds))
    share = [list(range(args.seeds))[i::cores] for i in range(cores)]
    jobs = [(i, s) for i, s in enumerate(share) if s]
    one = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cores))}

    def job(i: int, seeds: list[int]) -> list[dict]:
        extra = ["--fixed", json.dumps(FIXED), "--seeds", "1", "--first-seed"]
        return [run_peer(data, args, work / f"peer_fixed_{i}_{s}.json", one, [*extra, str(s)])["fixed"]["runs"][0] for s in seeds]

    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = [r for rs in pool.map(lambda j: job(*j), jobs) for r in rs]
    return {"params": FIXED, "runs": sorted(runs, key=lambda r: r["seed"])}


def ours_fixed(argv: list[str]) -> None:
    """(subprocess) Our objective on one fixed config for seeds 0..S-1, through the library."""
    import optuna

    from llrd_search.engine.objective import Objective
    from llrd_search.spec import load_spec

    toml, params, seeds, out = Path(argv[0]), json.loads(argv[1]), int(argv[2]), Path(argv[3])
    objective = Objective(load_spec(toml))
    runs = []
    for seed in range(seeds):  # the objective's seed is study.seed (0) + trial number
        trial = optuna.trial.FixedTrial(params, number=seed)
        t0 = time.time()
        objective(trial)
        a = trial.user_attrs
        runs.append({"seed": seed, "wall": time.time() - t0, "evals": [[e["step"], e["accuracy"]] for e in a["evals"]], "train_s": a["train_seconds"]})
    out.write_text(json.dumps({"params": params, "runs": runs}))


# --------------------------------------------------------------------------- report


def summarize(side: dict, flops: float, peak: dict[str, float]) -> dict:
    """Aggregates of one search. With K workers, K trials run at once: rates add up."""
    trials = [t for t in side["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    k = side["workers"]
    n_ex = sum(t["steps_ex"] for t in trials)
    timed = [t for t in trials if t["train_only_s"]]  # a pruned trial of ours records no timings
    rate = k * sum(t["steps_ex"] for t in timed) / sum(t["train_only_s"] for t in timed)
    wall = np.mean([t["wall"] for t in timed])
    overhead = np.mean([t["wall"] - t["loop_s"] for t in timed])
    return {
        "trials": len(trials), "workers": k, "total_s": side["total_s"], "setup_s": side["setup_s"], "trial_s": wall,
        "train_ex_s": rate, "end_to_end_ex_s": n_ex / side["total_s"],
        "eval_s": np.mean([t["eval_only_s"] for t in timed]), "overhead_s": overhead, "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "overhead_pct": 100 * (overhead + side["setup_s"] * k / len(trials)) / wall,
        "best": max(t["value"] for t in trials if t["value"] is not None),
        "mfu_fp32": 100 * rate * flops / (peak["fp32"] * 1e9), "mfu_bf16": 100 * rate * flops / (peak["bf16"] * 1e9) if peak["bf16"] else None,
    }


def normalize_peer(peer: dict, n_train: int, epochs: int) -> dict:
    for t in peer["trials"]:
        t["steps_ex"] = n_train * epochs
        t["eval_only_s"] = t["eval_s"]
        t["train_only_s"] = t["loop_s"] - t["eval_s"]
    return peer


def normalize_ours(ours: dict, batch_size: int, n_train: int) -> dict:
    for t in ours["trials"]:
        steps = t["steps"] or 0
        # Examples actually trained (a pruned trial stops early); the last batch may be short.
        full, last = divmod(n_train, batch_size)
        per_epoch = full + (last > 0)
        t["steps_ex"] = (steps // per_epoch) * n_train + (steps % per_epoch) * batch_size
        t["eval_only_s"] = t["eval_s"] or 0.0
        t["train_only_s"] = t["train_s"] or 0.0
        t["loop_s"] = t["train_only_s"] + t["eval_only_s"]
    return ours


def time_to_reach(side: dict, target: float) -> float | None:
    hits = [t["t_complete"] for t in side["trials"] if t["value"] is not None and t["value"] >= target]
    return min(hits) if hits else None


def table(rows: dict[str, dict]) -> str:
    keys = [
        ("trials", "trials", "{:.0f}"), ("pruned", "of which pruned", "{:.0f}"), ("workers", "processes x torch threads", "{}"), ("total_s", "search wall time (s)", "{:.0f}"),
        ("end_to_end_ex_s", "**train examples/s end to end** (search wall)", "{:.0f}"), ("train_ex_s", "train examples/s, training steps only", "{:.0f}"),
        ("trial_s", "trial wall time (s)", "{:.1f}"), ("eval_s", "evaluation per trial (s)", "{:.1f}"),
        ("setup_s", "one-off setup: spawn to first trial (s)", "{:.1f}"), ("overhead_s", "fixed overhead per trial (s)", "{:.2f}"),
        ("overhead_pct", "fixed overhead + amortized setup, % of a trial", "{:.1f}"), ("best", "best validation accuracy", "{:.4f}"),
        ("mfu_fp32", "MFU vs fp32 matmul peak (%)", "{:.0f}"), ("mfu_bf16", "MFU vs bf16 matmul peak (%)", "{:.1f}"),
    ]
    names = list(rows)
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in keys:
        out.append(f"| {label} | " + " | ".join(fmt.format(rows[n][key]) if rows[n].get(key) is not None else "-" for n in names) + " |")
    return "\n".join(out)


def final_accs(runs: list[dict]) -> list[float]:
    return [r["evals"][-1][1] for r in runs]


def searches(args: argparse.Namespace, data: Path, work: Path, env: dict, raw: dict, flops: float, peak: dict, top: str, texts: list) -> None:
    """Phases 1-4: the peer's search, ours with one and with K workers, ours with Hyperband."""
    cores = os.cpu_count() or 1
    k = args.workers or (1 if args.cuda else cores)  # one GPU: one worker, as `llrd-search run` chooses
    print(f"[1/5] peer: Trainer.hyperparameter_search, {args.trials} trials (load {load()})", flush=True)
    raw["peer"] = normalize_peer(run_peer(data, args, work / "peer.json", env, ["--storage", f"sqlite:///{work / 'peer.db'}"]), len(texts), args.epochs)
    rows = {"HF Trainer (peer)": summarize(raw["peer"], flops, peak)}
    rows["HF Trainer (peer)"]["workers"] = f"1 x {raw['peer']['threads']}"
    print(table({"HF Trainer (peer)": rows["HF Trainer (peer)"]}), flush=True)
    runs = [("ours", 1, "none", 2, "llrd-search run"), (f"ours_{k}w", k, "none", 2, f"llrd-search run --workers {k}")]
    if not args.no_hyperband:
        runs.append(("ours_hb", k, "hyperband", 3, f"llrd-search run --workers {k}, Hyperband, 3 evals/epoch"))
    if k == 1:  # "--workers 1" is the first run again
        runs = [r for r in runs if r[0] != f"ours_{k}w"]
    for i, (name, workers, pruner, evals, label) in enumerate(runs, 2):
        print(f"[{i}/5] {label}: {args.trials} trials (load {load()})", flush=True)
        toml = study_toml(work / f"{name}.toml", data, args, name=name, pruner=pruner, evals=evals)
        raw[name] = normalize_ours(run_ours(toml, env, workers), args.batch_size, len(texts))
        rows[label] = summarize(raw[name], flops, peak)
        rows[label]["workers"] = f"{workers} x {max(1, cores // workers)}"
        print(table({label: rows[label]}), flush=True)  # each phase as it ends: a run cut short keeps what it measured
    raw["loads"]["after_searches"] = load()

    print()
    print(table(rows))
    peer = rows["HF Trainer (peer)"]
    print()
    for label, row in list(rows.items())[1:]:
        print(f"{label}: {row['end_to_end_ex_s'] / peer['end_to_end_ex_s']:.1f}x the peer's train examples/s end to end "
              f"({row['train_ex_s'] / peer['train_ex_s']:.1f}x in training steps; target >= 5x); overhead {row['overhead_pct']:.1f}% of a trial "
              f"(target <= 5%); MFU {row['mfu_' + top]:.1f}% of the {top} peak (target >= 30% of the bf16 peak)")
    if "ours_hb" in raw:
        target = peer["best"]
        hit = time_to_reach(raw["ours_hb"], target)
        near = time_to_reach(raw["ours_hb"], target - 0.005)
        raw["time_to_peer_best"] = {"peer_wall": peer["total_s"], "hit": hit, "within_0.5": near}
        said = f"{hit:.0f} s = 1/{peer['total_s'] / hit:.1f} of the peer's {peer['total_s']:.0f} s" if hit else "not reached"
        close = f"{near:.0f} s = 1/{peer['total_s'] / near:.1f}" if near else "not reached"
        print(f"Hyperband search reaches the peer's best ({target:.4f}): {said} (target <= 1/5); within 0.5 points: {close}")



def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_ours_fixed":
        return ours_fixed(sys.argv[2:])
    if "--gpu" in sys.argv[1:]:  # trials per GPU-hour, on one GPU: bench/compare_gpu.py, which imports this file
        gpu = Path(__file__).with_name("compare_gpu.py")
        sys.exit(subprocess.call([sys.executable, str(gpu), *(a for a in sys.argv[1:] if a != "--gpu")]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--trials", type=int, default=12, help="trials per search (default 12)")
    p.add_argument("--train-limit", type=int, default=2000, help="SST-2 train sentences (default 2000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", type=int, default=4, help="seeds per side for the fixed-config accuracy check (0 skips it)")
    p.add_argument("--no-hyperband", action="store_true", help="skip the pruned search")
    p.add_argument("--workers", type=int, help="worker processes for the parallel runs (default: one per core, 1 thread each)")
    p.add_argument("--json", help="write all raw results here")
    p.add_argument("--fixed-only", action="store_true", help="only the fixed-config accuracy check (--seeds per side)")
    p.add_argument("--model", default=MODEL, help="hub id or model directory (default: the packaged MiniLM)")
    p.add_argument("--data", type=Path, default=SST2, help="folder with SST-2's train.csv and validation.csv")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compare-hf-"))
    data = work / "data"
    write_slice(data, args.train_limit, seed=0, source=args.data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LLRD_SEARCH_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf-cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    import torch
    from transformers import AutoTokenizer

    from llrd_search.engine.train import resolve_model_path

    args.cuda = torch.cuda.is_available()

    print(f"load before: {load()}  cpu: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    peak = matmul_peak()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    import pandas as pd

    texts = pd.read_csv(data / "train.csv")["text"].tolist()
    lengths = np.array([len(x) for x in tok(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    flops = flops_per_example(resolve_model_path(args.model), lengths)
    top = "bf16" if peak["bf16"] else "fp32"  # the precision llrd-search trains in here (train.precision = "auto")
    bf16 = f"bf16 {peak['bf16']:.0f} GFLOP/s" if peak["bf16"] else "bf16 not native on this CPU (llrd-search trains in fp32)"
    if args.cuda:
        top = "bf16"  # precision = "auto" trains in bf16 on a GPU
    print(f"device: {device_name()}\nmatmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, {bf16}; {flops / 1e9:.2f} GFLOP per train example "
          f"(mean {lengths.mean():.1f} tokens) -> {top} ceiling {peak[top] * 1e9 / flops:.0f} examples/s", flush=True)
    raw: dict = {"device": device_name(), "args": {**vars(args), "data": str(args.data)}, "peak": peak, "flops_per_example": flops, "loads": {"before": load()}}

    if not args.fixed_only:
        searches(args, data, work, env, raw, flops, peak, top, texts)

    if args.seeds:
        print(f"\n[5/5] fixed config {FIXED}, seeds 0..{args.seeds - 1} each side (load {load()})", flush=True)
        peer_fixed = peer_seeds(data, args, work, env)
        toml = study_toml(work / "fixed.toml", data, args, name="fixed", pruner="none", evals=2)
        subprocess.run([sys.executable, __file__, "_ours_fixed", str(toml), json.dumps(FIXED), str(args.seeds), str(work / "ours_fixed.json")], env=env, check=True)
        ours_fixed_ = json.loads((work / "ours_fixed.json").read_text())
        a, b = final_accs(ours_fixed_["runs"]), final_accs(peer_fixed["runs"])
        raw["fixed"] = {"ours": ours_fixed_, "peer": peer_fixed}
        print(f"final validation accuracy: ours {np.mean(a):.4f} ± {np.std(a):.4f} {[round(x, 4) for x in a]}, "
              f"peer {np.mean(b):.4f} ± {np.std(b):.4f} {[round(x, 4) for x in b]}; difference {100 * (np.mean(a) - np.mean(b)):+.2f} points (target within 0.5)")
    raw["loads"]["after"] = load()
    print(f"load after: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
