"""Search commands: validate, create, run, worker, status (and the local-worker progress bar)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- helpers


def _storage_url(args: argparse.Namespace, spec: Any) -> str:
    from .spec import default_storage

    return args.storage or spec.study.storage or default_storage(args.study_file)


def trial_line(t: Any, metric: str = "acc") -> str:
    from optuna.trial import TrialState

    from .vocab import ARM_ATTR

    p = t.params
    acc = f"{metric}={t.value:.4f}" if t.value is not None else f"{metric}=-"
    lr = f"base_lr={p.get('base_lr', float('nan')):.2e} head_lr={p.get('head_lr', float('nan')):.2e} decay={p.get('decay', float('nan')):.3f}"
    extra = f" ({t.user_attrs.get('fail_reason')})" if t.state == TrialState.FAIL else ""
    secs = t.user_attrs.get("wall_seconds")
    took = f" in {secs:.0f}s" if secs else ""
    arm = "control " if t.user_attrs.get(ARM_ATTR) == "control" else ""
    return f"{arm}trial {t.number} {t.state.name} {acc} {lr}{took}{extra}"


def _preflight(spec: Any) -> Any:
    """Load data, tokenizer and model and map the LR groups before anything is written to storage,
    so a bad study file or dataset fails with one line and leaves no half-made study behind."""
    from .exceptions import ModelError
    from .objective import Objective
    from .param_groups import build_param_groups
    from .train import fresh_model

    if spec.model.trust_remote_code:
        logging.getLogger("llrd_search").warning(
            "model.trust_remote_code = true: every worker runs Python code from the repository of '%s' "
            "when it loads the model; use it only for a repository you trust", spec.model.name
        )
    objective = Objective(spec)
    try:
        build_param_groups(fresh_model(objective.template, 0), base_lr=1e-5, decay=0.9, head_lr=1e-5)
    except ModelError as err:
        raise ModelError(f"model.name: '{spec.model.name}': {err}") from None
    if spec.train.objective:  # a study naming a broken objective is not created
        from .user_objective import load_objective

        load_objective(spec.train.objective, "train.objective")
    return objective


class Progress:
    """Trials done/total, best metric value, ETA; a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int, best: float | None, metric: str = "acc"):
        self.total, self.done, self.best, self.metric = total, done, best, metric
        self.t0 = time.time()
        self.start_done = done
        self.reported: set[tuple[str, int]] = set()
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
        return f"best {self.metric} {self.best:.4f}" if self.best is not None else f"best {self.metric} -"

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

    def trial(self, study: Any, trial: Any) -> None:
        """Report a finished trial of ``study`` (either arm, any worker's), each exactly once.

        The count is this object's own: one more for each COMPLETE or PRUNED trial reported. Read
        from the storage instead, two trials finishing between two reports both printed the count
        after the second (``[9/12]`` twice). Trials are keyed by arm: each arm numbers its own."""
        from .arms import arm_of
        from .vocab import is_finished

        key = (arm_of(trial), trial.number)
        if key in self.reported:
            return
        self.reported.add(key)
        if is_finished(trial.state):
            self.done += 1
        self.update(self.done, best_value(study), trial_line(trial, self.metric))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def best_value(study: Any) -> float | None:
    from .vocab import best_trial

    best = best_trial(study.get_trials(deepcopy=False))
    return best.value if best is not None else None


# --------------------------------------------------------------------------- commands


def _short(metric: str) -> str:
    return "acc" if metric == "accuracy" else metric


