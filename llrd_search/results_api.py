"""The search layer's second half: what a finished search turns into, as typed calls.

:func:`report` writes the plots and summaries, :func:`export` the best configuration as a file,
:func:`train` fine-tunes with that file (:mod:`confirm_api`'s :func:`confirm` re-runs the best
configurations with fresh seeds first). Each takes typed arguments and returns a dataclass; the CLI (``cli_results``) only
parses, calls one of them and prints. :mod:`search` re-exports them, so a script reads
``from llrd_search import search; search.confirm(...)``. Like the CLI's commands they raise
:class:`LLRDSearchError` subclasses whose one-line messages name the option to fix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llrd_search.exceptions import LLRDSearchError
from llrd_search.records import DecayInterval, ReportVerdict


def at_least_one(**values: int | None) -> None:
    """A one-line error naming the first option below 1 (None: not given)."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise LLRDSearchError(f"--{key.replace('_', '-')}: must be >= 1 (got {value})")


# --------------------------------------------------------------------------- the study file as handle


def resolve_study(study_file: str | Path | None, storage: str | None = None, study: str | None = None) -> tuple[str, str]:
    """(storage URL, study name) of a study: ``storage`` and ``study`` when given, the rest read from
    ``study_file`` as ``run`` reads it (``study.storage``, else the SQLite file beside it; ``study.name``)."""
    if study_file is not None and (storage is None or study is None):
        from llrd_search.search import storage_url
        from llrd_search.spec import load_spec

        spec = load_spec(study_file)
        return storage_url(study_file, spec, storage), study or spec.study.name
    if storage is None or study is None:
        missing = " and ".join(f"--{k}" for k, v in (("storage", storage), ("study", study)) if v is None)
        raise LLRDSearchError(f"pass the study file, or {missing}")
    return storage, study


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """The files ``report`` wrote (name → path: html, summary, summary_json and one per figure) and
    what its ``summary.json`` says."""

    study: str
    storage: str  # the URL, password masked
    metric: str
    files: dict[str, Path]
    verdict: ReportVerdict
    decay_interval: DecayInterval | None
    summary: dict[str, Any] = field(repr=False)  # summary.json as written

    @property
    def html(self) -> Path:
        return self.files["html"]


def report(storage: str, study: str, out: str | Path, *, study_file: str | Path | None = None) -> Report:
    """Write ``study``'s plots, ``summary.md``, ``summary.json`` and a self-contained ``report.html`` into ``out``
    (``study_file``: the report shows paths relative to its folder)."""
    import json

    from llrd_search.results import report as reporting
    from llrd_search.study.storage import mask_url

    files = reporting.write_report(storage, study, out, study_file=study_file)
    data = json.loads(files["summary_json"].read_text(encoding="utf-8"))
    v, interval = data["verdict"], data["decay_interval"]
    return Report(
        study=study,
        storage=mask_url(storage),
        metric=data["metric"],
        files=files,
        verdict=ReportVerdict(gain=v["gain"], ci95=v["ci95"], n_seeds=v["n_seeds"], confirmed=v["confirmed"], text=v["text"]),
        decay_interval=DecayInterval(interval[0], interval[1], data["decay_interval_method"]) if interval else None,
        summary=data,
    )


# --------------------------------------------------------------------------- export


@dataclass
class Exported:
    """The best (confirmed) configuration as ``export`` wrote it: the document, its text, the file."""

    config: dict[str, Any]  # the document (see README: trial, metric, base_lr, head_lr, decay, groups, ...)
    text: str  # rendered as ``format``
    format: str  # "json" or "yaml"
    out: Path | None  # the file written; None: nothing written

    @property
    def trial(self) -> int:
        """The trial of ``config["arm_study"]``: the search, or its control arm ``NAME.control``."""
        return self.config["trial"]

    @property
    def arm(self) -> str:
        """Which arm the configuration comes from: "llrd", or "control" when the ξ = 1 arm won (plain fine-tuning, decay 1.0)."""
        return self.config["arm"]

    @property
    def validation_score(self) -> float:
        return self.config["validation_score"]

    @property
    def params(self) -> dict[str, float]:
        from llrd_search.vocab import PARAMS

        return {p: self.config[p] for p in PARAMS}

    @property
    def confirmed(self) -> dict[str, Any] | None:
        """mean, std, n and accuracies of the confirmation runs; None: chosen by the search alone."""
        return self.config["confirmed"]


