"""The study file as every command's handle: ``llrd-search confirm sst2.toml`` reads the storage and
the study name from the file as ``run`` does; ``--storage``/``--study`` still work and win when given.
Also the "next:" lines ``run`` and ``confirm`` end with, in the form the user typed."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from llrd_search.exceptions import LLRDSearchError

# The commands whose STUDY.toml is a handle only (run, create and validate read the whole study file).
HANDLE_COMMANDS = ("worker", "status", "report", "confirm", "export", "dashboard")
FILE_HELP = "the study file: its storage and study name are read from it, as run reads them"


def add_handle(p: argparse.ArgumentParser, *, study: bool = True, what: str = "the study") -> None:
    """The optional positional ``STUDY.toml`` and the ``--storage``/``--study`` that override it."""
    p.add_argument("study_file", nargs="?", metavar="STUDY.toml", help=FILE_HELP)
    p.add_argument("--storage", metavar="URL", help=f"storage URL of {what} (default: the study file's, as run uses it)")
    if study:
        p.add_argument("--study", metavar="NAME", help="study name (default: the study file's study.name)")


def resolve_handle(args: argparse.Namespace) -> None:
    """Fill ``args.storage`` (and ``args.study``) from ``args.study_file``; a one-line error naming
    the file when it is missing or unreadable, or naming what to pass when nothing was given."""
    if args.command not in HANDLE_COMMANDS:
        return
    args.typed = {"storage": args.storage, "study": getattr(args, "study", None)}  # what next_lines repeats
    if not hasattr(args, "study"):  # dashboard: a storage only
        if args.storage is None:
            if args.study_file is None:
                raise LLRDSearchError("pass the study file (e.g. llrd-search dashboard sst2.toml), or --storage URL")
            from llrd_search.search import storage_url
            from llrd_search.spec import load_spec

            args.storage = storage_url(args.study_file, load_spec(args.study_file))
        return
    from llrd_search.results_api import resolve_study

    try:
        args.storage, args.study = resolve_study(args.study_file, args.storage, args.study)
    except LLRDSearchError as err:
        if args.study_file is None and "pass the study file" in str(err):
            raise LLRDSearchError(f"{err} (e.g. llrd-search {args.command} sst2.toml)") from None
        raise


def default_out(args: argparse.Namespace, suffix: str) -> Path:
    """``--out`` beside the study file: ``studies/sst2.toml`` → ``studies/sst2-report`` (``suffix`` "-report")."""
    study_file = getattr(args, "study_file", None) or getattr(args, "config", None)
    if study_file is None or Path(study_file).suffix != ".toml":
        raise LLRDSearchError("--out: required unless a study file is given (its default is a folder beside the study file)")
    path = Path(study_file)
    return path.with_name(path.stem + suffix)


def handle_words(args: argparse.Namespace, study_file: str | None) -> list[str]:
    """How the user named the study: the study file (plus an explicit --storage/--study), else the flags."""
    from llrd_search.study.storage import shareable_url

    typed = getattr(args, "typed", {"storage": args.storage, "study": getattr(args, "study", None)})
    words = [study_file] if study_file else []
    storage = typed["storage"] if study_file else args.storage
    if storage:
        words += ["--storage", shareable_url(storage)[0]]  # never echo a password
    study = typed["study"] if study_file else getattr(args, "study", None)
    if study:
        words += ["--study", study]
    return words


def next_lines(args: argparse.Namespace, *commands: str, study_file: str | None = None) -> list[str]:
    """``next: llrd-search confirm sst2.toml`` and one line per further command, each ready to paste.
    A command may carry options after the handle: ``"export --out best.json"``."""
    handle = handle_words(args, study_file if study_file is not None else getattr(args, "study_file", None))
    lines = []
    for i, command in enumerate(commands):
        name, *rest = command.split()
        line = shlex.join(["llrd-search", name, *handle, *rest])
        lines.append(("next: " if i == 0 else "      ") + line)
    return lines
