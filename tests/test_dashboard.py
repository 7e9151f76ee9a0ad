from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from llrd_search.cli import main
from llrd_search.results import dashboard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outward_ip() -> str | None:
    """This machine's non-loopback address (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if dashboard.is_loopback(ip) else ip


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def test_dashboard_serves_the_study_on_loopback(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    study = optuna.create_study(study_name="dash-study", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llrd_search", "dashboard", "--storage", url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"dashboard never answered: {proc.poll()=}"
        assert status == 200
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == ["dash-study"]
        assert _get(f"http://127.0.0.1:{port}/dashboard/")[0] == 200  # the page itself
        # bound to loopback only: the machine's outward address does not answer
        other = _outward_ip()
        if other is not None:
            with pytest.raises(OSError):
                _get(f"http://{other}:{port}/api/studies")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard/" in out
    assert "no authentication" not in err


class _FakeServer:
    server_port = 8080

    def serve_forever(self) -> None:
        raise KeyboardInterrupt


def test_dashboard_warns_off_loopback_and_never_prints_the_password(monkeypatch, capsys):
    monkeypatch.setattr(dashboard, "dashboard_server", lambda url, host, port: contextlib.nullcontext(_FakeServer()))
    secret = "postgresql+psycopg://bob:hunter2-pw@db.example:5432/llrd"
    assert main(["dashboard", "--storage", secret, "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    assert "no authentication" in err
    assert "hunter2-pw" not in out + err and "bob:***@db.example" in out
    assert main(["dashboard", "--storage", secret]) == 0
    out, err = capsys.readouterr()
    assert "no authentication" not in err and "http://127.0.0.1:8080/dashboard/" in out


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("10.1.2.3", False)])
def test_is_loopback(host, loopback):
    assert dashboard.is_loopback(host) is loopback


def test_port_in_use_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(study_name="dash-study", storage=url)  # the dashboard only reads: the file must exist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(Exception, match="pick another --port"), dashboard.dashboard_server(url, "127.0.0.1", s.getsockname()[1]):
            pass
