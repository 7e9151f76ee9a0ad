"""``llrd-search`` command line. The library raises; this module alone turns errors into
``Error: ...`` lines and exit codes (no traceback unless ``--debug``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .exceptions import LLRDSearchError

log = logging.getLogger("llrd_search")

EPILOGS = {
    "run": """example:
  llrd-search run studies/sst2-minilm.toml
  llrd-search run studies/sst2-minilm.toml --workers 2 --storage sqlite:///sst2.db""",
    "create": """example:
  llrd-search create studies/sst2-minilm.toml --storage postgresql+psycopg://user:pass@db:5432/llrd""",
    "worker": """example (one per GPU or machine, all with the same URL):
  llrd-search worker --storage postgresql+psycopg://user:pass@db:5432/llrd --study sst2-minilm""",
    "status": """example:
  llrd-search status --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm
  llrd-search status --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --format json""",
    "validate": """example:
  llrd-search validate studies/*.toml""",
    "confirm": """example:
  llrd-search confirm --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --top 3 --seeds 5
  (runs go to the linked study sst2-minilm.confirm; more machines can help with:
   llrd-search worker --storage URL --study sst2-minilm.confirm)""",
    "export": """example:
  llrd-search export --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --out best.json
  llrd-search export --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --format yaml
then in Python:
  optimizer = torch.optim.AdamW(llrd_search.load_config("best.json").param_groups(model))""",
    "train": """example:
  llrd-search train best.json --out models/sst2-minilm
  llrd-search train best.json --out /tmp/smoke --epochs 1 --train-limit 200   (a quick check)""",
    "dashboard": """example:
  llrd-search dashboard --storage sqlite:///studies/sst2-minilm.db
  llrd-search dashboard --storage sqlite:///studies/sst2-minilm.db --port 8081
from another machine, tunnel instead of --host 0.0.0.0:  ssh -L 8080:127.0.0.1:8080 HOST""",
    "report": """example:
  llrd-search report --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --out reports/sst2-minilm""",
}


# --------------------------------------------------------------------------- helpers


