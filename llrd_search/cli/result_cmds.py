"""Result commands: report, confirm, export, train, dashboard: parse, call the search layer, print."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llrd_search.records import ConfirmRow, SweepRow, Verdict


def cmd_report(args: argparse.Namespace) -> int:
    from llrd_search.cli.handle import default_out
    from llrd_search.search import report

    written = report(args.storage, args.study, args.out or default_out(args, "-report"), study_file=args.study_file)
    print(f"report of study '{args.study}' in {written.storage}:", file=sys.stderr)
    for path in written.files.values():
        print(path)
    return 0


def _lrs(p: dict[str, float]) -> str:
    return f"base_lr={p['base_lr']:.3g} head_lr={p['head_lr']:.3g} decay={p['decay']:.3f}"


def _confirmed(r: ConfirmRow | SweepRow) -> str:
    return f"{r.mean:.4f} ± {r.std:.4f} (n = {r.n_text})" if r.n else f"no finished run (n = {r.n_text})"


def _test(r: ConfirmRow | SweepRow) -> str:
    return f"  test {r.test_mean:.4f}" if r.test_mean is not None else ""


def _reused(r: ConfirmRow | SweepRow) -> str:
    if r.reused_from is None:
        return ""
    src = r.reused_from
    whose = f"the control's (trial {src.split(':')[1]})" if src.startswith("control:") else f"{src}'s" if ":" in src else f"trial {src}'s"
    return f"  (reused: {whose} runs, same LRs, ξ and seeds)"


def lead_text(v: Verdict, n_configurations: int, has_control: bool) -> str:
    """What ``confirm`` says about the winner's lead over the LLRD runner-up (``v``: :class:`Verdict`)."""
    if v.runner_up is None:
        # One LLRD configuration is no verdict on its own: the comparison that matters is the control.
        which = "one LLRD configuration was confirmed" if n_configurations == 1 else f"one of {n_configurations} LLRD configurations finished"
        after = "it is compared with the control below" if has_control else "there is no other configuration to compare it with"
        return f"{which} (no LLRD runner-up to rank it against); {after}"
    if v.noise is None:
        return f"its lead over trial {v.runner_up} is {v.lead:.4f}; with one run each noise cannot be judged (use --seeds 3 or more)"
    if v.within_noise:
        return (f"its lead over trial {v.runner_up} ({v.lead:.4f}) is WITHIN NOISE (below the 95 % Welch threshold {v.noise:.4f}): "
                "noise could explain it; either is a fine choice, or add seeds/data to separate them")
    return f"its lead over trial {v.runner_up} ({v.lead:.4f}) exceeds the 95 % Welch threshold ({v.noise:.4f}): unlikely to be noise"


