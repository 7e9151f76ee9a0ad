"""The GPU mode of bench/compare_hf.py: finished trials per GPU-hour, llrd-search against the HF
Trainer + ``hyperparameter_search(backend="optuna")`` peer, on one GPU.

    python bench/compare_hf.py --gpu --model minilm --trials 12 --out gpu-out
    python bench/compare_hf.py --gpu --model bert-base-random --trials 8 --out gpu-out
    python bench/compare_hf.py --gpu --smoke        # CPU, a tiny random model, 2 trials (a check that it runs)

The same search each side (model, SST-2 slice, epochs, batch, max_length, space, TPE seed, enqueued
first points, no pruning, no ξ = 1 arm), each in its own process timed from spawn, all pinned to the
first visible GPU. Runs of ours, shown separately: 1 worker unpacked; K workers on the GPU
(``--workers-per-gpu K``) unpacked; 1 worker packing P trials (``[train] pack = P``, which needs
the study-file key of the packed-trials work: without it that row is skipped and says so).
A speed-up counts only when both sides' best accuracy agree within 0.5 points (printed).
``bert-base-random``: BERT-base's shape (hidden 768, 12 layers, 12 heads) with random weights and
the MiniLM tokenizer: speed only, its accuracy means nothing.
Writes ``OUT/compare-<model>.md`` (a table for docs/performance.md), ``.json`` and the logs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SHAPES = {  # random-weight models: (hidden, layers, heads, intermediate)
    "bert-base-random": (768, 12, 12, 3072),
    "tiny-random": (32, 2, 2, 64),
}
MODES = ("peer", "ours", "ours_k", "packed")
TOLERANCE = 0.005  # 0.5 accuracy points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_hf.py --gpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="minilm, bert-base-random, tiny-random or a model directory (default minilm)")
    p.add_argument("--trials", type=int, default=12, help="trials per search (default 12)")
    p.add_argument("--train-limit", type=int, default=2000, help="SST-2 train sentences (default 2000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--workers-per-gpu", type=int, default=4, metavar="K", help="workers on the GPU in the ours_k run (default 4)")
    p.add_argument("--pack", type=int, default=4, metavar="P", help="trials per packed worker in the packed run (default 4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--data", type=Path, default=REPO / "studies" / "data" / "sst2")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"), help="output folder (default $OUT, else ./gpu-out)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random model, 2 trials on 64 sentences: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.trials, args.train_limit, args.max_length, args.batch_size = "tiny-random", 2, 64, 32, 16
        args.workers_per_gpu, args.pack = 2, 2
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or "peer" not in args.modes:
        p.error(f"--modes: the peer is needed and the rest must be among {', '.join(MODES)} (got {','.join(args.modes)})")
    return args


def pack_supported() -> bool:
    """Whether this llrd-search has the ``[train] pack`` key (the packed-trials work)."""
    from llrd_search.spec import TrainSection

    return "pack" in TrainSection.model_fields


def model_label(model: str) -> str:
    if model == "minilm":
        return f"MiniLM-L6 ({MINILM}, 22 M parameters)"
    if model in SHAPES:
        h, layers, heads, _ = SHAPES[model]
        return f"{model}: BERT-like, hidden {h}, {layers} layers, {heads} heads, **random weights, speed only**"
    return model


def build_random_model(shape: str, folder: Path) -> Path:
    """A BertForSequenceClassification of ``SHAPES[shape]`` with random weights (seed 0), saved with
    the MiniLM tokenizer: what both sides load from the same directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llrd_search.engine.model import resolve_model_path

    h, layers, heads, inter = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def study_dict(name: str, data: Path, args: argparse.Namespace, db: Path, *, pack: int | None) -> dict:
    """The study of one of our runs; ``pack`` is written as ``[train] pack`` when not None."""
    from compare_hf import SPACE

    train: dict = {"epochs": args.epochs, "batch_size": args.batch_size, "evals_per_epoch": 2}
    if pack is not None:
        train["pack"] = pack
    return {
        "study": {"name": name, "n_trials": args.trials, "seed": 0, "sampler": "tpe", "pruner": "none", "control_fraction": 0,
                  "storage": f"sqlite:///{db}"},
        "model": {"name": args.model_path, "max_length": args.max_length},
        "data": {"path": str(data)},
        "train": train,
        "space": {k: {"low": lo, "high": hi, "log": log} for k, (lo, hi, log) in SPACE.items()},
    }


