"""Confirmation: re-run the search's top-K configurations with S fresh seeds each.

A search picks the trial with the best validation accuracy, which is partly the luck of its one
seed. Confirmation re-runs each of the K best distinct configurations S times in a *linked study*
named ``<study>.confirm`` in the same storage, so ordinary workers run it (in parallel, on other
machines, resumable) and the report can read it back.

The linked study copies the search's spec with ``sampler = "random"``, ``pruner = "none"``, no
paper points, and ``study.trial_seed_offset = SEED_OFFSET``: trial seeds (``seed + offset +
trial.number``) then differ from every search trial's, while ``study.seed`` -- which draws the data
subsample and a validation split carved from train -- stays, so confirmation runs see exactly the
search's data and only head initialisation and batch order are re-rolled.

Every confirmation run is an enqueued trial tagged ``llrd:confirm_of`` (the source trial number) and
``llrd:confirm_rep``. The budget is kept equal to the finished + queued + running trials, so a
worker only runs queued ones; a trial that fails is replaced by :func:`top_up` (up to S failures
per configuration). A trial without the tag (a worker that sampled after a failure) is ignored.

Paired seeds: run i of every configuration trains with the same seed (``llrd:seed`` on the queued
trial, ``seed + offset + i``), so the same data order and head initialisation. When the search has
a control arm (``NAME.control``), its best trial is re-run with those seeds too (source key
``control:N``), and :func:`paired_verdict` compares the confirmed winner with it seed by seed.

The decay sweep (``--decay-sweep``, :mod:`sweep`) queues its runs here too (source key ``sweep:ξ``).
Reading the runs back, one row per configuration: :mod:`confirm_rows`.

Running ``confirm`` again continues where it stopped. Asking for more (a larger K or S) extends the
linked study; asking for less never discards runs: the stored K and S are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from llrd_search.exceptions import LLRDSearchError, NoCompleteTrialError, StorageError
from llrd_search.sequential import FUTILITY, looks
from llrd_search.spec import Range, SpaceSection, StudySpec
from llrd_search.stats import paired_verdict, t_quantile, verdict, welch_threshold
from llrd_search.study.arms import CONTROL, load_control
from llrd_search.study.confirm_rows import (
    SUFFIX,
    confirm_name,
    confirmation_summary,
    control_summary,
    is_plain,
    is_sweep,
    read_meta,
)
from llrd_search.study.controls import keep_verdict
from llrd_search.study.queue import top_up
from llrd_search.study.storage import create_study, load_study, opened_storage, opened_study, spec_of
from llrd_search.study.sweep import keep_sweep, parse_decays, prepare_sweep, sweep_summary
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR
from llrd_search.vocab import PARAMS
from llrd_search.vocab import SWEEP_ATTR as SWEEP_ATTR

__all__ = ["parse_decays", "sweep_summary", "t95", "welch_threshold", "paired_verdict", "confirmation_summary", "control_summary", "verdict"]


def t95(df: float) -> float:
    """Two-sided 95 % Student-t quantile (scipy.stats)."""
    return t_quantile(df)

SEED_OFFSET = 100_000
Z95 = 1.959963984540054  # two-sided 95 % normal quantile (the report's binomial interval)


@dataclass
class Plan:
    """What the linked study holds: which search trials, how many seeds each."""

    source_study: str
    study_name: str
    sources: list[int]
    seeds: int
    created: bool
    note: str = ""


def _key(params: dict[str, float]) -> tuple[float, ...]:
    return tuple(float(params[p]) for p in PARAMS)


def top_trials(trials: list[FrozenTrial], k: int, keep: list[int] | None = None) -> list[FrozenTrial]:
    """``keep`` (trial numbers) first, then the best complete trials with params not yet chosen,
    until there are ``k``; ties go to the earlier trial. Distinct params: a retried or re-enqueued
    point counts once."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    by_number = {t.number: t for t in complete}
    chosen = [by_number[n] for n in keep or [] if n in by_number]
    seen = {_key(t.params) for t in chosen}
    for t in sorted(complete, key=lambda t: (-t.value, t.number)):
        if len(chosen) >= k:
            break
        if _key(t.params) not in seen:
            seen.add(_key(t.params))
            chosen.append(t)
    return chosen


def _confirm_spec(spec: StudySpec, name: str, budget: int) -> StudySpec:
    copy = spec.model_copy(deep=True)
    copy.study.name = name
    copy.study.n_trials = budget
    copy.study.sampler = "random"
    copy.study.pruner = "none"
    copy.study.trial_seed_offset = spec.study.trial_seed_offset + SEED_OFFSET
    copy.study.enqueue_paper_points = False
    copy.study.enqueue = []
    copy.study.control_fraction = 0.0
    # Only queued points run here (the control's ξ = 1, a swept ξ): a space that holds them all.
    copy.space = SpaceSection(base_lr=Range(low=1e-12, high=10.0, log=True), head_lr=Range(low=1e-12, high=10.0, log=True),
                              decay=Range(low=1e-6, high=1.0))
    return copy


