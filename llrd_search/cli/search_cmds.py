"""Search commands: init, validate, create, run, worker, proxy, status: parse, call the search layer, print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    from llrd_search.scaffold import write_study

    out, data, model = write_study(args.model, args.data, args.out, force=args.force)
    validation = f"validation split '{data.validation_split}'" if data.validation_split else "no validation split (10 % of train carved out)"
    splits = ", ".join(f"{name} {n}" for name, n in data.rows.items())
    print(f"data: {splits} rows; text '{data.text}'{f' + {data.text_pair!r}' if data.text_pair else ''}, "
          f"label '{data.label}' ({data.num_classes} classes); {validation}")
    print(f"model: {model.model_type}, {model.layers} layers, {model.max_positions} positions")
    print(f"wrote {out}; next: llrd-search run {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from llrd_search.engine.memory_check import spec_memory
    from llrd_search.search import preflight, storage_url
    from llrd_search.spec import load_spec
    from llrd_search.study.storage import check_storage_url, storage_named

    for path in args.study_files:
        spec = load_spec(path)
        if not args.spec_only:  # what create checks, short of opening the storage: data, tokenizer, model, LR groups, the URL
            preflight(spec, warn_memory=False)
            with storage_named("study.storage"):
                check_storage_url(storage_url(path, spec))
        print(f"{path}: ok (study '{spec.study.name}', {spec.study.n_trials} trials, sampler {spec.study.sampler})")
        memory = spec_memory(spec)
        if memory is not None:
            line, warning = memory
            print(f"  memory: {line}")
            if warning:
                log.warning("%s: %s", path, warning)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from llrd_search.console import print_created
    from llrd_search.search import create
    from llrd_search.study.storage import mask_url, shareable_url

    created = create(args.study_file, storage=args.storage, n_trials=args.n_trials)
    print_created(created)
    shared, has_password = shareable_url(created.url)
    print("start workers (same command on every machine or GPU):")
    print(f"  llrd-search worker --storage '{shared}' --study {created.study_name}")
    if has_password:
        print(f"(password left out: export PGPASSWORD=... or add it to ~/.pgpass on each machine; {mask_url(created.url)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llrd_search.console import RunConsole
    from llrd_search.search import run

    result = run(args.study_file, storage=args.storage, n_trials=args.n_trials, workers=args.workers, threads=args.threads, watch=RunConsole(),
                 workers_per_gpu=args.workers_per_gpu)
    s = result.summary
    if s.best is None:
        print("no trial completed", file=sys.stderr)
        return 1
    b, c = s.best, s.control_best
    print(f"best: trial {b.trial} {s.metric} {b.value:.4f} base_lr={b.params['base_lr']:.3g} head_lr={b.params['head_lr']:.3g} decay={b.params['decay']:.3f}")
    if c is not None:
        print(f"best of the control arm (ξ = 1): trial {c.trial} {s.metric} {c.value:.4f} base_lr={c.params['base_lr']:.3g} head_lr={c.params['head_lr']:.3g} "
              "(unconfirmed: confirm gives the paired verdict)")
    from llrd_search.cli.handle import next_lines

    print("\n".join(next_lines(args, "confirm", "report", "export --out best.json")))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from llrd_search.console import trial_line
    from llrd_search.engine.train import set_threads
    from llrd_search.search import join

    if args.gpu is not None:
        import os

        # Read when CUDA starts, which nothing has done yet in this process.
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    set_threads(args.threads)
    # Quiet children of `run --workers K`: the parent already prints each finished trial.
    on_end = None if args.quiet else (lambda _s, t: print(trial_line(t), file=sys.stderr, flush=True))
    n = join(args.storage, args.study, worker_index=args.worker_index, objective=args.objective, on_trial_end=on_end)
    if not args.quiet:
        print(f"worker done: ran {n} trials; the study's budget is spent", file=sys.stderr)
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from llrd_search.study.proxy_server import serve

    serve(args.storage, args.host, args.port, say=lambda line: print(line, flush=True))
    return 0


def status_data(url: str, name: str) -> dict[str, Any]:
    """:func:`search.status` as plain data (what ``status --format json`` prints)."""
    from llrd_search.search import status

    return status(url, name).as_dict()


def cmd_status(args: argparse.Namespace) -> int:
    data = status_data(args.storage, args.study)
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {data['study']}  ({data['storage']})", show_header=False)
    table.add_row("finished / budget", f"{data['finished']} / {data['budget']}")
    for arm, a in data["arms"].items():
        label = "" if len(data["arms"]) == 1 else f"{arm} arm: "
        for state, n in sorted(a["states"].items()):
            table.add_row(f"{label}{state.lower()}", str(n))
    table.add_row("compute", f"{data['compute_seconds'] / 60:.1f} min")
    if data["best"]:
        b = data["best"]
        p = b["params"]
        arm = " of the control arm (ξ = 1)" if b["arm"] == "control" else (" of the LLRD arm" if len(data["arms"]) > 1 else "")
        table.add_row("best", f"trial {b['trial']}{arm}: {data['metric']} {b['value']:.4f}")
        for name, a in data["arms"].items() if len(data["arms"]) > 1 else ():
            if a["best"] is not None:
                table.add_row(f"{name} arm: best", f"{data['metric']} {a['best']:.4f}")
        table.add_row("best params", f"base_lr {p['base_lr']:.3g}, head_lr {p['head_lr']:.3g}, decay {p['decay']:.3f}")
    for r in data["running"]:
        table.add_row(f"running #{r['trial']} ({r['arm']})", str(r["worker"]))
    Console().print(table)
    return 0
