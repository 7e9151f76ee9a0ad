"""``llrd-search`` command line: the parser and ``main``. The library raises; ``main`` alone turns
errors into ``Error: ...`` lines and exit codes (no traceback unless ``--debug``). The commands
live in :mod:`cli_search` and :mod:`cli_results`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable

from llrd_search.cli.handle import add_handle, resolve_handle
from llrd_search.cli.result_cmds import cmd_confirm, cmd_dashboard, cmd_export, cmd_report, cmd_train
from llrd_search.cli.search_cmds import cmd_create, cmd_init, cmd_proxy, cmd_run, cmd_status, cmd_validate, cmd_worker
from llrd_search.exceptions import LLRDSearchError, UsageError

log = logging.getLogger("llrd_search")

EPILOGS = {
    "init": """example:
  llrd-search init --model sentence-transformers/all-MiniLM-L6-v2 --data studies/data/trec --out trec.toml
  llrd-search run trec.toml""",
    "run": """example:
  llrd-search run studies/sst2-minilm.toml
  llrd-search run studies/sst2-minilm.toml --workers 1 --threads 2 --storage sqlite:///sst2.db
on a GPU machine run uses every visible GPU; here 2 workers on each of GPUs 2 and 3:
  CUDA_VISIBLE_DEVICES=2,3 llrd-search run studies/sst2-minilm.toml --workers-per-gpu 2""",
    "create": """example:
  llrd-search create studies/sst2-minilm.toml --storage postgresql+psycopg://user:pass@db:5432/llrd""",
    "worker": """example (the study file names the storage and the study, as for run):
  llrd-search worker studies/sst2-minilm.toml
one per GPU or machine, all with the same URL:
  llrd-search worker --storage postgresql+psycopg://user:pass@db:5432/llrd --study sst2-minilm
  llrd-search worker --storage postgresql+psycopg://user:pass@db:5432/llrd --study sst2-minilm --gpu 3
with your own training code (a function(trial) -> float in my_training.py, in the current directory):
  llrd-search worker --storage sqlite:///trec.db --study trec-minilm --objective my_training:objective""",
    "proxy": """example (one proxy beside the database; hundreds of workers talk to it instead of to PostgreSQL):
  llrd-search proxy --storage postgresql+psycopg://user@db:5432/llrd --host 0.0.0.0 --port 13000
  llrd-search worker --storage grpc://proxy-host:13000 --study sst2-minilm
(every command that takes --storage accepts grpc://HOST:PORT; needs pip install 'llrd-search[grpc]')""",
    "status": """example:
  llrd-search status studies/sst2-minilm.toml
  llrd-search status studies/sst2-minilm.toml --format json
  llrd-search status --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm
  (--storage/--study instead of the study file, or to override what it names)""",
    "validate": """example:
  llrd-search validate studies/sst2-minilm.toml
  llrd-search validate studies/*.toml --spec-only   (the study files alone, without data or models)""",
    "confirm": """example:
  llrd-search confirm studies/sst2-minilm.toml
  llrd-search confirm studies/sst2-minilm.toml --top 3 --seeds auto --max-seeds 10
  llrd-search confirm studies/sst2-minilm.toml --seeds auto --decay-sweep 1.0,0.9,0.8 --sweep-seeds 5
  llrd-search confirm studies/sst2-minilm.toml --workers-per-gpu 2
  llrd-search confirm --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --top 3 --seeds 5
  (runs go to the linked study sst2-minilm.confirm; more machines can help with:
   llrd-search worker studies/sst2-minilm.toml --study sst2-minilm.confirm)""",
    "export": """example:
  llrd-search export studies/sst2-minilm.toml --out best.json
  llrd-search export studies/sst2-minilm.toml --format yaml
  llrd-search export --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --out best.json
then in Python:
  optimizer = torch.optim.AdamW(llrd_search.load_config("best.json").param_groups(model))""",
    "train": """example:
  llrd-search train studies/sst2-minilm.toml   (the study's best configuration, into studies/sst2-minilm-model/)
  llrd-search train best.json --out models/sst2-minilm
  llrd-search train best.json --out /tmp/smoke --epochs 1 --train-limit 200   (a quick check)""",
    "dashboard": """example:
  llrd-search dashboard studies/sst2-minilm.toml
  llrd-search dashboard studies/sst2-minilm.toml --port 8081
  llrd-search dashboard --storage sqlite:///studies/sst2-minilm.db
from another machine, tunnel instead of --host 0.0.0.0:  ssh -L 8080:127.0.0.1:8080 HOST""",
    "report": """example:
  llrd-search report studies/sst2-minilm.toml   (writes studies/sst2-minilm-report/)
  llrd-search report --storage sqlite:///studies/sst2-minilm.db --study sst2-minilm --out reports/sst2-minilm""",
}