def _control_best(source: optuna.Study) -> FrozenTrial | None:
    control = load_control(source)
    if control is None:
        return None
    done = [t for t in control.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def prepare(url: str, study_name: str, top: int, seeds: int) -> Plan:
    """Create (or extend) the linked study and queue every missing run. Runs nothing."""
    if top < 1 or seeds < 1:
        raise LLRDSearchError(f"--top and --seeds must be >= 1 (got --top {top} --seeds {seeds})")
    with opened_storage(url, must_exist=True) as storage:
        source = load_study(storage, study_name)
        if META_ATTR in source.user_attrs:
            origin = json.loads(source.user_attrs[META_ATTR])["source_study"]
            raise StorageError(f"--study: '{study_name}' is itself a confirmation study; pass --study {origin}")
        spec = spec_of(source)
        name = confirm_name(study_name)
        if len(name) > 128:
            raise StorageError(f"--study: '{study_name}' is too long to add '{SUFFIX}' (128 characters at most)")
        trials = source.get_trials(deepcopy=False)
        old = read_meta(storage, name)
        keep = old["sources"] if old else []
        want_k, want_s = max(top, old["top"] if old else 0), max(seeds, old["seeds"] if old else 0)
        chosen = top_trials(trials, want_k, keep)
        if not chosen:
            raise NoCompleteTrialError(f"--study: '{study_name}' has no complete trial yet; run the search first")
        note = ""
        if old and (top < old["top"] or seeds < old["seeds"]):
            note = f"'{name}' already holds top {old['top']} x {old['seeds']} seeds; kept those (runs are never discarded)"
        if len(chosen) < want_k:
            note = f"only {len(chosen)} distinct complete configuration(s) in '{study_name}'; confirming those"
        if old:
            linked, created = load_study(storage, name), False
        else:
            linked, created = create_study(_confirm_spec(spec, name, len(chosen) * want_s), storage)
        meta = {
            "source_study": study_name,
            "top": want_k,
            "seeds": want_s,
            "sources": [t.number for t in chosen],
            "params": {str(t.number): t.params for t in chosen},
            "search_accuracy": {str(t.number): t.value for t in chosen},
            "seed_base": spec.study.seed + spec.study.trial_seed_offset + SEED_OFFSET,
        }
        # The control arm's best, re-run with the same seeds: kept once chosen (its runs are paired).
        old_control = [k for k in (old or {}).get("sources", []) if str(k).startswith(CONTROL + ":")]
        control = _control_best(source)
        if old_control:
            meta["sources"].append(old_control[0])
            meta["params"][old_control[0]] = old["params"][old_control[0]]
            meta["search_accuracy"][old_control[0]] = old["search_accuracy"][old_control[0]]
        elif control is not None:
            key = f"{CONTROL}:{control.number}"
            meta["sources"].append(key)
            meta["params"][key] = control.params
            meta["search_accuracy"][key] = control.value
        keep_sweep(old, meta)  # a decay sweep already queued stays (its runs are paired)
        keep_verdict(old, meta)
        linked.set_user_attr(META_ATTR, json.dumps(meta))
        top_up(storage, linked)
        return Plan(study_name, name, [k for k in meta["sources"] if not is_sweep(k) and not is_plain(k)], want_s, created, note)


def retry_hook(url: str, study_name: str) -> Callable[[optuna.Study, FrozenTrial], None]:
    """``on_trial_end`` for an in-process worker: replace a failed run before the worker asks again,
    so it never samples an untagged point."""

    def hook(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            with opened_storage(url) as storage:
                top_up(storage, load_study(storage, study_name))

    return hook


def _pending(url: str, name: str) -> int:
    with opened_study(url, name) as study:
        trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    return len(trials)


def run_confirmation(
    url: str,
    study_name: str,
    top: int,
    seeds: int | str,
    run_workers: Callable[[str], None],
    *,
    max_rounds: int = 3,
    decays: list[float] | None = None,
    max_seeds: int = 10,
    min_effect: float = 0.005,
    futility: float = FUTILITY,
    sweep_seeds: int | None = None,
) -> tuple[Plan, list[dict]]:
    """Prepare the linked study, then let ``run_workers(linked_name)`` run it until every
    configuration has its S runs (a round re-queues failed runs; at most ``max_rounds``); then the
    second control candidate, ξ = 1 at the winner's LRs (:func:`controls.add_plain`), on the same seeds.

    ``seeds="auto"``: S is the first look's (3), and the verdict's sources then get more paired seeds
    in rounds until it is decided (:func:`rounds.run_sequential`, at most ``max_seeds``; ``min_effect``
    in accuracy units; ``futility`` the conditional power below which it stops). With
    ``decays`` (:func:`parse_decays`), then queue and run the decay sweep of the confirmed winner, on
    ``sweep_seeds`` of the winner's seeds (:func:`sweep.prepare_sweep`)."""
    from llrd_search.study.controls import add_plain
    from llrd_search.study.rounds import run_sequential

    auto = seeds == "auto"
    plan = prepare(url, study_name, top, looks(max_seeds)[0] if auto else int(seeds))
    run = lambda: _run_rounds(url, plan.study_name, run_workers, max_rounds)  # noqa: E731
    run()
    if add_plain(url, study_name) is not None:
        run()
    if auto:
        run_sequential(url, study_name, run, max_seeds, min_effect, futility)
    if decays:
        prepare_sweep(url, study_name, decays, sweep_seeds)
        with opened_storage(url) as storage:
            top_up(storage, load_study(storage, plan.study_name))  # queue the sweep's runs
        run()
    return plan, confirmation_summary(url, study_name) or []


def _run_rounds(url: str, name: str, run_workers: Callable[[str], None], max_rounds: int) -> None:
    for _ in range(max_rounds):
        if not _pending(url, name):
            break  # all done: do not load a model for nothing
        run_workers(name)
        with opened_storage(url) as storage:
            if top_up(storage, load_study(storage, name)) == 0:
                break
