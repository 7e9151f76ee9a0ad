"""What a person watching a search sees: one line per finished trial, the progress bar (a rich bar
on a terminal, plain lines otherwise), the watchers that print a run's (or a confirmation's) stages
as they happen, and the step bar of ``llrd-search train``."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # optuna is imported when first needed: `llrd-search --help` stays quick
    from llrd_search.records import Created, Launch


def short_metric(metric: str) -> str:
    return "acc" if metric == "accuracy" else metric


def trial_line(t: Any, metric: str = "acc") -> str:
    from optuna.trial import TrialState

    from llrd_search.vocab import ARM_ATTR

    p = t.params
    acc = f"{metric}={t.value:.4f}" if t.value is not None else f"{metric}=-"
    lr = f"base_lr={p.get('base_lr', float('nan')):.2e} head_lr={p.get('head_lr', float('nan')):.2e} decay={p.get('decay', float('nan')):.3f}"
    extra = f" ({t.user_attrs.get('fail_reason')})" if t.state == TrialState.FAIL else ""
    secs = t.user_attrs.get("wall_seconds")
    took = f" in {secs:.0f}s" if secs else ""
    arm = "control " if t.user_attrs.get(ARM_ATTR) == "control" else ""
    return f"{arm}trial {t.number} {t.state.name} {acc} {lr}{took}{extra}"


def arm_label(arm: str | None) -> str:
    """How the progress line and ``status`` name an arm."""
    return {"llrd": "LLRD arm", "control": "ξ = 1 arm"}.get(arm or "", "")


def best_value(study: Any) -> tuple[float | None, str | None]:
    """(value, arm) of the best COMPLETE trial over both arms of ``study`` (a search with its control
    arm, or a confirmation study whose runs carry their arm), or (None, None)."""
    from llrd_search.study.arms import arm_trials, best_of_arms

    best = best_of_arms(arm_trials(study))
    return (best[1].value, best[0]) if best is not None else (None, None)


def say(line: str) -> None:
    print(line, file=sys.stderr)


class Progress:
    """Trials done/total, best metric value, ETA; a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int, best: float | None, metric: str = "acc", best_arm: str | None = None, label: str | None = None):
        self.total, self.done, self.best, self.metric, self.best_arm = total, done, best, metric, best_arm
        self.t0 = time.time()
        self.start_done = done
        # With a label (confirm: "runs this round"), counts start at 0 and name what they count: a
        # total that grew with each round ([4/4], then [5/6]) read as a jump.
        self.label, self.offset = label, done if label else 0
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
            self.task = self.bar.add_task(label or "trials", total=total - self.offset, completed=done - self.offset, best=self._best())
            self.step_task = self.bar.add_task("current trial", total=1, completed=0, best="", visible=False)
            self.bar.start()

    def _best(self) -> str:
        if self.best is None:
            return f"best {self.metric} -"
        # The best over both arms: a control trial that beats every LLRD trial shows as the best.
        arm = f" ({arm_label(self.best_arm)})" if self.best_arm else ""
        return f"best {self.metric} {self.best:.4f}{arm}"

    def step(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.step_task, total=total, completed=step, visible=True)

    def update(self, done: int, best: float | None, line: str | None = None, best_arm: str | None = None) -> None:
        self.done, self.best, self.best_arm = done, best, best_arm
        if self.bar is not None:
            if line:
                self.bar.console.print(line, highlight=False)
            self.bar.update(self.task, completed=done - self.offset, best=self._best())
        elif line:
            rate = (time.time() - self.t0) / max(1, done - self.start_done)
            eta = rate * max(0, self.total - done)
            count = f"{done - self.offset}/{self.total - self.offset}" + (f" {self.label}" if self.label else "")
            print(f"[{count}] {line} | {self._best()} | ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def trial(self, study: Any, trial: Any) -> None:
        """Report a finished trial of ``study`` (either arm, any worker's), each exactly once.

        The count is this object's own: one more for each COMPLETE or PRUNED trial reported. Read
        from the storage instead, two trials finishing between two reports both printed the count
        after the second (``[9/12]`` twice). Trials are keyed by arm: each arm numbers its own."""
        from llrd_search.study.arms import arm_of
        from llrd_search.vocab import is_finished

        key = (arm_of(trial), trial.number)
        if key in self.reported:
            return
        self.reported.add(key)
        if is_finished(trial.state):
            self.done += 1
        best, arm = best_value(study)
        self.update(self.done, best, trial_line(trial, self.metric), arm)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_created(c: Created) -> None:
    """What ``create`` and ``run`` say once the study exists (all on stderr)."""
    from llrd_search.study.storage import mask_url

    if c.note:
        say(f"note: {c.note}")
    if c.control_study is not None:
        say(f"control arm: {c.control_trials} of {c.budget} trials tune plain fine-tuning (ξ = 1) in study '{c.control_study}'")
    say(f"{'created' if c.created else 'resumed'} study '{c.study_name}' in {mask_url(c.url)}")


class ProgressConsole:
    """A :class:`search.Watcher` that draws the progress bar of each batch of trials it is shown
    (``confirm``: one per round of runs) and prints nothing else."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def created(self, c: Created) -> None: ...

    def started(self, launch: Launch) -> None:
        if launch.gpu_plan and launch.remaining > 0:
            say(launch.gpu_plan)
        self.progress = Progress(launch.budget, launch.finished, launch.best, launch.metric, launch.best_arm, launch.counts)

    def step(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress.step(step, total)

    def trial(self, study: Any, trial: Any) -> None:
        if self.progress is not None:
            self.progress.trial(study, trial)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class RunConsole(ProgressConsole):
    """The :class:`search.Watcher` of ``llrd-search run``: stage lines, then the progress bar."""

    def created(self, c: Created) -> None:
        print_created(c)

    def started(self, launch: Launch) -> None:
        w, t = launch.workers, launch.threads
        if launch.remaining > 0:
            say(launch.gpu_plan or f"{w} worker{'s' * (w > 1)} x {t} thread{'s' * (t > 1)} {launch.where}")
        self.progress = Progress(launch.budget, launch.finished, launch.best, short_metric(launch.metric), launch.best_arm)


@contextlib.contextmanager
def step_progress(description: str = "training") -> Iterator[Callable[[int, int], None]]:
    """An ``on_step`` callback for one long training run (``llrd-search train``): a rich bar on a
    terminal, a line every 10 % otherwise."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        task = bar.add_task(description, total=None)
        with bar:
            yield lambda step, total: bar.update(task, completed=step, total=total)
        return
    shown = {-1}

    def line(step: int, total: int) -> None:
        tenth = step * 10 // max(1, total)
        if tenth not in shown:
            shown.add(tenth)
            print(f"{description}: step {step}/{total} ({tenth * 10} %)", file=sys.stderr, flush=True)

    yield line