# What a Ctrl-C / SIGTERM left behind, per command: only run, worker and confirm run trials.
INTERRUPTED = {
    "run": "running trials were marked FAIL and re-queued with their parameters; run the same command again to resume",
    "worker": "its running trials were marked FAIL and re-queued with their parameters; run the same command again to resume",
    "confirm": "running confirmation runs were marked FAIL; run the same command again to resume",
    "create": "no trial had started; run the same command again to finish creating the study",
    "report": "the report may be incomplete; run the same command again to write it",
    "export": "nothing was exported; run the same command again",
    "proxy": "the proxy stopped; its workers retry for 2 minutes, so start it again now",
    "train": "training stopped before the model was saved; run the same command again (with --force if --out is not empty)",
}
INTERRUPTED_DEFAULT = "nothing was changed"

OBJECTIVE_HELP = (
    "your own objective, package.module:function taking an Optuna trial and returning the metric to maximize "
    "(imported from the current directory; default: the study's train.objective, else the built-in loop)"
)

WORKERS_PER_GPU_HELP = (
    "on a CUDA machine, workers on each visible GPU (default auto: as many as the smallest GPU's free memory holds "
    "by the model's estimated memory per trial, at most 4), each pinned with CUDA_VISIBLE_DEVICES; e.g. --workers-per-gpu 2"
)


def _per_gpu(value: str) -> int | str:
    from llrd_search.study.gpus import parse_workers_per_gpu

    try:
        return parse_workers_per_gpu(value)
    except LLRDSearchError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--workers-per-gpu: ")) from None


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Argument errors in the ``Error: ...`` form of every other error (one line, exit 2, the
    :class:`UsageError` code), the usage hint after it, instead of argparse's usage block; the
    sub-parsers are made of this class too. Still a ``SystemExit``, as argparse's callers expect."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"Error: {_one_line(f'{self.prog}: {message}')}; see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(UsageError.exit_code)