def cmd_confirm(args: argparse.Namespace) -> int:
    from llrd_search.console import ProgressConsole
    from llrd_search.search import confirm

    c = confirm(args.storage, args.study, top=args.top, seeds=args.seeds, decay_sweep=args.decay_sweep, workers=args.workers,
                threads=args.threads, objective=args.objective, watch=ProgressConsole(), workers_per_gpu=args.workers_per_gpu,
                max_seeds=10 if args.max_seeds is None else args.max_seeds, min_effect=args.min_effect / 100, futility=args.futility / 100,
                sweep_seeds=args.sweep_seeds)
    v, paired, sweep = c.verdict, c.paired, c.sweep
    if args.format == "json":
        print(json.dumps(c.as_dict(), indent=2))
        return 0 if v else 1
    if c.plan.note:
        print(f"note: {c.plan.note}", file=sys.stderr)
    more = " at the first look (the winner and the controls get more until the verdict is decided)" if args.seeds == "auto" else ""
    print(f"confirmation of '{args.study}': {len(c.plan.sources)} configuration(s) x {c.plan.seeds} seed(s){more}, "
          f"runs in study '{c.plan.study_name}'")
    for r in [*c.configurations, *([c.control] if c.control else []), *([c.plain] if c.plain else [])]:
        label = {"control": f"control {r.source_trial:>2}", "plain": "ξ = 1 at winner"}.get(r.arm, f"trial {r.source_trial:>4}")
        search = f"search {r.search_accuracy:.4f}" if r.search_accuracy is not None else "search    -  "
        print(f"  {label}  {_lrs(r.params)}  {search}  confirmed {_confirmed(r)}{_test(r)}{_reused(r)}")
    if v is None or c.winner is None:
        print("no confirmation run finished; run the same command again to resume", file=sys.stderr)
        return 1
    label = "winner" if v.runner_up is not None else "the LLRD configuration"
    print(f"{label}: trial {v.winner} ({_lrs(c.winner.params)}): {v.mean:.4f} ± {v.std:.4f} over {v.n} seed(s)")
    print(lead_text(v, len(c.configurations), c.control is not None))
    if sweep:
        print(f"decay sweep at base_lr={sweep[0].base_lr:.3g} head_lr={sweep[0].head_lr:.3g} (confirm trial {sweep[0].winner}), "
              f"the same {max(r.n_planned for r in sweep)} seed(s) at every ξ:")
        for r in sweep:
            print(f"  ξ = {r.decay:.3f}  {_confirmed(r)}{'  (the winner: its confirmation runs)' if r.own else ''}{_reused(r)}")
    if paired is not None:
        which = ("plain fine-tuning at the winner's own LRs" if paired.control_source == "winner_lrs"
                 else f"trial {paired.control} of the control arm")
        print(f"LLRD vs the better control (ξ = 1, {which}): {paired.text}")
        if paired.sequential:
            print(f"sequential confirmation: {paired.sequential['stopped']} ({paired.sequential['method']})")
        if paired.test:
            t = paired.test
            print(f"held-out test split (never used for a choice): LLRD {t['llrd']:.4f}, control {t['control']:.4f}: {t['text']}")
    elif c.control is None:
        print("no control arm to compare with (the search has control_fraction = 0 or predates the control arm, or its control arm has no complete trial)")
    if c.runs_saved:
        print(f"reused {c.runs_saved} finished or queued run(s) instead of training them again (same LRs, ξ, seeds, data and training)")
    from llrd_search.cli.handle import next_lines

    print("\n".join(next_lines(args, "report", "export --out best.json")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llrd_search.search import export

    e = export(args.storage, args.study, out=args.out, format=args.format)
    if e.arm == "control":  # asked for an LLRD setting: say that plain fine-tuning won instead
        print(f"note: exporting trial {e.trial} of '{e.config['arm_study']}', selected by {e.config['selected_by']}", file=sys.stderr)
    if e.out is None:
        sys.stdout.write(e.text)
        return 0
    extra = f", confirmed {e.confirmed['mean']:.4f} ± {e.confirmed['std']:.4f}" if e.confirmed else ""
    where = f" of {e.config['arm_study']}" if e.arm == "control" else ""
    print(f"wrote {e.out}: trial {e.trial}{where} ({_lrs(e.params)}), validation {e.config['metric']} {e.validation_score:.4f}{extra}",
          file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llrd_search.cli.handle import default_out
    from llrd_search.console import step_progress
    from llrd_search.search import train

    out = args.out or default_out(args, "-model")
    with step_progress("training") as on_step:
        t = train(args.config, out, storage=args.storage, study=args.study, epochs=args.epochs, train_limit=args.train_limit, threads=args.threads, force=args.force, on_step=on_step)
    m = t.metrics
    test = f", test accuracy {m['test_accuracy']:.4f}" if m["test_accuracy"] is not None else ""
    print(f"saved the model to {out}: validation accuracy {m['validation_accuracy']:.4f}{test} ({m['n_train']} training examples, {m['seconds']:.0f}s)")
    print(f"load it with: AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from llrd_search.results.dashboard import serve

    try:
        serve(args.storage, args.host, args.port, say=lambda line: print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True))
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0
