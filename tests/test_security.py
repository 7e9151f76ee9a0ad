"""Security: a storage password never appears in any output; no remote code, no pickle.

The password cases use a private PostgreSQL that really checks passwords (see _pg.scram_pg):
the shared server trusts every local connection, so a leaked-but-wrong password would go unseen.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from _fleet import env, spawn, wait_for
from _pg import SECRET, scram_pg  # noqa: F401 (fixture)
from conftest import write_toy_dataset

from llrd_search.cli import main


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("small"), n_train=64, n_val=16)


def _outputs(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.postgres
def test_password_never_printed_by_any_command(capsys, write_study, scram_pg, small, tmp_path):  # noqa: F811
    url, name = scram_pg["url"], "secret"
    study = write_study(name=name, n_trials=2, data=small)
    seen: dict[str, str] = {}

    rc, seen["create"] = _outputs(capsys, ["create", str(study), "--storage", url])
    assert rc == 0
    # The printed worker command is usable as is: the password comes from PGPASSWORD / ~/.pgpass.
    assert "llrd-search worker --storage 'postgresql+psycopg://llrd_secret@127.0.0.1:" in seen["create"]
    assert "PGPASSWORD" in seen["create"]
    rc, seen["run"] = _outputs(capsys, ["run", str(study), "--storage", url])
    assert rc == 0
    rc, seen["worker"] = _outputs(capsys, ["worker", "--storage", url, "--study", name])
    assert rc == 0
    rc, seen["status"] = _outputs(capsys, ["status", "--storage", url, "--study", name])
    assert rc == 0 and "llrd_secret" in seen["status"]
    rc, seen["status json"] = _outputs(capsys, ["status", "--storage", url, "--study", name, "--format", "json"])
    assert rc == 0 and json.loads(seen["status json"])["storage"].startswith("postgresql+psycopg://llrd_secret:***@")
    rc, seen["export"] = _outputs(capsys, ["export", "--storage", url, "--study", name])
    assert rc == 0
    report_dir = tmp_path / "report"
    rc, seen["report"] = _outputs(capsys, ["report", "--storage", url, "--study", name, "--out", str(report_dir)])
    assert rc == 0
    for path in report_dir.rglob("*"):
        if path.is_file():
            seen[f"report file {path.name}"] = path.read_bytes().decode("utf-8", "replace")

    # Errors that carry the URL around.
    rc, seen["missing study"] = _outputs(capsys, ["status", "--storage", url, "--study", "nope"])
    assert rc != 0
    rc, seen["worker missing study"] = _outputs(capsys, ["worker", "--storage", url, "--study", "nope"])
    assert rc != 0
    rc, seen["conflict"] = _outputs(capsys, ["run", str(write_study("b.toml", name=name, train={"epochs": 2})), "--storage", url])
    assert rc != 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc, seen["unreachable"] = _outputs(capsys, ["status", "--storage", url.replace(f":{scram_pg['port']}/", f":{closed}/"), "--study", name])
    assert rc != 0
    rc, seen["wrong password"] = _outputs(capsys, ["status", "--storage", scram_pg["bad_url"], "--study", name])
    assert rc != 0 and "password authentication failed" in seen["wrong password"]

    assert len(seen) >= 12
    leaks = sorted(k for k, text in seen.items() if SECRET in text or "wrong-password" in text)
    assert leaks == []


@pytest.mark.postgres
def test_local_workers_get_the_password_outside_their_command_line(write_study, scram_pg, small, tmp_path):  # noqa: F811
    url, name = scram_pg["url"], "secret-workers"
    proc = spawn(["run", str(write_study(name=name, n_trials=6, train={"epochs": 25}, data=small)), "--workers", "2", "--storage", url], tmp_path / "run.log")
    try:
        # worker 0 runs in the `run` process itself, so --workers 2 starts one child
        children = wait_for(lambda: (c := psutil.Process(proc.pid).children()) and len(c) == 1 and c, 120, "1 worker process")
        cmdlines = [" ".join(c.cmdline()) for c in children]
        wait_for(lambda: "trial " in (tmp_path / "run.log").read_text(), 120, "a finished trial")  # they did connect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert all("--storage postgresql+psycopg://llrd_secret@127.0.0.1" in c for c in cmdlines), cmdlines
    assert not any(SECRET in c for c in cmdlines)
    assert SECRET not in (tmp_path / "run.log").read_text()


@pytest.mark.postgres
def test_dashboard_echo_masks_the_password(scram_pg):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llrd_search", "dashboard", "--storage", scram_pg["url"], "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    assert "optuna-dashboard for postgresql+psycopg://llrd_secret:***@" in line
    assert f"127.0.0.1:{port}" in line
    assert SECRET not in line + rest


def test_no_remote_code_and_no_pickle_by_default(write_study, small, tmp_path, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    assert main(["run", str(write_study(name="safe", n_trials=1, data=small)), "--storage", f"sqlite:///{tmp_path / 's.db'}"]) == 0
    assert calls and all(flag is False for flag in calls)
    caches = list(Path(os.environ["LLRD_SEARCH_CACHE"]).rglob("*.npz"))
    assert caches
    for path in caches:  # every cached array loads without pickle
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                assert z[key].dtype != object
