"""bench/gpu.sh, part 2: each search mode for a fixed time window on one GPU; finished trials per
hour in the steady state, read from the storage's trial timestamps, and start-up apart.

    python bench/gpu_search.py --out gpu-out --window 50 --deadline EPOCH   # on a GPU
    python bench/gpu_search.py --out /tmp/x --dry-run                       # CPU, tiny model, short windows

Modes, packed ones first (a timeout cuts the last): ``pack_auto`` (``llrd-search run`` with its
defaults, ``[train] pack = "auto"``), ``workers_x_pack`` (2 workers on the GPU, pack 4), ``peer``
(HF Trainer + ``hyperparameter_search(optuna)``, bf16, eval batch 128 as ours), ``one`` (1 worker,
pack 1), ``k_workers`` (4 workers on the GPU, pack 1). Every search has a budget it cannot spend
in the window; the window ends with Ctrl-C (the trials running are marked FAIL and not counted).

Per mode: start-up = first trial's start - process spawn; steady rate = finished trials /
(last finish - first start) x 3600 (whole trials only, no half-done tail). Accuracy: every mode
enqueues the paper's point first (trial 0, trained with seed 0 on our side); its validation
accuracy is compared across modes, not a best-of-N.
Writes OUT/search.json and OUT/search.md after every mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

TOLERANCE = 0.005  # 0.5 accuracy points
BUDGET = 1000  # trials per search: more than any window finishes


def modes(cuda: bool) -> list[tuple[str, str, list[str] | None, int | str]]:
    """(mode, label, `llrd-search run` flags or None for the peer, [train] pack), in run order.
    Without a GPU (a dry run) "workers per GPU" are plain workers, 2 at most (2 cores here)."""
    per_gpu = (lambda n: ["--workers-per-gpu", str(n)]) if cuda else (lambda n: ["--workers", str(min(n, 2))])
    where = "on the GPU" if cuda else "(CPU)"
    return [
        ("pack_auto", 'llrd-search run, defaults (pack = "auto")', [], "auto"),
        ("workers_x_pack", f"llrd-search, 2 workers {where} x pack 4", per_gpu(2), 4),
        ("peer", "HF Trainer + hyperparameter_search(optuna)" + (", bf16" if cuda else ""), None, 1),
        ("one", "llrd-search, 1 worker, pack 1", ["--workers", "1"], 1),
        ("k_workers", f"llrd-search, {4 if cuda else 2} workers {where}, pack 1", per_gpu(4), 1),
    ]


def rate(trials: list, spawn: float) -> dict:
    """Start-up and steady finished trials per hour from FrozenTrials' timestamps (``spawn``: epoch s)."""
    started = [t.datetime_start.timestamp() for t in trials if t.datetime_start is not None]
    done = sorted(t.datetime_complete.timestamp() for t in trials if t.state.name in ("COMPLETE", "PRUNED"))
    out = {"finished": len(done), "startup_s": (min(started) - spawn) if started else None, "per_hour": None, "steady_s": None}
    if done and started:
        out["steady_s"] = done[-1] - min(started)
        out["per_hour"] = len(done) * 3600 / out["steady_s"] if out["steady_s"] > 0 else None
    first = next((t for t in trials if t.number == 0), None)
    out["first_point"] = first.params if first is not None else None
    out["first_value"] = first.value if first is not None and first.state.name == "COMPLETE" else None
    return out


def finished_in(url: str, name: str) -> int:
    """Finished trials of study ``name`` so far (0 before it exists)."""
    import optuna

    try:
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception:  # not created yet (or the storage is being written): nothing finished
        return 0
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def windowed(cmd: list[str], env: dict, log: Path, window: Window, count: Callable[[], int], grace: float = 15.0) -> tuple[float, int | None]:
    """Run ``cmd`` for ``window.seconds`` (on a dry run longer, up to ``window.cap``, until
    ``window.min_finished`` trials finished), then Ctrl-C its process group (SIGKILL after
    ``grace``); returns (spawn epoch, exit code, None when it was stopped)."""
    spawn = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                spent = time.time() - spawn
                if spent >= window.cap or (spent >= window.seconds and (window.min_finished == 0 or count() >= window.min_finished)):
                    break
                time.sleep(1.0)
        except BaseException:  # this script stopped (gpu.sh's timeout): its own session would outlive it on the GPU
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if proc.poll() is not None:
            return spawn, proc.returncode
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return spawn, None


