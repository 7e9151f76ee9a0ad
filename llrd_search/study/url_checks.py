"""What a storage URL must be before anything connects to it: a URL that parses, a driver that is
installed, a SQLite folder that exists and is writable (and, for a command that only reads, a
SQLite file that exists), checked without connecting or writing; and which key its errors name
(``--storage``, or ``study.storage`` when the URL came from the study file)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from llrd_search.exceptions import StorageError
from llrd_search.study.proxy import is_proxy_url
from llrd_search.study.resilience import read_only_message
from llrd_search.study.urls import mask_url


def check_storage_url(url: str, *, must_exist: bool = False) -> None:
    """What :func:`open_storage` refuses before it connects (a URL that does not parse, a SQLite
    folder that is missing or read-only, a missing driver; with ``must_exist``, a SQLite file that
    is not there), without connecting or writing."""
    if is_proxy_url(url):
        return
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, ValueError):
        raise StorageError(f"--storage: '{mask_url(url)}' is not a database URL (e.g. sqlite:///study.db)") from None
    except Exception as err:  # NoSuchModuleError: an unknown backend or driver name
        raise StorageError(f"--storage: no driver for {mask_url(url)}: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        check_sqlite_file(url, parsed.database, parsed.query.get("mode"))
        if must_exist:
            check_sqlite_exists(parsed.database)
        return
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise StorageError(f"--storage: no driver for {mask_url(url)}: {err} ({driver_hint(parsed.get_backend_name())})") from None


def driver_hint(backend: str) -> str:
    """What to install for a database backend whose SQLAlchemy driver is missing."""
    if backend == "postgresql":
        return "for PostgreSQL: pip install 'psycopg[binary]' and write the URL as postgresql+psycopg://..."
    if backend in ("mysql", "mariadb"):
        return f"for MySQL/MariaDB: pip install pymysql and write the URL as {backend}+pymysql://..."
    return f"install the Python driver SQLAlchemy uses for {backend}, or use PostgreSQL or SQLite"


def check_sqlite_file(url: str, database: str | None, mode: object) -> None:
    """Refuse, at once, a SQLite database that workers cannot share or llrd-search cannot write:
    otherwise the first write fails like an outage and is retried for minutes."""
    if not database or database == ":memory:" or mode == "memory":
        raise StorageError(
            f"--storage: '{url}' is an in-memory SQLite database: it vanishes when this process exits "
            "and no worker can reach it; use a file, e.g. sqlite:///study.db"
        )
    path = Path(database)
    if not path.parent.is_dir():
        raise StorageError(f"--storage: folder {path.parent} for the SQLite file does not exist")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StorageError(read_only_message(url))
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StorageError(
            f"--storage: folder {path.parent} is not writable, and SQLite keeps its journal "
            f"({path.name}-wal, {path.name}-shm) and llrd-search its lock file there: "
            "make the folder writable or put the database in another folder"
        )


def check_sqlite_exists(database: str) -> None:
    if not Path(database).is_file():
        raise StorageError(
            f"--storage: SQLite file {database} does not exist, so it holds no study; check the path "
            "(a study is made by 'llrd-search create STUDY.toml' or 'llrd-search run STUDY.toml')"
        )


@contextlib.contextmanager
def storage_named(key: str) -> Iterator[None]:
    """Storage errors inside the block name ``key`` (``study.storage``: the URL came from the study
    file) where they say ``--storage``, the flag most URLs come from."""
    try:
        yield
    except StorageError as err:
        if key == "--storage" or "--storage" not in str(err):
            raise
        raise type(err)(str(err).replace("--storage", key)) from None
