"""``llrd-search`` command line. The library raises; this module alone turns errors into
``Error: ...`` lines and exit codes (no traceback unless ``--debug``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
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
    from .objective import Objective
    from .param_groups import build_param_groups
    from .train import fresh_model

    objective = Objective(spec)
    build_param_groups(fresh_model(objective.template, 0), base_lr=1e-5, decay=0.9, head_lr=1e-5)
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
    from .storage import mask_url

    spec = load_spec(args.study_file)
    _preflight(spec)
    _study, url, _ = _create(args, spec)
    print("start workers (same command on every machine or GPU):")
    print(f"  llrd-search worker --storage '{mask_url(url)}' --study {spec.study.name}")
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
    from .storage import open_storage

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llrd_search", "worker", "--storage", url, "--study", name, "--worker-index", str(i), "--threads", str(threads), "--quiet"],
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
        # The terminal sent SIGINT to the workers too; give them time to mark their trials.
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
    n = run_worker(args.storage, args.study, worker_index=args.worker_index, on_trial_end=lambda _s, t: print(_trial_line(t), file=sys.stderr, flush=True))
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