def cmd_init(args: argparse.Namespace) -> int:
    from .scaffold import write_study

    out, data, model = write_study(args.model, args.data, args.out, force=args.force)
    validation = f"validation split '{data.validation_split}'" if data.validation_split else "no validation split (10 % of train carved out)"
    splits = ", ".join(f"{name} {n}" for name, n in data.rows.items())
    print(f"data: {splits} rows; text '{data.text}'{f' + {data.text_pair!r}' if data.text_pair else ''}, "
          f"label '{data.label}' ({data.num_classes} classes); {validation}")
    print(f"model: {model.model_type}, {model.layers} layers, {model.max_positions} positions")
    print(f"wrote {out}; next: llrd-search run {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .spec import load_spec

    for path in args.study_files:
        spec = load_spec(path)
        print(f"{path}: ok (study '{spec.study.name}', {spec.study.n_trials} trials, sampler {spec.study.sampler})")
    return 0


def _create(args: argparse.Namespace, spec: Any) -> tuple[Any, str, bool]:
    from .arms import control_target, ensure_control_arm
    from .compat import study_id
    from .grid import cap_budget
    from .storage import budget_lock, create_study, mask_url, open_storage, shareable_url
    from .vocab import BUDGET_ATTR

    if spec.study.storage and shareable_url(spec.study.storage)[1]:
        # Never stored in the study (see storage.stored_spec_json), but study files get shared and committed.
        log.warning("%s: study.storage holds a password; put it in PGPASSWORD or ~/.pgpass instead", args.study_file)
    url = _storage_url(args, spec)
    storage = open_storage(url)
    _budget, note = cap_budget(spec, args.n_trials or spec.study.n_trials)
    if note:
        print(f"note: {note}", file=sys.stderr)
    study, created = create_study(spec, storage, args.n_trials)
    with budget_lock(storage, study_id(study)):
        control = ensure_control_arm(storage, study, spec)
    word = "created" if created else "resumed"
    if control is not None:
        total = int(study.user_attrs.get(BUDGET_ATTR, spec.study.n_trials))
        print(f"control arm: {control_target(spec.study.control_fraction, total)} of {total} trials tune plain fine-tuning (ξ = 1) in study '{control.study_name}'", file=sys.stderr)
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
    from .local_workers import choose_workers, run_local_workers, threads_per_worker
    from .metrics import study_metric_name
    from .spec import load_spec
    from .train import set_threads
    from .vocab import BUDGET_ATTR, finished_count

    spec = load_spec(args.study_file)
    objective = _preflight(spec)
    study, url, _ = _create(args, spec)
    budget = int(study.user_attrs[BUDGET_ATTR])
    from .arms import arm_trials

    done = sum(finished_count(ts) for ts in arm_trials(study).values())
    if spec.train.objective:
        # The user's training code picks its own threads and device: one worker unless asked.
        from .local_workers import workers_from_env
        from .user_objective import load_objective

        workers = args.workers or workers_from_env() or 1
        objective = load_objective(spec.train.objective, "train.objective")
    else:
        workers = choose_workers(args.workers, objective, budget - done)
    threads = threads_per_worker(workers, args.threads)
    set_threads(threads)
    if budget > done:
        where = f" on {objective.device.type}" if hasattr(objective, "device") else f" running {spec.train.objective}"
        print(f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}{where}", file=sys.stderr)
    progress = Progress(budget, done, best_value(study), _short(study_metric_name(study)))
    if hasattr(objective, "on_step"):
        objective.on_step = progress.step
    try:
        from .worker import run_worker

        if workers <= 1:
            run_worker(url, spec.study.name, objective_factory=lambda _spec: objective, on_trial_end=progress.trial)
        else:
            in_process = lambda: run_worker(url, spec.study.name, objective_factory=lambda _spec: objective)  # noqa: E731
            run_local_workers(url, spec.study.name, workers, threads, progress.trial, in_process=in_process)
    finally:
        progress.close()
    return _summary(url, spec.study.name)


def _summary(url: str, name: str) -> int:
    from .storage import opened_study

    with opened_study(url, name) as study:
        return _print_summary(study)


def _print_summary(study: Any) -> int:
    from .arms import load_control
    from .metrics import study_metric_name
    from .vocab import best_trial

    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials)
    if best is None:
        print("no trial completed", file=sys.stderr)
        return 1
    print(f"best: trial {best.number} {study_metric_name(study)} {best.value:.4f} base_lr={best.params['base_lr']:.3g} head_lr={best.params['head_lr']:.3g} decay={best.params['decay']:.3f}")
    control = load_control(study)
    c = best_trial(control.get_trials(deepcopy=False)) if control is not None else None
    if c is not None:
        print(f"best of the control arm (ξ = 1): trial {c.number} {study_metric_name(study)} {c.value:.4f} base_lr={c.params['base_lr']:.3g} head_lr={c.params['head_lr']:.3g} "
              "(unconfirmed: run `llrd-search confirm` for the paired verdict)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .train import set_threads
    from .worker import run_worker

    set_threads(args.threads)
    factory = None
    if args.objective:
        from .user_objective import load_objective

        user = load_objective(args.objective, "--objective")  # a bad path fails before joining the study
        factory = lambda _spec: user  # noqa: E731
    # Quiet children of `run --workers K`: the parent already prints each finished trial.
    on_end = None if args.quiet else (lambda _s, t: print(trial_line(t), file=sys.stderr, flush=True))
    n = run_worker(args.storage, args.study, worker_index=args.worker_index, objective_factory=factory, on_trial_end=on_end)
    if not args.quiet:
        print(f"worker done: ran {n} trials; the study's budget is spent", file=sys.stderr)
    return 0


def status_data(url: str, name: str) -> dict[str, Any]:
    """Counts by state (``states``: the LLRD arm; ``arms``: each arm's), budget, best, running trials."""
    from optuna.trial import TrialState

    from .arms import arm_of, arm_trials
    from .metrics import study_metric_name
    from .storage import load_study, mask_url, open_storage
    from .vocab import BUDGET_ATTR, best_trial, finished_count, state_counts

    storage = open_storage(url)
    study = load_study(storage, name)
    metric = study_metric_name(study)
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    best = best_trial(trials)
    seconds = sum(t.user_attrs.get("wall_seconds", 0) for t in trials)
    arms = {}
    for arm, arm_trials_ in arm_trials(study).items():
        arms[arm] = {"finished": finished_count(arm_trials_), "states": state_counts(arm_trials_)}
    if "control" in arms:  # the budget is study-wide: the parent's counts alone are the LLRD arm's
        control_trials = arm_trials(study)["control"]
        seconds += sum(t.user_attrs.get("wall_seconds", 0) for t in control_trials)
        trials = trials + [t for t in control_trials if t.state == TrialState.RUNNING]
    storage.engine.dispose()
    return {
        "study": name,
        "storage": mask_url(url),
        "metric": metric,
        "budget": int(study.user_attrs.get(BUDGET_ATTR, 0)),
        "finished": sum(a["finished"] for a in arms.values()),
        "states": counts,
        "arms": arms,
        "compute_seconds": round(seconds, 1),
        "best": None
        if best is None
        # "accuracy" stays for scripts from before train.metric, and only holds an accuracy.
        else {"trial": best.number, "value": best.value, "accuracy": best.value if metric == "accuracy" else None, "params": best.params, "train_examples_per_second": best.user_attrs.get("train_examples_per_second")},
        "running": [{"trial": t.number, "arm": arm_of(t), "worker": t.user_attrs.get("worker"), "params": t.params} for t in trials if t.state == TrialState.RUNNING],
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
    for arm, a in data["arms"].items():
        label = "" if len(data["arms"]) == 1 else f"{arm} arm: "
        for state, n in sorted(a["states"].items()):
            table.add_row(f"{label}{state.lower()}", str(n))
    table.add_row("compute", f"{data['compute_seconds'] / 60:.1f} min")
    if data["best"]:
        b = data["best"]
        p = b["params"]
        table.add_row("best", f"trial {b['trial']}: {data['metric']} {b['value']:.4f}")
        table.add_row("best params", f"base_lr {p['base_lr']:.3g}, head_lr {p['head_lr']:.3g}, decay {p['decay']:.3f}")
    for r in data["running"]:
        table.add_row(f"running #{r['trial']} ({r['arm']})", str(r["worker"]))
    Console().print(table)
    return 0