def _threads_per_worker(workers: int, threads: int | None) -> int:
    return threads or max(1, (os.cpu_count() or 1) // max(1, workers))


def _storage_url(args: argparse.Namespace, spec: Any) -> str:
    from .spec import default_storage

    return args.storage or spec.study.storage or default_storage(args.study_file)


def _trial_line(t: Any) -> str:
    p = t.params
    acc = f"acc={t.value:.4f}" if t.value is not None else "acc=-"
    lr = f"base_lr={p.get('base_lr', float('nan')):.2e} head_lr={p.get('head_lr', float('nan')):.2e} decay={p.get('decay', float('nan')):.3f}"
    extra = f" ({t.user_attrs.get('fail_reason')})" if t.state.name == "FAIL" else ""
    secs = t.user_attrs.get("wall_seconds")
    took = f" in {secs:.0f}s" if secs else ""
    return f"trial {t.number} {t.state.name} {acc} {lr}{took}{extra}"


def _preflight(spec: Any) -> Any:
    """Load data, tokenizer and model and map the LR groups before anything is written to storage,
    so a bad study file or dataset fails with one line and leaves no half-made study behind."""
    from .exceptions import ModelError
    from .objective import Objective
    from .param_groups import build_param_groups
    from .train import fresh_model

    objective = Objective(spec)
    try:
        build_param_groups(fresh_model(objective.template, 0), base_lr=1e-5, decay=0.9, head_lr=1e-5)
    except ModelError as err:
        raise ModelError(f"model.name: '{spec.model.name}': {err}") from None
    return objective


class _Progress:
    """Trials done/total, best accuracy, ETA; a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int, best: float | None):
        self.total, self.done, self.best = total, done, best
        self.t0 = time.time()
        self.start_done = done
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[best]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("trials", total=total, completed=done, best=self._best())
            self.step_task = self.bar.add_task("current trial", total=1, completed=0, best="", visible=False)
            self.bar.start()

    def _best(self) -> str:
        return f"best acc {self.best:.4f}" if self.best is not None else "best acc -"

    def step(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.step_task, total=total, completed=step, visible=True)

    def update(self, done: int, best: float | None, line: str | None = None) -> None:
        self.done, self.best = done, best
        if self.bar is not None:
            if line:
                self.bar.console.print(line, highlight=False)
            self.bar.update(self.task, completed=done, best=self._best())
        elif line:
            rate = (time.time() - self.t0) / max(1, done - self.start_done)
            eta = rate * max(0, self.total - done)
            print(f"[{done}/{self.total}] {line} | {self._best()} | ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _best_value(study: Any) -> float | None:
    values = [t.value for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    return max(values) if values else None


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from .spec import load_spec

    for path in args.study_files:
        spec = load_spec(path)
        print(f"{path}: ok (study '{spec.study.name}', {spec.study.n_trials} trials, sampler {spec.study.sampler})")
    return 0


def _create(args: argparse.Namespace, spec: Any) -> tuple[Any, str, bool]:
    from .storage import create_study, mask_url, open_storage

    url = _storage_url(args, spec)
    storage = open_storage(url)
    study, created = create_study(spec, storage, args.n_trials)
    word = "created" if created else "resumed"
    print(f"{word} study '{spec.study.name}' in {mask_url(url)}", file=sys.stderr)
    return study, url, created


def cmd_create(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .storage import mask_url, shareable_url

    spec = load_spec(args.study_file)
    _preflight(spec)
    _study, url, _ = _create(args, spec)
    shared, has_password = shareable_url(url)
    print("start workers (same command on every machine or GPU):")
    print(f"  llrd-search worker --storage '{shared}' --study {spec.study.name}")
    if has_password:
        print(f"(password left out: export PGPASSWORD=... or add it to ~/.pgpass on each machine; {mask_url(url)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .train import set_threads

    spec = load_spec(args.study_file)
    threads = _threads_per_worker(args.workers, args.threads)
    set_threads(threads)
    objective = _preflight(spec)
    study, url, _ = _create(args, spec)
    budget = int(study.user_attrs["llrd:n_trials"])
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    progress = _Progress(budget, done, _best_value(study))
    try:
        if args.workers <= 1:
            from .worker import run_worker

            objective.on_step = progress.step

            def on_end(st: Any, trial: Any) -> None:
                progress.update(sum(t.state.name in ("COMPLETE", "PRUNED") for t in st.get_trials(deepcopy=False)), _best_value(st), _trial_line(trial))

            run_worker(url, spec.study.name, objective_factory=lambda _spec: objective, on_trial_end=on_end)
        else:
            del objective  # workers load their own copy; free the parent's memory
            _run_local_workers(url, spec.study.name, args.workers, threads, progress)
    finally:
        progress.close()
    return _summary(url, spec.study.name)


def _run_local_workers(url: str, name: str, workers: int, threads: int, progress: _Progress) -> None:
    from .storage import open_storage, shareable_url

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # The password goes to the workers through libpq's PGPASSWORD, not argv (which `ps` shows to every user).
    child_url, has_password = shareable_url(url)
    if has_password:
        from sqlalchemy.engine import make_url

        env["PGPASSWORD"] = str(make_url(url).password)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llrd_search", "worker", "--storage", child_url, "--study", name, "--worker-index", str(i), "--threads", str(threads), "--quiet"],
            env=env,
        )
        for i in range(workers)
    ]
    storage = open_storage(url)
    seen: set[int] = set()
    try:
        import optuna

        study = optuna.load_study(study_name=name, storage=storage)
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            trials = study.get_trials(deepcopy=False)
            for t in trials:
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    progress.update(sum(x.state.name in ("COMPLETE", "PRUNED") for x in trials), _best_value(study), _trial_line(t))
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too, but `kill PID` / SIGTERM reached only us: pass it on, then
        # give them time to mark their trials FAIL (a second signal is harmless: they defer it).
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        storage.engine.dispose()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise LLRDSearchError(f"{len(failed)} of {workers} workers exited with an error (see their messages above)")


def _summary(url: str, name: str) -> int:
    from .storage import load_study, open_storage

    study = load_study(open_storage(url), name)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        print("no trial completed", file=sys.stderr)
        return 1
    best = max(complete, key=lambda t: t.value)
    print(f"best: trial {best.number} accuracy {best.value:.4f} base_lr={best.params['base_lr']:.3g} head_lr={best.params['head_lr']:.3g} decay={best.params['decay']:.3f}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .train import set_threads
    from .worker import run_worker

    set_threads(args.threads)
    # Quiet children of `run --workers K`: the parent already prints each finished trial.
    on_end = None if args.quiet else (lambda _s, t: print(_trial_line(t), file=sys.stderr, flush=True))
    n = run_worker(args.storage, args.study, worker_index=args.worker_index, on_trial_end=on_end)
    if not args.quiet:
        print(f"worker done: ran {n} trials; the study's budget is spent", file=sys.stderr)
    return 0


def status_data(url: str, name: str) -> dict[str, Any]:
    from .storage import BUDGET_ATTR, load_study, mask_url, open_storage

    storage = open_storage(url)
    study = load_study(storage, name)
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    seconds = sum(t.user_attrs.get("wall_seconds", 0) for t in trials)
    storage.engine.dispose()
    return {
        "study": name,
        "storage": mask_url(url),
        "budget": int(study.user_attrs.get(BUDGET_ATTR, 0)),
        "finished": counts.get("COMPLETE", 0) + counts.get("PRUNED", 0),
        "states": counts,
        "compute_seconds": round(seconds, 1),
        "best": None
        if best is None
        else {"trial": best.number, "accuracy": best.value, "params": best.params, "train_examples_per_second": best.user_attrs.get("train_examples_per_second")},
        "running": [{"trial": t.number, "worker": t.user_attrs.get("worker"), "params": t.params} for t in trials if t.state.name == "RUNNING"],
    }


def cmd_status(args: argparse.Namespace) -> int:
    data = status_data(args.storage, args.study)
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {data['study']}  ({data['storage']})", show_header=False)
    table.add_row("finished / budget", f"{data['finished']} / {data['budget']}")
    for state, n in sorted(data["states"].items()):
        table.add_row(state.lower(), str(n))
    table.add_row("compute", f"{data['compute_seconds'] / 60:.1f} min")
    if data["best"]:
        b = data["best"]
        p = b["params"]
        table.add_row("best", f"trial {b['trial']}: accuracy {b['accuracy']:.4f}")
        table.add_row("best params", f"base_lr {p['base_lr']:.3g}, head_lr {p['head_lr']:.3g}, decay {p['decay']:.3f}")
    for r in data["running"]:
        table.add_row(f"running #{r['trial']}", str(r["worker"]))
    Console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .storage import mask_url

    written = write_report(args.storage, args.study, args.out)
    print(f"report of study '{args.study}' in {mask_url(args.storage)}:", file=sys.stderr)
    for path in written.values():
        print(path)
    return 0



def _confirm_workers(args: argparse.Namespace, threads: int) -> Callable[[str], None]:
    """Run the linked study's queued runs: in this process (K=1) or K local worker processes."""

    def run(name: str) -> None:
        from .storage import load_study, open_storage

        storage = open_storage(args.storage)
        study = load_study(storage, name)
        budget = int(study.user_attrs["llrd:n_trials"])
        done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
        progress = _Progress(budget, done, _best_value(study))
        storage.engine.dispose()
        try:
            if args.workers <= 1:
                from .confirm import retry_hook
                from .objective import Objective
                from .worker import run_worker

                hook = retry_hook(args.storage, name)

                def on_end(st: Any, trial: Any) -> None:
                    hook(st, trial)
                    progress.update(sum(t.state.name in ("COMPLETE", "PRUNED") for t in st.get_trials(deepcopy=False)), _best_value(st), _trial_line(trial))

                run_worker(args.storage, name, objective_factory=lambda spec: Objective(spec, on_step=progress.step), on_trial_end=on_end)
            else:
                _run_local_workers(args.storage, name, args.workers, threads, progress)
        finally:
            progress.close()

    return run


def _lrs(p: dict[str, float]) -> str:
    return f"base_lr={p['base_lr']:.3g} head_lr={p['head_lr']:.3g} decay={p['decay']:.3f}"


def cmd_confirm(args: argparse.Namespace) -> int:
    from .confirm import run_confirmation, verdict
    from .train import set_threads

    for key in ("top", "seeds"):
        if getattr(args, key) < 1:
            raise LLRDSearchError(f"--{key}: must be >= 1 (got {getattr(args, key)})")
    threads = _threads_per_worker(args.workers, args.threads)
    set_threads(threads)
    plan, summary = run_confirmation(args.storage, args.study, args.top, args.seeds, _confirm_workers(args, threads))
    v = verdict(summary)
    if args.format == "json":
        # NaN (a configuration with no finished run) is not JSON: null instead.
        clean = [{k: (None if isinstance(x, float) and x != x else x) for k, x in r.items()} for r in summary]
        print(json.dumps({"study": plan.study_name, "configurations": clean, "verdict": v}, indent=2))
        return 0 if v else 1
    if plan.note:
        print(f"note: {plan.note}", file=sys.stderr)
    print(f"confirmation of '{args.study}': {len(plan.sources)} configuration(s) x {plan.seeds} seed(s), runs in study '{plan.study_name}'")
    for r in summary:
        conf = f"{r['mean']:.4f} ± {r['std']:.4f} (n={r['n']})" if r["n"] else "no finished run"
        failed = f", {r['n_failed']} failed" if r["n_failed"] else ""
        print(f"  trial {r['source_trial']:>4}  {_lrs(r['params'])}  search {r['search_accuracy']:.4f}  confirmed {conf}{failed}")
    if v is None:
        print("no confirmation run finished; run the same command again to resume", file=sys.stderr)
        return 1
    win = next(r for r in summary if r["source_trial"] == v["winner"])
    print(f"winner: trial {v['winner']} ({_lrs(win['params'])}): {v['mean']:.4f} ± {v['std']:.4f} over {v['n']} seed(s)")
    if v["runner_up"] is None:
        print("only one configuration finished: nothing to compare it with")
    elif v["noise"] is None:
        print(f"its lead over trial {v['runner_up']} is {v['lead']:.4f}; with one run each noise cannot be judged (use --seeds 3 or more)")
    elif v["within_noise"]:
        print(
            f"its lead over trial {v['runner_up']} ({v['lead']:.4f}) is WITHIN NOISE (below the 95 % Welch threshold {v['noise']:.4f}): "
            "noise could explain it; either is a fine choice, or add seeds/data to separate them"
        )
    else:
        print(f"its lead over trial {v['runner_up']} ({v['lead']:.4f}) exceeds the 95 % Welch threshold ({v['noise']:.4f}): unlikely to be noise")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_config, render

    fmt = args.format or ("yaml" if args.out and Path(args.out).suffix in (".yaml", ".yml") else "json")
    config = export_config(args.storage, args.study)
    text = render(config, fmt)
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if not out.parent.is_dir():
        raise LLRDSearchError(f"--out: folder {out.parent} does not exist")
    out.write_text(text, encoding="utf-8")
    extra = f", confirmed {config['confirmed']['mean']:.4f} ± {config['confirmed']['std']:.4f}" if config["confirmed"] else ""
    print(f"wrote {out}: trial {config['trial']} ({_lrs(config)}), validation accuracy {config['validation_accuracy']:.4f}{extra}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .finetune import step_progress, train_from_config
    from .train import set_threads

    for key in ("epochs", "train_limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise LLRDSearchError(f"--{key.replace('_', '-')}: must be >= 1 (got {getattr(args, key)})")
    set_threads(args.threads)
    with step_progress("training") as on_step:
        m = train_from_config(args.config, args.out, epochs=args.epochs, train_limit=args.train_limit, force=args.force, on_step=on_step)
    test = f", test accuracy {m['test_accuracy']:.4f}" if m["test_accuracy"] is not None else ""
    print(f"saved the model to {args.out}: validation accuracy {m['validation_accuracy']:.4f}{test} ({m['n_train']} training examples, {m['seconds']:.0f}s)")
    print(f"load it with: AutoModelForSequenceClassification.from_pretrained({str(args.out)!r})")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import serve

    try:
        serve(args.storage, args.host, args.port, say=lambda line: print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True))
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="llrd-search",
        description="Search layer-wise learning-rate decay (LLRD) settings for fine-tuning BERT-like encoders.",
        epilog="example:\n  llrd-search run studies/sst2-minilm.toml\n\nrun 'llrd-search COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llrd-search {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOGS.get(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        commands[name] = func
        return p

    storage_help = "SQLAlchemy URL of the study storage (default: SQLite file beside the study file)"
    p = add("run", cmd_run, "Create or resume a study and run trials until its budget is spent.")
    p.add_argument("study_file", metavar="STUDY.toml")
    p.add_argument("--storage", metavar="URL", help=storage_help)
    p.add_argument("--workers", type=int, default=1, metavar="K", help="local worker processes (default 1)")
    p.add_argument("--n-trials", type=int, metavar="N", help="study-wide budget, overriding study.n_trials")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / K)")

    p = add("create", cmd_create, "Create the study (validating data and model first) and print the worker command.")
    p.add_argument("study_file", metavar="STUDY.toml")
    p.add_argument("--storage", metavar="URL", help=storage_help)
    p.add_argument("--n-trials", type=int, metavar="N", help="study-wide budget, overriding study.n_trials")

    p = add("worker", cmd_worker, "Join a study and run trials until its budget is spent.")
    p.add_argument("--storage", required=True, metavar="URL", help="storage URL of the study")
    p.add_argument("--study", required=True, metavar="NAME", help="study name")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's choice)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    p = add("status", cmd_status, "Show a study's progress, trial states and best trial.")
    p.add_argument("--storage", required=True, metavar="URL")
    p.add_argument("--study", required=True, metavar="NAME")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("validate", cmd_validate, "Check study files without touching data, model or storage.")
    p.add_argument("study_files", nargs="+", metavar="STUDY.toml")

    p = add("report", cmd_report, "Write a study's plots, summary.md and a self-contained report.html.")
    p.add_argument("--storage", required=True, metavar="URL", help="storage URL of the study")
    p.add_argument("--study", required=True, metavar="NAME", help="study name")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, summary.md and the PNGs (created if missing)")

    p = add("confirm", cmd_confirm, "Re-run the top-K configurations with S fresh seeds each and report mean ± std.")
    p.add_argument("--storage", required=True, metavar="URL", help="storage URL of the study")
    p.add_argument("--study", required=True, metavar="NAME", help="study name (the search)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="configurations to confirm (default 3)")
    p.add_argument("--seeds", type=int, default=5, metavar="S", help="fresh seeds per configuration (default 5)")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="local worker processes (default 1)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / K)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("export", cmd_export, "Write the best configuration (after confirmation when it exists) as JSON or YAML.")
    p.add_argument("--storage", required=True, metavar="URL", help="storage URL of the study")
    p.add_argument("--study", required=True, metavar="NAME", help="study name")
    p.add_argument("--format", choices=["json", "yaml"], help="default: from --out's suffix, else json")
    p.add_argument("--out", metavar="FILE", help="file to write (default: stdout)")

    p = add("train", cmd_train, "Fine-tune with an exported config on the full training data and save the model.")
    p.add_argument("config", metavar="CONFIG", help="file written by 'llrd-search export' (.json/.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model, tokenizer and metrics.json")
    p.add_argument("--epochs", type=int, metavar="N", help="override the config's train.epochs")
    p.add_argument("--train-limit", type=int, metavar="N", help="train on a stratified sample of N examples (default: all)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")

    p = add("dashboard", cmd_dashboard, "Serve optuna-dashboard on the study storage (127.0.0.1 unless --host says otherwise).")
    p.add_argument("--storage", required=True, metavar="URL", help="storage URL of the studies")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the dashboard has no login)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    return parser


def _positive(args: argparse.Namespace) -> None:
    for key in ("workers", "n_trials", "threads"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise LLRDSearchError(f"--{key.replace('_', '-')}: must be >= 1 (got {value})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGTERM (kill, Slurm, Kubernetes) stops a command like Ctrl-C: trials marked, exit 130.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        _positive(args)
        return args.func(args)
    except LLRDSearchError as err:
        if args.debug:
            raise
        print(f"Error: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: running trials were marked FAIL; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