def toml_text(study: dict) -> str:
    """A study dict as TOML (sections of scalars and one level of inline tables)."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    return "".join(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items()) for section, keys in study.items())


def our_runs(args: argparse.Namespace, packing: bool) -> list[tuple[str, str, list[str], int | None]]:
    """(mode, label, extra `run` flags, pack) of each of our runs asked for. ``pack`` None: the
    key is not written (this llrd-search has none: every run unpacked)."""
    one = 1 if packing else None
    k = args.workers_per_gpu
    runs = [("ours", "llrd-search, 1 worker, pack 1", ["--workers", "1"], one)]
    if args.cuda:
        runs.append(("ours_k", f"llrd-search, {k} workers on the GPU, pack 1", ["--workers-per-gpu", str(k)], one))
    else:  # --workers-per-gpu means nothing without a GPU: the same count as processes
        runs.append(("ours_k", f"llrd-search, {k} workers (CPU), pack 1", ["--workers", str(k)], one))
    runs.append(("packed", f"llrd-search, 1 worker, pack {args.pack}", ["--workers", "1"], args.pack))
    return [r for r in runs if r[0] in args.modes]


def run_ours(toml: Path, flags: list[str], env: dict) -> dict:
    """``llrd-search run TOML FLAGS`` in a fresh process: wall time from spawn, finished trials, best."""
    import optuna

    t0 = time.time()
    with open(toml.with_suffix(".log"), "w") as log:
        done = subprocess.run([sys.executable, "-m", "llrd_search", "run", str(toml), *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}; the end of {toml.with_suffix('.log')}:\n{toml.with_suffix('.log').read_text()[-2000:]}")
    trials = optuna.load_study(study_name=toml.stem, storage=f"sqlite:///{toml.with_suffix('.db')}").get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    return {"wall_s": wall, "trials": len(finished), "best": max((t.value for t in finished if t.value is not None), default=None)}


def row(label: str, side: dict, peer: dict | None) -> dict:
    """One line of the table: finished trials per GPU-hour (one GPU: GPU-hours = wall hours),
    the speed-up over the peer, and whether the best accuracy is within 0.5 points of the peer's."""
    per_hour = side["trials"] * 3600 / side["wall_s"]
    out = {"label": label, "trials": side["trials"], "wall_s": side["wall_s"], "per_gpu_hour": per_hour, "best": side["best"],
           "speedup": None, "same_accuracy": None}
    if peer is not None:
        out["speedup"] = per_hour / (peer["trials"] * 3600 / peer["wall_s"])
        if side["best"] is not None and peer["best"] is not None:
            out["same_accuracy"] = abs(side["best"] - peer["best"]) <= TOLERANCE + 1e-12
    return out


def markdown(rows: list[dict], *, title: str, device: str, date: str, command: str, notes: list[str]) -> str:
    """The table for docs/performance.md, with its device, date and command."""
    def fmt(r: dict) -> str:
        if "skipped" in r:
            return f"| {r['label']} | - | - | - | - | - | skipped: {r['skipped']} |"
        speed = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        same = {None: "-", True: "yes", False: "**no**: does not count"}[r["same_accuracy"]]
        best = f"{r['best']:.4f}" if r["best"] is not None else "-"
        return f"| {r['label']} | {r['trials']} | {r['wall_s']:.0f} | {r['per_gpu_hour']:.0f} | {speed} | {best} | {same} |"

    head = [f"### {title}", "", f"{device}, {date}; `{command}`", "", *[x for n in notes for x in (n, "")],
            "| run | finished trials | wall (s) | **trials per GPU-hour** | vs Trainer | best val. accuracy | within 0.5 points of the Trainer |",
            "|---|---:|---:|---:|---:|---:|---|"]
    return "\n".join([*head, *map(fmt, rows)]) + "\n"


