"""The search layer: create, run, join and read a study, as typed calls.

The CLI parses its arguments, calls one of these and prints what comes back; a user's own script
calls them the same way (``from llrd_search import run``). What a finished search turns into --
``confirm``, ``report``, ``export``, ``train`` -- lives in :mod:`results_api` and is re-exported
here (``search.confirm(...)``). Each call opens the storage it needs and closes it again. What a
run shows while it works goes to a :class:`Watcher` (the CLI's prints and draws the progress bar;
:class:`Quiet`, the default, shows nothing).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llrd_search.confirm_api import Confirmation, confirm  # noqa: F401
from llrd_search.engine.steps import StepHook
from llrd_search.records import Best, Created, Launch, Quiet, RunResult, Summary, Watcher  # noqa: F401  (part of this API)
from llrd_search.results_api import Exported, Report, Trained, export, report, train  # noqa: F401

log = logging.getLogger(__name__)


def storage_url(study_file: str | Path, spec: Any, storage: str | None = None) -> str:
    """``storage``, else the study file's ``study.storage``, else a SQLite file beside it."""
    from llrd_search.spec import default_storage

    return storage or spec.study.storage or default_storage(study_file)


def preflight(spec: Any, *, on_step: StepHook | None = None, warn_memory: bool = True) -> Any:
    """Load data, tokenizer and model and map the LR groups before anything is written to storage,
    so a bad study file or dataset fails with one line and leaves no half-made study behind
    (``validate`` runs it too). Returns the built-in objective, loaded, calling ``on_step(step,
    total)`` at each step; ``warn_memory``: warn when a trial will not fit (validate says it itself)."""
    from llrd_search.engine.model import fresh_model
    from llrd_search.engine.objective import Objective
    from llrd_search.engine.param_groups import build_param_groups
    from llrd_search.exceptions import ModelError

    if spec.model.trust_remote_code:
        logging.getLogger("llrd_search").warning(
            "model.trust_remote_code = true: every worker runs Python code from the repository of '%s' "
            "when it loads the model; use it only for a repository you trust", spec.model.name
        )
    objective = Objective(spec, on_step=on_step)
    try:
        build_param_groups(fresh_model(objective.template, 0), base_lr=1e-5, decay=0.9, head_lr=1e-5)
    except ModelError as err:
        raise ModelError(f"model.name: '{spec.model.name}': {err}") from None
    if spec.train.gradient_checkpointing and not getattr(objective.template.model, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: '{spec.model.name}' does not support gradient checkpointing; set it to false")
    if warn_memory and not spec.train.objective:
        _warn_memory(spec, objective)
    if spec.train.objective:  # a study naming a broken objective is not created
        from llrd_search.engine.user_objective import load_objective

        load_objective(spec.train.objective, "train.objective")
    return objective


def _warn_memory(spec: Any, objective: Any) -> None:
    """One warning line when a trial will not fit in the device's free memory (an estimate, see
    engine/memory_check.py), naming the keys that make it fit; the study still starts."""
    from llrd_search.engine.memory_check import check_trial_memory

    model = objective.template.model
    try:
        _estimate, _free, warning = check_trial_memory(
            getattr(model, "config", None), sum(p.numel() for p in model.parameters()), spec.train,
            max_length=int(objective.task.train.lengths.max()), device=objective.device, bf16=objective.dtype is not None,
        )
    except ValueError:  # a config without the encoder's dimensions: no estimate
        return
    if warning:
        log.warning("%s", warning)


def create_study_for(spec: Any, url: str, n_trials: int | None = None, *, study_file: str | Path = "") -> Created:
    """Create (or resume) the study of a loaded ``spec`` in ``url``, with its control arm."""
    from llrd_search.study.arms import arm_trials, control_target, ensure_control_arm
    from llrd_search.study.compat import study_id
    from llrd_search.study.grid import cap_budget
    from llrd_search.study.storage import budget_lock, create_study, opened_storage, shareable_url
    from llrd_search.vocab import BUDGET_ATTR, finished_count

    if spec.study.storage and shareable_url(spec.study.storage)[1]:
        # Never stored in the study (see storage.stored_spec_json), but study files get shared and committed.
        log.warning("%s: study.storage holds a password; put it in PGPASSWORD or ~/.pgpass instead", study_file)
    _budget, note = cap_budget(spec, n_trials or spec.study.n_trials)
    with opened_storage(url) as storage:
        study, created = create_study(spec, storage, n_trials)
        with budget_lock(storage, study_id(study)):
            control = ensure_control_arm(storage, study, spec)
        budget = int(study.user_attrs.get(BUDGET_ATTR, spec.study.n_trials))
        finished = sum(finished_count(ts) for ts in arm_trials(study).values())
    if spec.study.track:  # checks the tracking store and makes its experiment before any worker races to
        from llrd_search.study.tracking import trial_tracker

        trial_tracker(spec, url)
    return Created(
        study_name=spec.study.name, url=url, created=created, budget=budget, finished=finished, note=note,
        control_study=control.study_name if control is not None else None,
        control_trials=control_target(spec.study.control_fraction, budget) if control is not None else 0,
    )


def create(study_file: str | Path, *, storage: str | None = None, n_trials: int | None = None) -> Created:
    """Check the study file, its data and model, then create (or resume) its study."""
    from llrd_search.spec import load_spec
    from llrd_search.study.storage import storage_named

    spec = load_spec(study_file)
    preflight(spec)
    with storage_named(_storage_key(spec, storage)):
        return create_study_for(spec, storage_url(study_file, spec, storage), n_trials, study_file=study_file)


def _storage_key(spec: Any, storage: str | None) -> str:
    """Which key a storage error names: the flag, or the study file's ``study.storage`` it came from."""
    return "study.storage" if storage is None and spec.study.storage else "--storage"


def run(
    study_file: str | Path,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    watch: Watcher | None = None,
    workers_per_gpu: int | str | None = None,
) -> RunResult:
    """Create (or resume) the study, run it with local workers until its budget is spent, and
    return its best trials. ``workers``/``threads``: ``--workers``/``--threads`` (None: chosen).
    On a CUDA machine the workers spread over every visible GPU, ``workers_per_gpu`` on each (an
    int, or None/"auto": what the smallest GPU's free memory holds; study/gpus.py)."""
    from llrd_search.engine.train import set_threads
    from llrd_search.spec import load_spec
    from llrd_search.study.gpus import plan_run
    from llrd_search.study.local_workers import choose_workers, run_local_workers, threads_per_worker, workers_from_env
    from llrd_search.study.storage import storage_named

    watch = watch or Quiet()
    spec = load_spec(study_file)
    objective = preflight(spec, on_step=watch.step)
    with storage_named(_storage_key(spec, storage)):
        created = create_study_for(spec, storage_url(study_file, spec, storage), n_trials, study_file=study_file)
    watch.created(created)
    url, name = created.url, spec.study.name
    remaining = created.budget - created.finished
    user = bool(spec.train.objective)
    plan = plan_run(objective, user_objective=user, workers=workers, per_gpu=workers_per_gpu, threads=threads, remaining=remaining,
                    measured=_measured_peak(url, name) if getattr(getattr(objective, "device", None), "type", None) == "cuda" else None)
    if user:
        # The user's training code picks its own threads and device: one worker unless asked.
        from llrd_search.engine.user_objective import load_objective

        workers = workers or workers_from_env() or 1
        objective = load_objective(spec.train.objective, "train.objective")
    elif plan is None:
        workers = choose_workers(workers, objective, remaining)
    if plan is not None:
        workers, threads = plan.workers, plan.threads
    elif isinstance(workers_per_gpu, int):
        log.warning("--workers-per-gpu %d: no GPU in use, ignored", workers_per_gpu)
    threads = threads_per_worker(workers, threads)
    set_threads(threads)
    where = f"on {objective.device.type}" if hasattr(objective, "device") else f"running {spec.train.objective}"
    repacked = _pack_change(spec, None if user else objective, url, name) if remaining > 0 else ""
    best, metric, best_arm = _best_and_metric(url, name)
    watch.started(Launch(workers, threads, where + repacked, created.budget, created.finished, best, metric,
                         plan.line() + repacked if plan else None, best_arm))
    try:
        from llrd_search.study.worker import run_worker

        if workers <= 1:
            run_worker(url, name, objective_factory=lambda _spec: objective, on_trial_end=watch.trial)
        else:
            in_process = lambda: run_worker(url, name, objective_factory=lambda _spec: objective)  # noqa: E731
            envs = [s.env for s in plan.slots] if plan is not None else None
            if plan is not None:
                plan.share_here()
            run_local_workers(url, name, workers, threads, watch.trial, in_process=in_process, child_env=envs)
    finally:
        watch.close()
    return RunResult(created, summary(url, name))


def _measured_peak(url: str, name: str) -> int | None:
    """A resumed study's largest GPU memory peak of a finished trial (engine/memory.py), or None."""
    from llrd_search.engine.memory import measured_trial_bytes
    from llrd_search.study.storage import opened_study

    with opened_study(url, name) as study:
        return measured_trial_bytes(study.get_trials(deepcopy=False))


def _pack_change(spec: Any, objective: Any, url: str, name: str) -> str:
    """A clause for the start line when this run packs trials otherwise than the study's finished
    trials were packed (their ``pack`` attr; none: one at a time), else "": a packed trial's metric
    depends on its packmates' dropout draws, so the two sets differ in more than their seeds."""
    from llrd_search.study.arms import arm_trials
    from llrd_search.study.storage import opened_study
    from llrd_search.vocab import FINISHED_STATES

    k = 1
    if objective is not None and hasattr(objective, "template"):  # the built-in loop, the one that packs
        from llrd_search.engine.packed_trials import resolve_pack

        if spec.train.pack == "auto" and objective.device.type == "cuda":
            # Each worker sizes its pack from the GPU memory it finds; sizing it here would read that
            # memory through CUDA and hold a context on the GPU in this process for the whole run.
            return ""

        k = resolve_pack(spec.train, objective.device, objective.template.model, spec.model.max_length, objective.dtype)
    with opened_study(url, name) as study:
        before = [int(t.user_attrs.get("pack", 1)) for ts in arm_trials(study, FINISHED_STATES).values() for t in ts]
    if not before or set(before) == {k}:
        return ""
    was = " or ".join(map(str, sorted(set(before))))
    now = f"packs {k} trials at a time" if k > 1 else "trains one trial at a time"
    return (f"; note: this run {now}, the study's {len(before)} finished trials ran with pack = {was} "
            "(a packed trial's metric depends on its packmates' dropout draws)")


def _best_and_metric(url: str, name: str) -> tuple[float | None, str, str | None]:
    """The best value over both arms, the metric, and the arm that holds the best."""
    from llrd_search.console import best_value
    from llrd_search.engine.metrics import study_metric_name
    from llrd_search.study.storage import opened_study

    with opened_study(url, name) as study:
        best, arm = best_value(study)
        return best, study_metric_name(study), arm


def summary(url: str, name: str) -> Summary:
    """The study's best trial and its control arm's (unconfirmed)."""
    from llrd_search.engine.metrics import study_metric_name
    from llrd_search.study.arms import load_control
    from llrd_search.study.storage import opened_study
    from llrd_search.vocab import best_trial

    def as_best(t: Any) -> Best | None:
        return Best(t.number, t.value, dict(t.params)) if t is not None else None

    with opened_study(url, name) as study:
        control = load_control(study)
        return Summary(
            metric=study_metric_name(study),
            best=as_best(best_trial(study.get_trials(deepcopy=False))),
            control_best=as_best(best_trial(control.get_trials(deepcopy=False))) if control is not None else None,
        )


def join(storage: str, study: str, *, worker_index: int = 0, objective: str | None = None, on_trial_end: Any = None) -> int:
    """Join ``study`` as one worker and run trials until its budget is spent; returns how many this
    worker ran. ``objective``: a ``path.py:function`` to train with instead of the study's."""
    from llrd_search.study.worker import run_worker

    factory = None
    if objective:
        from llrd_search.engine.user_objective import load_objective

        user = load_objective(objective, "--objective")  # a bad path fails before joining the study
        factory = lambda _spec: user  # noqa: E731
    return run_worker(storage, study, worker_index=worker_index, objective_factory=factory, on_trial_end=on_trial_end)


@dataclass
class BestTrial:
    trial: int
    value: float
    accuracy: float | None  # kept for scripts from before train.metric: the value when it is an accuracy
    params: dict[str, float]
    train_examples_per_second: float | None
    arm: str = "llrd"  # the arm that holds it: ``trial`` numbers a trial of that arm's study


@dataclass
class Running:
    trial: int
    arm: str
    worker: str | None
    params: dict[str, float]


@dataclass
class Status:
    """Counts by state (``states``: the LLRD arm; ``arms``: each arm's, with its best value), budget, the best
    over both arms (``best.arm`` holds it), running trials."""

    study: str
    storage: str
    metric: str
    budget: int
    finished: int
    states: dict[str, int]
    arms: dict[str, dict[str, Any]]
    compute_seconds: float
    best: BestTrial | None
    running: list[Running] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(url: str, name: str) -> Status:
    """Where study ``name`` stands: one read of the storage, closed again."""
    from optuna.trial import TrialState

    from llrd_search.engine.metrics import study_metric_name
    from llrd_search.study.arms import CONTROL, arm_of, arm_trials, best_of_arms
    from llrd_search.study.storage import mask_url, opened_study
    from llrd_search.vocab import BUDGET_ATTR, best_trial, finished_count, state_counts

    with opened_study(url, name) as study:
        metric = study_metric_name(study)
        trials = study.get_trials(deepcopy=False)
        by_arm = arm_trials(study)
        budget = int(study.user_attrs.get(BUDGET_ATTR, 0))
    # The best over both arms (a control trial that beats the LLRD arm is the best), and each arm's.
    top = best_of_arms(by_arm)
    best_arm, best = top if top is not None else (None, None)
    seconds = sum(t.user_attrs.get("wall_seconds", 0) for t in trials)
    arms = {arm: {"finished": finished_count(ts), "states": state_counts(ts), "best": getattr(best_trial(ts), "value", None)}
            for arm, ts in by_arm.items()}
    if CONTROL in arms:  # the budget is study-wide: the parent's counts alone are the LLRD arm's
        seconds += sum(t.user_attrs.get("wall_seconds", 0) for t in by_arm[CONTROL])
    running = [t for ts in ([trials, by_arm[CONTROL]] if CONTROL in arms else [trials]) for t in ts if t.state == TrialState.RUNNING]
    return Status(
        study=name,
        storage=mask_url(url),
        metric=metric,
        budget=budget,
        finished=sum(a["finished"] for a in arms.values()),
        states=state_counts(trials),
        arms=arms,
        compute_seconds=round(seconds, 1),
        best=None if best is None else BestTrial(best.number, best.value, best.value if metric == "accuracy" else None,
                                                 best.params, best.user_attrs.get("train_examples_per_second"), best_arm),
        running=[Running(t.number, arm_of(t), t.user_attrs.get("worker"), t.params) for t in running],
    )
