"""Regenerate every committed report under docs/results/ from its committed database with today's
code, training nothing: a confirmation made before the two-candidate control first gets its second
candidate (ξ = 1 at the winner's LRs, whose runs the decay sweep already holds: reused, as
bench/two_controls.py showed), then `llrd-search report`, with paths relative to the study file.
Run from anywhere: ``bash bench/results.sh`` (no arguments) or ``python bench/committed_reports.py``.
tests/test_committed_results.py fails when a committed summary.json lacks a key today's report writes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (study file, committed database, report folder), all relative to the repository root.
REPORTS = [
    ("studies/sst2-minilm-full.toml", "docs/results/sst2-minilm-full.db", "docs/results/sst2"),
    ("studies/trec-minilm-full.toml", "docs/results/trec-minilm-full.db", "docs/results/trec"),
    ("bench/sst2-cpu-verdict.toml", "docs/results/verdict-cost/fixed.db", "docs/results/verdict-cost/fixed-report"),
    ("bench/sst2-cpu-verdict.toml", "docs/results/verdict-cost/auto.db", "docs/results/verdict-cost/auto-report"),
]


def bring_up_to_date(url: str, name: str) -> None:
    """What today's ``confirm`` would add to an older confirmation without training: the plain control
    candidate. Refuses (and leaves the database as it was) if that would queue a run to train."""
    import json
    import shutil

    import optuna

    from llrd_search.study.confirm_rows import PLAIN, confirm_name
    from llrd_search.study.controls import add_plain
    from llrd_search.vocab import CONFIRM_ATTR

    linked = next((s for s in optuna.get_all_study_summaries(url) if s.study_name == confirm_name(name)), None)
    if linked is None or any(str(k).startswith(PLAIN) for k in json.loads(linked.user_attrs[CONFIRM_ATTR])["sources"]):
        return
    db = Path(url.removeprefix("sqlite:///"))
    backup = db.with_suffix(".db.bak")
    shutil.copy(db, backup)
    add_plain(url, name)
    study = optuna.load_study(study_name=confirm_name(name), storage=url)
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        shutil.move(backup, db)
        raise SystemExit(f"{db}: the second control candidate needs runs the study does not hold; run confirm on a GPU instead")
    backup.unlink()


def regenerate(root: Path = ROOT, out_root: Path | None = None) -> list[Path]:
    """Write each report (into ``out_root`` instead of its committed folder when given); return the folders."""
    from llrd_search.results_api import report, resolve_study

    written = []
    for study_file, db, folder in REPORTS:
        # The database, not the study file's default storage: the committed one is what the pages cite.
        url, name = resolve_study(root / study_file, f"sqlite:///{root / db}")
        out = (out_root / folder) if out_root else root / folder
        if out_root is None:  # a check into another folder (the test) never writes the committed database
            bring_up_to_date(url, name)
        report(url, name, out, study_file=root / study_file)
        (out / "report.html").unlink()  # the pages link summary.md and the PNGs; the HTML only repeats them, 0.5 MB each
        written.append(out)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for folder in regenerate():
        print(f"wrote {folder.relative_to(ROOT)}")