@dataclass(frozen=True)
class Window:
    seconds: float  # each mode runs this long
    min_finished: int = 0  # dry run: and on until this many trials finished ...
    cap: float = float("inf")  # ... but no longer than this


def run_mode(mode: str, flags: list[str] | None, pack: int | str, ctx: argparse.Namespace) -> dict:
    import optuna
    from compare_gpu import study_dict, toml_text
    from compare_hf import SPACE

    from llrd_search.spec import PAPER_POINTS

    db = ctx.work / f"{mode}.db"
    log = ctx.work / f"{mode}.log"
    if flags is None:
        cmd = [sys.executable, str(BENCH / "hf_peer.py"), "--data", str(ctx.data), "--model", ctx.model_path, "--json", str(ctx.work / "peer.json"),
               "--spawn", str(time.time()), "--trials", str(BUDGET), "--epochs", "1", "--batch-size", str(ctx.batch_size),
               "--max-length", str(ctx.max_length), "--eval-batch-size", "128", "--space", json.dumps(SPACE), "--enqueue", json.dumps(PAPER_POINTS),
               "--startup", "10", "--storage", f"sqlite:///{db}", *(["--bf16"] if ctx.cuda else [])]
        name = "peer"
    else:
        study = study_dict(mode, ctx.data, ctx, db, pack=pack)
        study["train"]["eval_batch_size"] = 128  # the default, written out: the peer's is set to the same
        toml = ctx.work / f"{mode}.toml"
        toml.write_text(toml_text(study))
        cmd, name = [sys.executable, "-m", "llrd_search", "run", str(toml), *flags], mode
    url = f"sqlite:///{db}"
    spawn, rc = windowed(cmd, ctx.env, log, ctx.window_rule, lambda: finished_in(url, name))
    try:
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception as err:  # no study: it failed before creating one
        return {"error": f"no study ({type(err).__name__}); exit {rc}; see {log.name}", "log_tail": log.read_text()[-1500:]}
    out = {**rate(trials, spawn), "exit": rc, "stopped_by_window": rc is None, "start_line": _start_line(log)}
    if rc not in (None, 0):
        out["error"] = f"exit {rc}; see {log.name}"
        out["log_tail"] = log.read_text()[-1500:]
    return out


def _start_line(log: Path) -> str | None:
    """The line `run` prints about its workers and GPUs (placement), if any."""
    for line in log.read_text(errors="replace").splitlines():
        if "worker" in line and ("GPU" in line or "thread" in line):
            return line.strip()
    return None