def device_facts(cuda: bool) -> str:
    import torch

    if cuda:
        props = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.get_device_name(0)} ({props.total_memory / 1024**3:.0f} GiB), torch {torch.__version__}"
    from compare_hf import cpu_name

    return f"CPU {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    import torch
    from compare_hf import run_peer, write_slice

    args = parse_args(argv)
    args.cuda = torch.cuda.is_available() and not args.smoke
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compare-gpu-"))
    data = work / "data"
    write_slice(data, args.train_limit, seed=0, source=args.data)
    if args.smoke:  # 64 validation sentences too: the peer evaluates three times a trial
        import pandas as pd

        pd.read_csv(data / "validation.csv").head(64).to_csv(data / "validation.csv", index=False)
    args.model_path = str(build_random_model(args.model, work / "model")) if args.model in SHAPES else (MINILM if args.model == "minilm" else args.model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LLRD_SEARCH_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf-cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if args.cuda:  # one GPU: the first visible one, for every run
        from llrd_search.study.gpus import visible_gpu_ids

        env["CUDA_VISIBLE_DEVICES"] = visible_gpu_ids(1)[0]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    packing = pack_supported()
    device, date = device_facts(args.cuda), datetime.date.today().isoformat()
    command = "python bench/compare_hf.py --gpu " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"device: {device}; model: {model_label(args.model)}", flush=True)

    peer_args = argparse.Namespace(**{**vars(args), "model": args.model_path})
    print(f"[peer] Trainer.hyperparameter_search(optuna), {args.trials} trials", flush=True)
    t0 = time.time()
    try:
        p = run_peer(data, peer_args, work / "peer.json", env, ["--storage", f"sqlite:///{work / 'peer.db'}"])
    except SystemExit as err:  # run_peer exits with the log's end on a failed peer; ours still run, uncompared
        print(f"the peer failed: {err}", flush=True)
        p = None
    peer_label = "HF Trainer + hyperparameter_search(optuna)" + (", bf16" if args.cuda else "")
    peer = None if p is None else {"wall_s": time.time() - t0, "trials": sum(t["state"] == "COMPLETE" for t in p["trials"]), "best": p["best"]["value"]}
    rows = [{**row(peer_label, peer, None), "speedup": 1.0} if peer else {"label": peer_label, "skipped": "failed (see its log)"}]
    raw = {"device": device, "date": date, "command": command, "args": {k: str(v) for k, v in vars(args).items()}, "peer": peer}
    notes = [f"Same search each side: {args.trials} trials, {args.train_limit} SST-2 sentences, {args.epochs} epoch(s), batch {args.batch_size}, "
             f"max_length {args.max_length}, TPE seed 0, no pruning; each side in its own process, timed from spawn. Model: {model_label(args.model)}.",
             "Target: >= 5x the Trainer's trials per GPU-hour for MiniLM, >= 2x for a BERT-base-sized model, at equal best accuracy (within 0.5 points)."]
    if args.smoke:
        notes.append("**Smoke run on CPU: checks the script end to end, measures nothing.**")
    name = f"compare-{Path(args.model).name}"

    def save() -> str:  # after every run: a part cut short by its timeout keeps what it measured
        text = markdown(rows, title=f"Trials per GPU-hour: {args.model}", device=device, date=date, command=command, notes=notes)
        (args.out / f"{name}.md").write_text(text)
        (args.out / f"{name}.json").write_text(json.dumps({**raw, "rows": rows}, indent=1, default=str))
        for log in work.glob("*.log"):
            (args.out / f"{name}-{log.name}").write_text(log.read_text())
        return text

    save()
    for mode, label, flags, pack in our_runs(args, packing):
        if mode == "packed" and not packing:
            rows.append({"label": label, "skipped": "this llrd-search has no `[train] pack` key"})
            continue
        print(f"[{mode}] {label}: llrd-search run {' '.join(flags)}", flush=True)
        toml = work / f"{mode}.toml"
        toml.write_text(toml_text(study_dict(mode, data, args, toml.with_suffix(".db"), pack=pack)))
        try:
            raw[mode] = run_ours(toml, flags, env)
        except RuntimeError as err:
            print(f"[{mode}] failed: {err}", flush=True)
            rows.append({"label": label, "skipped": f"failed ({str(err).splitlines()[0]})"})
            continue
        rows.append(row(label, raw[mode], peer))
        save()
        r = rows[-1]
        vs = f", {r['speedup']:.1f}x the Trainer" if r["speedup"] is not None else ""
        print(f"[{mode}] {r['trials']} trials in {r['wall_s']:.0f} s: {r['per_gpu_hour']:.0f} per GPU-hour{vs}", flush=True)

    text = save()
    for r in rows[1:]:
        if "skipped" not in r and peer is not None and r["best"] is not None:
            ok = r["same_accuracy"]
            print(f"accuracy check, {r['label']}: best {r['best']:.4f} vs the Trainer's {peer['best']:.4f}: "
                  f"{'within' if ok else 'NOT within'} 0.5 points{'' if ok else ' (its speed-up does not count)'}")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
