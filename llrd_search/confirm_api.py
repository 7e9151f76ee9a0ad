"""``confirm`` as a typed call: re-run the best configurations with fresh paired seeds and judge them.

:func:`confirm` plans the linked study ``NAME.confirm`` (:mod:`study.confirm`), runs its queued runs
in this process or in local worker processes (every GPU on a CUDA machine), and returns a
:class:`Confirmation`: the confirmed rows, the winner's lead, the paired verdict against the better
of two controls (with ``seeds="auto"`` the sequential design of :mod:`sequential`), the decay sweep
and the held-out test scores. The CLI's ``confirm`` only parses, calls it and prints; :mod:`search`
re-exports it. Like the CLI it raises :class:`LLRDSearchError` subclasses with one-line messages
that name the option to fix, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from llrd_search.exceptions import LLRDSearchError, UsageError
from llrd_search.records import ConfirmRow, PairedVerdict, SweepRow, Verdict
from llrd_search.results_api import at_least_one

if TYPE_CHECKING:  # optuna and torch are imported when first needed
    from llrd_search.records import Watcher
    from llrd_search.study.confirm import Plan


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
    from llrd_search.sequential import FIRST_LOOK, MAX_SEEDS
    from llrd_search.study.confirm import control_summary, parse_decays, run_confirmation, sweep_summary
    from llrd_search.study.confirm import verdict as judge
    from llrd_search.study.confirm_rows import plain_summary, runs_saved
    from llrd_search.study.local_workers import threads_per_worker
    from llrd_search.study.rounds import judged

    if seeds != "auto" and not isinstance(seeds, int):
        raise LLRDSearchError(f"--seeds: a whole number or 'auto' (got {seeds!r})")
    at_least_one(top=top, workers=workers, **({} if seeds == "auto" else {"seeds": seeds}))
    if seeds == 1:  # said before any run trains, not after
        raise UsageError("--seeds: one seed per configuration leaves no spread to judge a lead by; use --seeds 3 or more, or --seeds auto")
    if seeds == "auto" and not FIRST_LOOK <= max_seeds <= MAX_SEEDS:
        raise LLRDSearchError(f"--max-seeds: must be {FIRST_LOOK} to {MAX_SEEDS}, the plans the boundaries are tabulated for (got {max_seeds})")
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
                            best, study_metric_name(linked), plan.line() if plan is not None else None, arm, counts="runs this round")
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
