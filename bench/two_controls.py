"""Re-read a committed study with the two-candidate control (issue 17.3), training nothing.

Copies STUDY.db, queues the second control candidate (ξ = 1 at the confirmed LLRD winner's LRs) in
the copy's linked study, where the decay sweep's ξ = 1 runs already hold exactly those runs (same
LRs, same seeds), so they are reused and nothing is queued; then writes the report of the copy.

Usage: python3 bench/two_controls.py docs/results/trec-minilm-full.db trec-minilm-full OUTDIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from llrd_search.search import report
from llrd_search.study.confirm_rows import runs_saved
from llrd_search.study.controls import add_plain


def main(db: str, study: str, out: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    copy = Path(out) / Path(db).name
    shutil.copy(db, copy)
    url = f"sqlite:///{copy.resolve()}"
    key = add_plain(url, study)
    print(f"added {key}; runs reused instead of trained: {runs_saved(url, study)}")
    written = report(url, study, Path(out) / "report")
    data = json.loads(Path(written.files["summary_json"]).read_text())
    print(json.dumps({"verdict": data["verdict"], "test": data["test"]}, indent=2))
    copy.unlink()


if __name__ == "__main__":
    main(*sys.argv[1:4])
