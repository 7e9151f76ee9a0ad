"""The verdict's control: one that had its chance (issue 17.3).

The control arm's best was tuned by its own few trials, which may never have reached the learning
rates where the LLRD arm won; "no evidence that LLRD helps" would then partly measure an under-tuned
control. So the verdict has two control candidates, both re-run on the same paired seeds as the
LLRD winner:

- ``control:N``: the control arm's best trial N (plain fine-tuning, its own LRs);
- ``plain:W``: plain fine-tuning (ξ = 1) at the LLRD winner W's own base and head LRs, which is
  exactly the decay sweep's ξ = 1 point (its runs are shared with the sweep, never trained twice).

The verdict's control is the better of the two by confirmed mean (:func:`pick_control`); the report
says which. This module plans the second candidate; :mod:`rounds` judges.
"""

from __future__ import annotations

import json

from llrd_search.study.arms import LLRD
from llrd_search.study.confirm_rows import PLAIN, all_rows, confirm_name, is_plain
from llrd_search.study.queue import top_up
from llrd_search.study.storage import load_study, opened_storage
from llrd_search.vocab import CONFIRM_ATTR as META_ATTR

CONTROL_ARM, WINNER_LRS = "control_arm", "winner_lrs"  # which candidate the verdict's control is
CONTROL_WORDS = {CONTROL_ARM: "the control arm's best", WINNER_LRS: "plain fine-tuning (ξ = 1) at the LLRD winner's LRs"}


def keep_verdict(old: dict | None, meta: dict) -> None:
    """Carry the verdict's own plan over into a new plan: the kept winner, its ξ = 1 control at the
    winner's LRs (``plain:W``), per-source seeds and the sequential design's state."""
    for key in ("winner", "seeds_of", "sequential"):
        if old and key in old:
            meta[key] = old[key]
    for src in (k for k in (old or {}).get("sources", []) if is_plain(k)):
        meta["sources"].append(src)
        meta["params"][src] = old["params"][src]
        meta["search_accuracy"][src] = None


def add_plain(url: str, study_name: str) -> str | None:
    """Queue the second control candidate: plain fine-tuning (ξ = 1) at the confirmed LLRD winner's
    own LRs, with the same seeds (source ``plain:W``; a run another source already holds is reused).

    The winner is the best confirmed mean now, kept from here on (``meta["winner"]``): the verdict,
    the decay sweep and later seeds all pair with it. Returns the source key, None when the search
    has no confirmed control arm (then there is no verdict) or no LLRD configuration has a finished run yet.
    """
    with opened_storage(url) as storage:
        linked = load_study(storage, confirm_name(study_name))
        meta = json.loads(linked.user_attrs[META_ATTR])
        if not any(str(k).startswith("control:") for k in meta["sources"]):
            return None  # no control arm (control_fraction = 0, a grid): no verdict to give a second control to
        if "winner" not in meta:
            rows = [r for r in all_rows(storage, study_name) or [] if r["arm"] == LLRD and r["n"]]
            if not rows:
                return None
            meta["winner"] = min(rows, key=lambda r: (-r["mean"], r["source_trial"]))["source_trial"]
        key = f"{PLAIN}:{meta['winner']}"
        if key not in meta["sources"]:
            p = meta["params"][str(meta["winner"])]
            meta["sources"].append(key)
            meta["params"][key] = {"base_lr": p["base_lr"], "head_lr": p["head_lr"], "decay": 1.0}
            meta["search_accuracy"][key] = None
        linked.set_user_attr(META_ATTR, json.dumps(meta))
        top_up(storage, linked)
        return key


def pick_control(control: dict | None, plain: dict | None) -> tuple[dict | None, str | None]:
    """(row, which): the verdict's control, the better confirmed mean of the control arm's best
    (``control``) and ξ = 1 at the winner's LRs (``plain``); a tie, or a candidate without a
    finished run, keeps the control arm's best. ``which`` is :data:`CONTROL_ARM` or :data:`WINNER_LRS`.
    Means over the seeds both finished, so a run one of them lost does not decide."""
    have = [(r, k) for r, k in ((control, CONTROL_ARM), (plain, WINNER_LRS)) if r is not None and r["n"] > 0]
    if not have:
        return None, None
    if len(have) == 1:
        return have[0]
    seeds = sorted(set(control["by_seed"]) & set(plain["by_seed"])) or None

    def mean(r: dict) -> float:
        return sum(r["by_seed"][i] for i in seeds) / len(seeds) if seeds else r["mean"]

    return (plain, WINNER_LRS) if mean(plain) > mean(control) else (control, CONTROL_ARM)