def markdown(result: dict) -> str:
    ref = result["modes"].get("one", {}).get("first_value")
    peer = result["modes"].get("peer", {})
    lines = [f"### Searches, {result['window']:.0f} s window each ({result['device']}, {result['date']})", "",
             f"`{result['command']}`; {result['model']}, {result['train_limit']} SST-2 sentences, 1 epoch, batch {result['batch_size']}, "
             f"max_length {result['max_length']}, eval batch 128 both sides. Steady rate = finished trials / (last finish - first start); "
             "start-up = first trial's start - spawn. Accuracy: trial 0 (the paper's point, seed 0 on our side) in every mode.", "",
             "| mode | run | finished | start-up (s) | **trials / hour (steady)** | vs Trainer | trial 0 accuracy | vs 1 worker | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode, label, _flags, _pack in result["plan"]:
        r = result["modes"].get(mode)
        if r is None or "skipped" in (r or {}):
            lines.append(f"| {mode} | {label} | - | - | - | - | - | - | {(r or {}).get('skipped', 'not run')} |")
            continue
        if "finished" not in r:
            lines.append(f"| {mode} | {label} | - | - | - | - | - | - | {r['error']} |")
            continue
        vs = f"{r['per_hour'] / peer['per_hour']:.1f}x" if r["per_hour"] and peer.get("per_hour") else "-"
        acc, d = r["first_value"], None
        if acc is not None and ref is not None and mode != "one":
            d = acc - ref
        flag = "" if d is None or abs(d) <= TOLERANCE else " **differs**"
        note = "; ".join(x for x in (r.get("error"), r.get("start_line")) if x)
        lines.append(f"| {mode} | {label} | {r['finished']} | {_f(r['startup_s'], 0)} | {_f(r['per_hour'], 0)} | {vs} | {_f(acc, 4)} | "
                     f"{'-' if d is None else f'{d:+.4f}'}{flag} | {note} |")
    return "\n".join(lines) + "\n"


def _f(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--window", type=float, default=50.0, help="seconds each mode runs (default 50)")
    p.add_argument("--deadline", type=float, help="epoch seconds: a mode that cannot finish its window by then is skipped")
    p.add_argument("--logs", type=Path, help="where each mode's log is copied (default: --out)")
    p.add_argument("--modes", help="comma-separated subset, in run order (default: all)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, a tiny random model, 64 sentences, each mode until its first finished trial (at most 40 s): the same code, measures nothing")
    args = p.parse_args(argv)
    args.train_limit, args.batch_size, args.max_length, args.model = 2000, 32, 128, "minilm"
    args.window_rule = Window(args.window)
    if args.dry_run:
        args.window, args.train_limit, args.batch_size, args.max_length, args.model = 3.0, 64, 16, 32, "tiny-random"
        args.window_rule = Window(args.window, min_finished=1, cap=40.0)
    return args


def prepare(args: argparse.Namespace) -> None:
    """Data slice, model, environment (every mode on the first visible GPU, or none on a dry run)."""
    import pandas as pd
    import torch
    from compare_gpu import MINILM, build_random_model
    from compare_hf import write_slice

    args.cuda = torch.cuda.is_available() and not args.dry_run
    args.work = Path(tempfile.mkdtemp(prefix="gpu-search-"))
    args.data = args.work / "data"
    write_slice(args.data, args.train_limit, seed=0, source=REPO / "studies" / "data" / "sst2")
    if args.dry_run:
        pd.read_csv(args.data / "validation.csv").head(64).to_csv(args.data / "validation.csv", index=False)
    args.model_path = MINILM if args.model == "minilm" else str(build_random_model(args.model, args.work / "model"))
    if args.model_path == MINILM:
        from llrd_search.engine.model import resolve_model_path

        args.model_path = resolve_model_path(MINILM)  # the peer loads a directory, not a hub id (offline)
    args.trials, args.epochs = BUDGET, 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "LLRD_SEARCH_CACHE": str(args.work / "cache"), "HF_DATASETS_CACHE": str(args.work / "hf-cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("LLRD_SEARCH_WORKERS", None)
    if args.cuda:
        from llrd_search.study.gpus import visible_gpu_ids

        env["CUDA_VISIBLE_DEVICES"] = visible_gpu_ids(1)[0]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    args.env = env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: windowed() then stops the search it runs
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs = args.logs or args.out
    args.logs.mkdir(parents=True, exist_ok=True)
    prepare(args)
    import torch

    plan = modes(args.cuda)
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",")]
        plan = [m for m in plan if m[0] in wanted]
    result = {"device": torch.cuda.get_device_name(0) if args.cuda else ("CPU (dry run: measures nothing)" if args.dry_run else "CPU, no CUDA"), "date": datetime.date.today().isoformat(),
              "command": "python bench/gpu_search.py" + (" --dry-run" if args.dry_run else f" --window {args.window:g}"), "window": args.window,
              "model": args.model, "train_limit": args.train_limit, "batch_size": args.batch_size, "max_length": args.max_length,
              "plan": plan, "modes": {}}

    def save() -> None:
        (args.out / "search.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "search.md").write_text(markdown(result))
        for log in args.work.glob("*.log"):
            (args.logs / f"search-{log.name}").write_text(log.read_text(errors="replace"))

    save()
    for mode, label, flags, pack in plan:
        if args.deadline and time.time() + min(args.window_rule.cap, args.window) + 20 > args.deadline:
            result["modes"][mode] = {"skipped": "out of time (the script's own deadline)"}
            save()
            continue
        print(f"[search] {mode}: {label} for {args.window:.0f} s", flush=True)
        result["modes"][mode] = run_mode(mode, flags, pack, args)
        print(f"[search] {mode}: {json.dumps({k: v for k, v in result['modes'][mode].items() if k != 'log_tail'}, default=str)}", flush=True)
        save()
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