def _seeds(text: str) -> int | str:
    """``--seeds``: a count, or "auto" (sequential confirmation)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from llrd_search import __version__

    parser = _Parser(
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

    p = add("init", cmd_init, "Inspect a data folder and a model and write a commented study file that runs as is.")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="hub id or local model directory")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of split files (train.csv, validation.csv, test.csv; csv/json/jsonl/parquet)")
    p.add_argument("--out", default="study.toml", metavar="FILE", help="study file to write (default: study.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    storage_help = "SQLAlchemy URL of the study storage (default: SQLite file beside the study file)"
    p = add("run", cmd_run, "Create or resume a study and run trials until its budget is spent.")
    p.add_argument("study_file", metavar="STUDY.toml")
    p.add_argument("--storage", metavar="URL", help=storage_help)
    p.add_argument(
        "--workers", type=int, metavar="K",
        help="local worker processes in all (default: $LLRD_SEARCH_WORKERS, else on a CPU one per core with 1 thread each, "
        "at most 8 and as many as memory holds; on a GPU machine --workers-per-gpu on every GPU; K given: round-robin over the GPUs)",
    )
    p.add_argument("--workers-per-gpu", type=_per_gpu, metavar="N|auto", help=WORKERS_PER_GPU_HELP)
    p.add_argument("--n-trials", type=int, metavar="N", help="study-wide budget, overriding study.n_trials")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / K)")

    p = add("create", cmd_create, "Create the study (validating data and model first) and print the worker command.")
    p.add_argument("study_file", metavar="STUDY.toml")
    p.add_argument("--storage", metavar="URL", help=storage_help)
    p.add_argument("--n-trials", type=int, metavar="N", help="study-wide budget, overriding study.n_trials")

    p = add("worker", cmd_worker, "Join a study and run trials until its budget is spent.")
    add_handle(p)
    p.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's choice)")
    p.add_argument("--objective", metavar="MODULE:FUNCTION", help=OBJECTIVE_HELP)
    p.add_argument("--gpu", metavar="ID", help="run on this GPU only: sets CUDA_VISIBLE_DEVICES=ID for this worker (an index as "
                   "nvidia-smi shows it, or a GPU UUID), replacing any CUDA_VISIBLE_DEVICES already set")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    p = add("proxy", cmd_proxy, "Serve a study storage to workers through a gRPC proxy (one set of database connections for the fleet).")
    p.add_argument("--storage", required=True, metavar="URL", help="database URL to serve (postgresql+psycopg://... or sqlite:///...)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the proxy has no login)")
    p.add_argument("--port", type=int, default=13000, help="port (default 13000)")

    p = add("status", cmd_status, "Show a study's progress, trial states and best trial.")
    add_handle(p)
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("validate", cmd_validate, "Check study files, their data, tokenizer, model and storage URL as create does, writing nothing; "
                                      "estimate a trial's memory.")
    p.add_argument("study_files", nargs="+", metavar="STUDY.toml")
    p.add_argument("--spec-only", action="store_true", help="check the study files alone: keys, values and the memory estimate from "
                   "config.json, without loading data or the model (well under a second instead of the seconds a model takes)")

    p = add("report", cmd_report, "Write a study's plots, summary.md and a self-contained report.html.")
    add_handle(p)
    p.add_argument("--out", metavar="DIR", help="folder for report.html, summary.md and the PNGs, created if missing "
                   "(default: STUDY-report beside the study file)")

    p = add("confirm", cmd_confirm, "Re-run the top-K configurations with S fresh seeds each and report mean ± std.")
    add_handle(p)
    p.add_argument("--top", type=int, default=3, metavar="K", help="configurations to confirm (default 3)")
    p.add_argument("--seeds", type=_seeds, default=5, metavar="S|auto", help="fresh seeds per configuration (default 5); auto: "
                   "3, then more paired seeds for the winner and the controls in rounds until the verdict is decided "
                   "(group-sequential test, see docs/results.md)")
    p.add_argument("--max-seeds", type=int, metavar="N", help="with --seeds auto: the most paired seeds (default 10; 3 to 30)")
    p.add_argument("--min-effect", type=float, default=0.5, metavar="POINTS", help="with --seeds auto: stop when the interval "
                   "lies within ± this many points, a difference too small to matter (default 0.5; 0: never)")
    p.add_argument("--futility", type=float, default=10.0, metavar="PERCENT", help="with --seeds auto: stop to say 'cannot tell' "
                   "once the chance of deciding by --max-seeds, if the trend so far held, is below this (default 10; 0: never)")
    p.add_argument("--decay-sweep", metavar="XI,XI,...", help="also re-run the winner's base and head LR at each ξ (0 < ξ <= 1), "
                   "e.g. 1.0,0.95,0.9,0.8,0.7, with the same seeds; the winner's own ξ is added")
    p.add_argument("--sweep-seeds", type=int, metavar="N", help="with --decay-sweep: seeds per ξ, the first N of the winner's "
                   "(default: --seeds; with --seeds auto, 3)")
    p.add_argument("--workers", type=int, metavar="W", help="local worker processes in all (default: 1 on a CPU, --workers-per-gpu on every GPU)")
    p.add_argument("--workers-per-gpu", type=_per_gpu, metavar="N|auto", help=WORKERS_PER_GPU_HELP)
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per worker (default: cores / K)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--objective", metavar="MODULE:FUNCTION", help=OBJECTIVE_HELP)

    p = add("export", cmd_export, "Write the best configuration (after confirmation when it exists) as JSON or YAML.")
    add_handle(p)
    p.add_argument("--format", choices=["json", "yaml"], help="default: from --out's suffix, else json")
    p.add_argument("--out", metavar="FILE", help="file to write (default: stdout)")

    p = add("train", cmd_train, "Fine-tune with an exported config (or a study's best) on the full training data and save the model.")
    p.add_argument("config", metavar="STUDY.toml|CONFIG", help="a study file (.toml: trains the study's best configuration, "
                   "as export would write it) or a file written by 'llrd-search export' (.json/.yaml)")
    p.add_argument("--storage", metavar="URL", help="with a study file: storage URL of the study (default: the study file's)")
    p.add_argument("--study", metavar="NAME", help="with a study file: study name (default: the study file's study.name)")
    p.add_argument("--out", metavar="DIR", help="folder for the model, tokenizer and metrics.json "
                   "(default with a study file: STUDY-model beside it)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the config's train.epochs")
    p.add_argument("--train-limit", type=int, metavar="N", help="train on a stratified sample of N examples (default: all)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")

    p = add("dashboard", cmd_dashboard, "Serve optuna-dashboard on the study storage (127.0.0.1 unless --host says otherwise).")
    add_handle(p, study=False, what="the studies")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the dashboard has no login)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    return parser


def _positive(args: argparse.Namespace) -> None:
    # Before any command starts (`train` draws its bar first); the search layer checks them again for scripts.
    for key in ("workers", "n_trials", "threads", "top", "seeds", "epochs", "train_limit"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{key.replace('_', '-')}: must be >= 1 (got {value})")
    from llrd_search.spec import MAX_TRIALS

    if getattr(args, "n_trials", None) and args.n_trials > MAX_TRIALS:
        raise UsageError(f"--n-trials: {args.n_trials} trials is more than any search runs (each is a fine-tune; at most {MAX_TRIALS})")
    if args.command == "confirm" and args.seeds != "auto" and args.max_seeds is not None:
        raise UsageError(f"--max-seeds: applies only with --seeds auto (here --seeds {args.seeds} runs exactly that many); drop --max-seeds or pass --seeds auto")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or an argument error already printed
        return done.code if isinstance(done.code, int) else 0
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llrd_search.study.storage import quiet_optuna

    quiet_optuna()
    # SIGTERM (kill, Slurm, Kubernetes) stops a command like Ctrl-C: trials marked, exit 130.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        _positive(args)
        resolve_handle(args)
        return args.func(args)
    except LLRDSearchError as err:
        if args.debug:
            raise
        print(f"Error: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"interrupted: {_interrupted(args.command, getattr(err, 'trials_marked', None))}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(command: str, marked: tuple[int, int] | None) -> str:
    """What a Ctrl-C / SIGTERM left behind; for ``worker``, counted (``marked``: trials marked FAIL,
    of which re-queued, as claims.fail_interrupted records them on the interrupt)."""
    if command != "worker" or marked is None:
        return INTERRUPTED.get(command, INTERRUPTED_DEFAULT)
    n, requeued = marked
    if n == 0:
        return "no trial was running; run the same command again to resume"
    which = "its running trial was" if n == 1 else f"its {n} running trials were"
    if requeued == n:
        back = " and re-queued with its parameters" if n == 1 else " and re-queued with their parameters"
    elif requeued == 0:
        back = " (not re-queued: it had used up study.max_retries)" if n == 1 else " (not re-queued: they had used up study.max_retries)"
    else:
        back = f" ({requeued} re-queued with their parameters; {n - requeued} had used up study.max_retries)"
    return f"{which} marked FAIL{back}; run the same command again to resume"


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
