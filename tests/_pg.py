"""PostgreSQL for the tests: a fresh database per test session on the server at 127.0.0.1:5432,
and a private password-enforcing server for the password cases (the shared one trusts everyone).

Import the fixtures into a test module with ``from _pg import pg_url, ...  # noqa: F401``.
An unreachable server FAILS the tests; set ``LLRD_SKIP_POSTGRES=1`` to skip them deliberately.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_HOST = os.environ.get("LLRD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LLRD_TEST_PG_PORT", "5432"))
PG_ADMIN_USER = os.environ.get("LLRD_TEST_PG_USER", "postgres")
SECRET = "s3cr3t-XYZ"


def _require_postgres() -> None:
    if os.environ.get("LLRD_SKIP_POSTGRES") == "1":
        pytest.skip("LLRD_SKIP_POSTGRES=1")


def admin_connect(dbname: str = "postgres", **kw):
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN_USER, dbname=dbname, autocommit=True, connect_timeout=5, **kw)


def url_for(db: str, user: str = PG_ADMIN_USER, password: str | None = None, port: int = PG_PORT) -> str:
    auth = f"{user}:{password}" if password else user
    return f"postgresql+psycopg://{auth}@{PG_HOST}:{port}/{db}"


def wait_until_up(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin_connect().close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def restart_server() -> None:
    """Restart the shared cluster (root only), as an operator or a crash-restart would."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True, capture_output=True, timeout=120)


def ensure_server_running() -> None:
    try:
        admin_connect().close()
    except Exception:
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], capture_output=True, timeout=120)
        wait_until_up()


@pytest.fixture(scope="session")
def pg_db() -> Iterator[str]:
    """Name of a fresh database on the shared server, dropped at the end of the session."""
    _require_postgres()
    try:
        admin_connect().close()
    except Exception as err:
        pytest.fail(f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable ({err}); start it (.ci/run does) or set LLRD_SKIP_POSTGRES=1")
    name = f"llrd_test_{uuid.uuid4().hex[:10]}"
    with admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    ensure_server_running()
    with admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_db: str) -> str:
    return url_for(pg_db)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("initdb not found: install postgresql (the password tests start a private server)")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_server(*settings: str, password: str | None = None) -> Iterator[int]:
    """A throw-away PostgreSQL on a free port (``-c`` settings, e.g. "max_connections=4"); with
    ``password`` the superuser ``postgres`` needs it (scram-sha-256), else trust. Yields the port."""
    _require_postgres()
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="llrd-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pwfile = root / "pw"
    pwfile.write_text(f"{password or 'unused'}\n")
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = _free_port()
    data = root / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=120)

    auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"] if password else ["--auth=trust"]
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "-N")
        opts = " ".join([f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", *(f"-c {x}" for x in settings)])
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
        yield port
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def scram_pg() -> Iterator[dict]:
    """A private PostgreSQL that enforces passwords (scram-sha-256), with role ``llrd_secret`` /
    password ``SECRET`` owning database ``llrd_secret``. Yields {"port", "url", "bad_url"}."""
    _require_postgres()
    import psycopg

    with private_server(password="admin-pw") as port:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password="admin-pw", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE llrd_secret LOGIN PASSWORD '{SECRET}'")
            conn.execute("CREATE DATABASE llrd_secret OWNER llrd_secret")
        yield {
            "port": port,
            "url": url_for("llrd_secret", "llrd_secret", SECRET, port),
            "bad_url": url_for("llrd_secret", "llrd_secret", "wrong-password", port),
        }
