"""Result commands: report, confirm, export, train, dashboard."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .console import Progress, best_value
from .exceptions import LLRDSearchError
from .local_workers import run_local_workers, threads_per_worker


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
        from .metrics import study_metric_name
        from .storage import opened_study
        from .vocab import BUDGET_ATTR, finished_count

        with opened_study(args.storage, name) as study:
            budget = int(study.user_attrs[BUDGET_ATTR])
            done = finished_count(study.get_trials(deepcopy=False))
            progress = Progress(budget, done, best_value(study), study_metric_name(study))
        try:
            from .confirm import retry_hook
            from .user_objective import pick_objective
            from .worker import run_worker

            hook = retry_hook(args.storage, name)

            def on_end(st: Any, trial: Any) -> None:
                hook(st, trial)
                if args.workers <= 1:  # with more, a monitor thread reports every worker's trials
                    progress.trial(st, trial)

            def worker() -> None:
                run_worker(args.storage, name, objective_factory=lambda spec: pick_objective(spec, args.objective, on_step=progress.step), on_trial_end=on_end)

            if args.workers <= 1:
                worker()
            else:
                run_local_workers(args.storage, name, args.workers, threads, progress.trial, in_process=worker, objective=args.objective)
        finally:
            progress.close()

    return run


def _lrs(p: dict[str, float]) -> str:
    return f"base_lr={p['base_lr']:.3g} head_lr={p['head_lr']:.3g} decay={p['decay']:.3f}"


def cmd_confirm(args: argparse.Namespace) -> int:
    from .confirm import control_summary, paired_verdict, parse_decays, run_confirmation, sweep_summary, verdict
    from .train import set_threads

    for key in ("top", "seeds"):
        if getattr(args, key) < 1:
            raise LLRDSearchError(f"--{key}: must be >= 1 (got {getattr(args, key)})")
    decays = parse_decays(args.decay_sweep) if args.decay_sweep is not None else None  # before anything is written
    if args.objective:  # a bad path fails before the linked study is made
        from .user_objective import load_objective

        load_objective(args.objective, "--objective")
    threads = threads_per_worker(args.workers, args.threads)
    set_threads(threads)
    plan, summary = run_confirmation(args.storage, args.study, args.top, args.seeds, _confirm_workers(args, threads), decays=decays)
    sweep = sweep_summary(args.storage, args.study)
    v = verdict(summary)
    control = control_summary(args.storage, args.study)
    paired = paired_verdict(summary, control)
    if args.format == "json":
        # NaN (a configuration with no finished run) is not JSON: null instead.
        def clean(r: dict) -> dict:
            return {k: (None if isinstance(x, float) and x != x else x) for k, x in r.items()}

        print(json.dumps({"study": plan.study_name, "configurations": [clean(r) for r in summary], "verdict": v,
                          "control": clean(control) if control else None, "llrd_vs_control": paired,
                          "decay_sweep": [clean(r) for r in sweep or []]}, indent=2))
        return 0 if v else 1
    if plan.note:
        print(f"note: {plan.note}", file=sys.stderr)
    print(f"confirmation of '{args.study}': {len(plan.sources)} configuration(s) x {plan.seeds} seed(s), runs in study '{plan.study_name}'")
    for r in [*summary, *([control] if control else [])]:
        conf = f"{r['mean']:.4f} ± {r['std']:.4f} (n={r['n']})" if r["n"] else "no finished run"
        failed = f", {r['n_failed']} failed" if r["n_failed"] else ""
        label = f"control {r['source_trial']:>2}" if r["arm"] == "control" else f"trial {r['source_trial']:>4}"
        print(f"  {label}  {_lrs(r['params'])}  search {r['search_accuracy']:.4f}  confirmed {conf}{failed}")
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
    if sweep:
        print(f"decay sweep at base_lr={sweep[0]['base_lr']:.3g} head_lr={sweep[0]['head_lr']:.3g} (confirm trial {sweep[0]['winner']}), same seeds at every ξ:")
        for r in sweep:
            conf = f"{r['mean']:.4f} ± {r['std']:.4f} (n={r['n']})" if r["n"] else "no finished run"
            print(f"  ξ = {r['decay']:.3f}  {conf}{'  (the winner: its confirmation runs)' if r['own'] else ''}")
    if paired is not None:
        print(f"LLRD vs the LR-matched control (ξ = 1, trial {paired['control']} of the control arm): {paired['text']}")
    elif control is None:
        print("no control arm to compare with (the search has control_fraction = 0, or its control arm has no complete trial)")
    return 0


def _check_writable(out: Path) -> None:
    """``--out FILE`` names a file we can write: not a folder, in an existing folder that takes files."""
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


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_config, render

    fmt = args.format or ("yaml" if args.out and Path(args.out).suffix in (".yaml", ".yml") else "json")
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable(out)  # before the export loads the model: fail in a second, not a minute
    config = export_config(args.storage, args.study)
    text = render(config, fmt)
    if out is None:
        sys.stdout.write(text)
        return 0
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise LLRDSearchError(f"--out: cannot write {out}: {err.strerror}; pick a writable path") from None
    extra = f", confirmed {config['confirmed']['mean']:.4f} ± {config['confirmed']['std']:.4f}" if config["confirmed"] else ""
    print(f"wrote {out}: trial {config['trial']} ({_lrs(config)}), validation {config['metric']} {config['validation_score']:.4f}{extra}", file=sys.stderr)
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
