"""The README's quickstart from a clone with nothing beside it: the shipped study files read only
data inside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from llrd_search.spec import load_spec


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True).stdout.split("\0")[:-1]


def test_shipped_studies_read_data_inside_the_repo():
    for path in sorted((REPO / "studies").glob("*.toml")):
        data = Path(load_spec(path).data.path)
        if data.is_absolute():  # a local folder, not a hub id
            assert data.is_dir() and data.is_relative_to(REPO), f"{path.name} reads {data}, outside the repo"


@pytest.mark.integration
def test_create_from_a_bare_clone(tmp_path):
    clone = tmp_path / "clone" / "llrd-search"  # nothing beside it: no ../shared
    for name in _tracked_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llrd_search", "create", "studies/sst2-minilm.toml", "--storage", "sqlite:///s.db"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "created study 'sst2-minilm'" in proc.stderr and "llrd-search worker" in proc.stdout
    assert (clone / "s.db").is_file()