def export(storage: str, study: str, *, out: str | Path | None = None, format: str | None = None) -> Exported:
    """The best configuration of ``study`` over both arms (:func:`arms.overall_best`: the confirmation
    winner when there is one; the control arm's when it beat LLRD), rendered as
    ``format`` (default: YAML for an ``out`` ending .yaml/.yml, else JSON) and written to ``out`` if given."""
    from llrd_search.results.export import export_config, render

    fmt = format or ("yaml" if out and Path(out).suffix in (".yaml", ".yml") else "json")
    if fmt not in ("json", "yaml"):
        raise LLRDSearchError(f"--format: '{fmt}' is not one of json, yaml")
    path = Path(out) if out else None
    if path is not None:
        _check_writable(path)  # before the export loads the model: fail in a second, not a minute
    config = export_config(storage, study)
    text = render(config, fmt)
    if path is not None:
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as err:
            raise LLRDSearchError(f"--out: cannot write {path}: {err.strerror}; pick a writable path") from None
    return Exported(config, text, fmt, path)


def _check_writable(out: Path) -> None:
    """``out`` names a file we can write: not a folder, in an existing folder that takes files."""
    if out.is_dir():
        raise LLRDSearchError(f"--out: {out} is a folder; pass a file name, e.g. {out / 'best.json'}")
    if not out.parent.is_dir():
        raise LLRDSearchError(f"--out: folder {out.parent} does not exist")
    if out.exists() and not os.access(out, os.W_OK):
        raise LLRDSearchError(f"--out: cannot write {out}: it is read-only; pick a writable path")
    try:  # the folder's permissions and a read-only mount only show when we try
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".llrd-write-check-")
    except OSError as err:
        raise LLRDSearchError(f"--out: cannot write {out}: {err.strerror} (folder {out.parent}); pick a writable path") from None
    os.close(fd)
    os.unlink(probe)


# --------------------------------------------------------------------------- train


@dataclass
class Trained:
    """A model fine-tuned with an exported config and saved in ``out`` (with ``metrics.json``)."""

    out: Path
    metrics: dict[str, Any] = field(repr=False)  # metrics.json as written

    @property
    def validation_accuracy(self) -> float:
        return self.metrics["validation_accuracy"]

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics["test_accuracy"]


def train(
    config: str | Path,
    out: str | Path,
    *,
    storage: str | None = None,
    study: str | None = None,
    epochs: int | None = None,
    train_limit: int | None = None,
    threads: int | None = None,
    force: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Trained:
    """Fine-tune with an exported ``config`` on all the training data (or ``train_limit`` examples)
    and save the model, tokenizer and ``metrics.json`` into ``out`` (``force``: even if not empty).
    ``config`` may also be a study file (.toml): then the study's best configuration, as ``export``
    would write it (``storage``/``study`` override what the file names)."""
    from llrd_search.engine.train import set_threads
    from llrd_search.results.export import LLRDConfig, config_from_doc, export_config
    from llrd_search.results.finetune import train_from_config

    at_least_one(epochs=epochs, train_limit=train_limit)
    chosen: str | Path | LLRDConfig = config
    if Path(config).suffix == ".toml":
        url, name = resolve_study(config, storage, study)
        chosen = config_from_doc(export_config(url, name), source=f"{config} (the best configuration of study '{name}')")
    elif storage is not None or study is not None:
        raise LLRDSearchError(f"--storage/--study: only with a study file (.toml); {config} is an exported config, which names its own settings")
    set_threads(threads)
    metrics = train_from_config(chosen, out, epochs=epochs, train_limit=train_limit, force=force, on_step=on_step)
    return Trained(Path(out), metrics)
