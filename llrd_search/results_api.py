"""The search layer's second half: what a finished search turns into, as typed calls.

:func:`confirm` re-runs the best configurations with fresh seeds, :func:`report` writes the plots
and summaries, :func:`export` the best configuration as a file, :func:`train` fine-tunes with
that file. Each takes typed arguments and returns a dataclass; the CLI (``cli_results``) only
parses, calls one of them and prints. :mod:`search` re-exports them, so a script reads
``from llrd_search import search; search.confirm(...)``. Like the CLI's commands they raise
:class:`LLRDSearchError` subclasses whose one-line messages name the option to fix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llrd_search.exceptions import LLRDSearchError
from llrd_search.records import ConfirmRow, DecayInterval, PairedVerdict, ReportVerdict, SweepRow, Verdict

if TYPE_CHECKING:  # optuna and torch are imported when first needed
    from llrd_search.records import Watcher
    from llrd_search.study.confirm import Plan


def _at_least_one(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise LLRDSearchError(f"--{key.replace('_', '-')}: must be >= 1 (got {value})")


# --------------------------------------------------------------------------- confirm


@dataclass
class Confirmation:
    """What ``confirm`` found: the confirmed rows best mean first, the verdict, and the control arm's
    paired comparison and the decay sweep when there are any."""

    plan: Plan  # the linked study (``plan.study_name``), its configurations and seeds
    configurations: list[ConfirmRow]
    verdict: Verdict | None  # None: no confirmation run finished yet
    control: ConfirmRow | None  # the control arm's best, confirmed with the same seeds
    paired: PairedVerdict | None  # LLRD vs the control, seed by seed
    sweep: list[SweepRow] | None  # None without --decay-sweep
    runs_saved: int = 0  # runs not trained: identical ones (same LRs, ξ, seeds) were already held (``reused_from``)
    plain: ConfirmRow | None = None  # ξ = 1 at the LLRD winner's LRs: the second control candidate

    @property
    def winner(self) -> ConfirmRow | None:
        if self.verdict is None:
            return None
        return next(r for r in self.configurations if r.source_trial == self.verdict.winner)

    def as_dict(self) -> dict[str, Any]:
        """What ``confirm --format json`` prints."""
        return {
            "study": self.plan.study_name,
            "configurations": [r.as_dict() for r in self.configurations],
            "verdict": None if self.verdict is None else asdict(self.verdict),
            "control": self.control.as_dict() if self.control else None,
            "plain_at_winner_lrs": self.plain.as_dict() if self.plain else None,
            "llrd_vs_control": None if self.paired is None else asdict(self.paired),
            "decay_sweep": [r.as_dict() for r in self.sweep or []],
            "runs_saved": self.runs_saved,
        }


def confirm(
    storage: str,
    study: str,
    *,
    top: int = 3,
    seeds: int | str = 5,
    decay_sweep: str | Sequence[float] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    objective: str | None = None,
    watch: Watcher | None = None,
    workers_per_gpu: int | str | None = None,
    max_seeds: int = 10,
    min_effect: float = 0.005,
    futility: float = 0.10,
    sweep_seeds: int | None = None,
) -> Confirmation:
    """Re-run the ``top`` best configurations of ``study`` with ``seeds`` fresh seeds each (linked
    study ``STUDY.confirm``; resumes where it stopped) and judge the winner against the better of
    the control arm's best and ξ = 1 at the winner's own LRs (both on the same paired seeds).

    ``seeds="auto"``: paired seeds in rounds until the verdict is decided (a group-sequential test,
    :mod:`sequential`; at most ``max_seeds``, and a difference within ±``min_effect``, in accuracy
    units, counts as none; it also stops to say "cannot tell" once the conditional power to decide by
    ``max_seeds`` falls below ``futility``, 0 never). ``decay_sweep``: also re-run the winner's LRs at
    each ξ ("1.0,0.9" or a list) on the first ``sweep_seeds`` of the winner's seeds (None: all of
    ``seeds``; with "auto", the first look's 3). ``workers``: local worker processes (None: 1 on a CPU; on a CUDA machine
    ``workers_per_gpu`` on every visible GPU, None/"auto" what memory holds, as ``run``);
    ``objective``: ``module:function`` to train with instead of the study's. ``watch`` sees each
    round of runs: started, step and trial, then close.
    """
    from llrd_search.engine.train import set_threads
    from llrd_search.sequential import FIRST_LOOK
    from llrd_search.study.confirm import control_summary, parse_decays, run_confirmation, sweep_summary
    from llrd_search.study.confirm import verdict as judge
    from llrd_search.study.confirm_rows import plain_summary, runs_saved
    from llrd_search.study.local_workers import threads_per_worker
    from llrd_search.study.rounds import judged

    if seeds != "auto" and not isinstance(seeds, int):
        raise LLRDSearchError(f"--seeds: a whole number or 'auto' (got {seeds!r})")
    _at_least_one(top=top, workers=workers, **({} if seeds == "auto" else {"seeds": seeds}))
    if seeds == "auto" and max_seeds < FIRST_LOOK:
        raise LLRDSearchError(f"--max-seeds: must be >= {FIRST_LOOK} (got {max_seeds})")
    if not 0 <= min_effect < 1:
        raise LLRDSearchError(f"--min-effect: must be >= 0 points and below 100 (got {100 * min_effect:g})")
    if not 0 <= futility < 1:
        raise LLRDSearchError(f"--futility: must be >= 0 % and below 100 % (got {100 * futility:g})")
    if sweep_seeds is not None:
        if sweep_seeds < 1 or (seeds != "auto" and sweep_seeds > seeds):
            top_n = "--max-seeds" if seeds == "auto" else f"--seeds ({seeds})"
            raise LLRDSearchError(f"--sweep-seeds: must be from 1 to {top_n}, the winner's seeds each ξ pairs with (got {sweep_seeds})")
        if decay_sweep is None:
            raise LLRDSearchError("--sweep-seeds: only with --decay-sweep (it sets the sweep's seeds per ξ)")
    decays = None
    if decay_sweep is not None:  # before anything is written
        decays = parse_decays(decay_sweep if isinstance(decay_sweep, str) else ",".join(repr(float(x)) for x in decay_sweep))
    if objective:  # a bad path fails before the linked study is made
        from llrd_search.engine.user_objective import load_objective

        load_objective(objective, "--objective")
    from llrd_search.study.gpus import plan_confirm

    plan = plan_confirm(storage, study, workers=workers, per_gpu=workers_per_gpu, threads=threads, objective=objective,
                        runs=(FIRST_LOOK if seeds == "auto" else seeds) * (top + 2 + len(decays or ())))  # + the two controls
    workers, threads = (plan.workers, plan.threads) if plan is not None else (workers or 1, threads)
    threads = threads_per_worker(workers, threads)
    set_threads(threads)
    run_round = _round_runner(storage, workers, threads, objective, watch, plan)
    plan, rows = run_confirmation(storage, study, top, seeds, run_round, decays=decays, max_seeds=max_seeds, min_effect=min_effect,
                                   futility=futility, sweep_seeds=sweep_seeds)
    sweep = sweep_summary(storage, study)
    control, plain = control_summary(storage, study), plain_summary(storage, study)
    v, paired = judge(rows), judged(storage, study)
    result = Confirmation(
        plan=plan,
        configurations=[ConfirmRow.of(r) for r in rows],
        verdict=Verdict(**v) if v else None,
        control=ConfirmRow.of(control) if control else None,
        paired=PairedVerdict(**paired) if paired else None,
        sweep=[SweepRow.of(r) for r in sweep] if sweep is not None else None,
        runs_saved=runs_saved(storage, study),
        plain=ConfirmRow.of(plain) if plain else None,
    )
    _track(storage, study, result)
    return result


def _track(storage: str, study: str, result: Confirmation) -> None:
    """Log the verdict to MLflow when the study says ``track = "mlflow"`` (study/tracking.py)."""
    from llrd_search.study.storage import opened_study, spec_of
    from llrd_search.study.tracking import track_verdict

    with opened_study(storage, study) as search:
        spec = spec_of(search)
    track_verdict(spec, storage, result.as_dict())


def _round_runner(storage: str, workers: int, threads: int, objective: str | None, watch: Watcher | None, plan: Any = None) -> Callable[[str], None]:
    """Run the linked study's queued runs: in this process (one worker) or ``workers`` local processes."""
    from llrd_search.records import Launch, Quiet

    watcher = watch or Quiet()

    def run(name: str) -> None:
        from llrd_search.console import best_value
        from llrd_search.engine.metrics import study_metric_name
        from llrd_search.study.storage import opened_study
        from llrd_search.vocab import BUDGET_ATTR, finished_count

        with opened_study(storage, name) as linked:
            trials = linked.get_trials(deepcopy=False)
            best, arm = best_value(linked)
            launch = Launch(workers, threads, f"confirming in '{name}'", int(linked.user_attrs[BUDGET_ATTR]), finished_count(trials),
                            best, study_metric_name(linked), plan.line() if plan is not None else None, arm)
        watcher.started(launch)
        try:
            from llrd_search.engine.user_objective import pick_objective
            from llrd_search.study.confirm import retry_hook
            from llrd_search.study.local_workers import run_local_workers
            from llrd_search.study.worker import run_worker

            hook = retry_hook(storage, name)

            def on_end(study: Any, trial: Any) -> None:
                hook(study, trial)
                if workers <= 1:  # with more, a monitor thread reports every worker's trials
                    watcher.trial(study, trial)

            def worker() -> None:
                run_worker(storage, name, objective_factory=lambda spec: pick_objective(spec, objective, on_step=watcher.step), on_trial_end=on_end)

            if workers <= 1:
                worker()
            else:
                envs = [s.env for s in plan.slots] if plan is not None else None
                if plan is not None:
                    plan.share_here()
                run_local_workers(storage, name, workers, threads, watcher.trial, in_process=worker, objective=objective, child_env=envs)
        finally:
            watcher.close()

    return run


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


def report(storage: str, study: str, out: str | Path) -> Report:
    """Write ``study``'s plots, ``summary.md``, ``summary.json`` and a self-contained ``report.html`` into ``out``."""
    import json

    from llrd_search.results import report as reporting
    from llrd_search.study.storage import mask_url

    files = reporting.write_report(storage, study, out)
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
    epochs: int | None = None,
    train_limit: int | None = None,
    threads: int | None = None,
    force: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Trained:
    """Fine-tune with an exported ``config`` on all the training data (or ``train_limit`` examples)
    and save the model, tokenizer and ``metrics.json`` into ``out`` (``force``: even if not empty)."""
    from llrd_search.engine.train import set_threads
    from llrd_search.results.finetune import train_from_config

    _at_least_one(epochs=epochs, train_limit=train_limit)
    set_threads(threads)
    metrics = train_from_config(config, out, epochs=epochs, train_limit=train_limit, force=force, on_step=on_step)
    return Trained(Path(out), metrics)
