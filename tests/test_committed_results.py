"""The committed reports under docs/results/ are what today's report writes: regenerating each from
its committed database (bench/committed_reports.py, into a temporary folder) must not write a
summary.json key the committed one lacks. If this fails, run `bash bench/results.sh` and commit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import committed_reports  # noqa: E402


def missing_keys(fresh: Any, committed: Any, where: str = "") -> list[str]:
    """Keys of ``fresh`` (nested dicts, and the first item of lists of dicts) that ``committed`` lacks."""
    if isinstance(fresh, dict):
        if not isinstance(committed, dict):
            return [where.rstrip(".") or "(top)"] if fresh else []
        return [m for k, v in fresh.items()
                for m in ([f"{where}{k}"] if k not in committed else missing_keys(v, committed[k], f"{where}{k}."))]
    if isinstance(fresh, list) and fresh and isinstance(fresh[0], dict):
        return missing_keys(fresh[0], committed[0] if isinstance(committed, list) and committed else None, f"{where}[0].")
    return []


def test_missing_keys_finds_a_nested_key():
    assert missing_keys({"a": 1, "v": {"stopped": {"reason": "x"}}}, {"a": 2, "v": {}}) == ["v.stopped"]
    assert missing_keys({"s": [{"n": 1, "m": 2}]}, {"s": [{"n": 1}]}) == ["s.[0].m"]
    assert missing_keys({"t": {"x": 1}}, {"t": None}) == ["t"]
    assert missing_keys({"t": None}, {"t": {"x": 1}}) == []


def test_every_committed_summary_json_has_every_key_todays_report_writes(tmp_path, monkeypatch):
    from llrd_search.results import report

    # summary.json does not depend on the figures: skip drawing them (most of a report's time).
    for name in [n for n in dir(report.plots) if n.startswith("plot_")]:
        monkeypatch.setattr(report.plots, name, lambda *a, **k: "not drawn in this test")
    monkeypatch.setattr(report, "plot_decay_sweep", lambda *a, **k: "not drawn in this test")
    committed = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "results").rglob("summary.json")}
    assert committed == {folder for _f, _db, folder in committed_reports.REPORTS}, "a committed report that bench/results.sh does not remake"
    committed_reports.regenerate(ROOT, out_root=tmp_path)
    for _study_file, _db, folder in committed_reports.REPORTS:
        fresh = json.loads((tmp_path / folder / "summary.json").read_text())
        old = json.loads((ROOT / folder / "summary.json").read_text())
        assert not missing_keys(fresh, old), f"{folder}/summary.json is stale (run `bash bench/results.sh`): lacks {missing_keys(fresh, old)}"
        summary = (tmp_path / folder / "summary.md").read_text()
        assert "/work/" not in summary and str(ROOT) not in summary  # paths relative to the study file
