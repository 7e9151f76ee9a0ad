"""Queueing confirmation runs: what each configuration of a linked ``NAME.confirm`` study still lacks.

:func:`top_up` is the one place runs are queued, for ``confirm``'s configurations, its sweep, its
second control and the sequential rounds alike (so none of them imports another to queue).
"""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from llrd_search.study.arms import CONTROL, LLRD
from llrd_search.study.compat import study_id
from llrd_search.study.confirm_rows import interrupted, is_plain, is_sweep, planned_seeds, run_owners
from llrd_search.study.storage import budget_lock
from llrd_search.vocab import ARM_ATTR, BUDGET_ATTR, ENQUEUED_ATTR, SEED_ATTR
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR
from llrd_search.vocab import CONFIRM_OF_ATTR as SOURCE_ATTR
from llrd_search.vocab import CONFIRM_REP_ATTR as REP_ATTR
from llrd_search.vocab import SWEEP_ATTR as SWEEP_ATTR

_ACTIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def top_up(storage: optuna.storages.RDBStorage, linked: optuna.Study) -> int:
    """Queue the runs each configuration still lacks; set the budget to exactly the queued work.

    A source whose runs another source already holds (same LRs, ξ and seeds: :func:`run_owners`) queues
    nothing: it reads those runs. Idempotent and safe beside running workers (it holds the workers' budget lock). A configuration
    stops being topped up after S failures (interruptions excluded): it is unstable, and the summary
    says so. Returns how many trials were enqueued.
    """
    meta = json.loads(linked.user_attrs[META_ATTR])
    with budget_lock(storage, study_id(linked)):
        trials = linked.get_trials(deepcopy=False)
        reused = run_owners(meta, trials)  # identical runs already held by another source: not trained twice
        added = 0
        for src in meta["sources"]:
            if str(src) in reused:
                continue
            seeds = planned_seeds(meta, src)  # sequential confirmation extends only the verdict's sources
            mine = [t for t in trials if t.user_attrs.get(SOURCE_ATTR) == src]
            active = sum(t.state in _ACTIVE for t in mine)
            failed = sum(t.state == TrialState.FAIL and not interrupted(t) for t in mine)
            if failed >= seeds:
                continue
            # A failed run is replaced by one with its own seed: run i stays paired across configurations.
            held = {int(t.user_attrs.get(REP_ATTR, -1)) for t in mine if t.state in _ACTIVE}
            missing = [rep for rep in range(seeds) if rep not in held][: max(0, seeds - active)]
            for rep in missing:
                attrs = {SOURCE_ATTR: src, REP_ATTR: rep, ENQUEUED_ATTR: "confirm",
                         ARM_ATTR: CONTROL if str(src).startswith(CONTROL + ":") or is_plain(src) else LLRD}
                if "seed_base" in meta:
                    attrs[SEED_ATTR] = meta["seed_base"] + rep
                if is_sweep(src):
                    attrs[SWEEP_ATTR] = float(meta["params"][str(src)]["decay"])
                linked.enqueue_trial(meta["params"][str(src)], user_attrs=attrs)
                added += 1
        trials = linked.get_trials(deepcopy=False)
        budget = sum(t.state in _ACTIVE for t in trials)
        # 0 is right when every configuration is exhausted: a worker then asks nothing.
        linked.set_user_attr(BUDGET_ATTR, budget)
    return added
