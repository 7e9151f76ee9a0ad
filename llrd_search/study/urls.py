"""Storage URLs as people see them: masked (no password ever shown), shareable (a command others
can paste), and the one-line reason and hint when a storage cannot be opened."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for logs, errors and reports)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<invalid storage URL>"


def shareable_url(url: str) -> tuple[str, bool]:
    """(URL without its password, whether it had one): a command others can paste, with the
    password supplied by libpq's PGPASSWORD or ~/.pgpass instead of the command line."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<invalid storage URL>", False
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return bare.render_as_string(hide_password=False), parsed.password is not None


def where(url: str) -> str:
    """The database named for a person: "SQLite file F" or "postgresql at HOST:PORT/DB"."""
    if url.startswith("grpc://"):
        return f"the llrd-search proxy at {url.removeprefix('grpc://')}"
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"SQLite file {u.database}"
    return f"{u.get_backend_name()} at {u.host or 'localhost'}:{u.port or 5432}/{u.database}"


def open_hint(err: Exception, url: str) -> str:
    """What to check when opening ``url`` failed with ``err``, as " (...)", or "" when unknown."""
    msg = str(getattr(err, "orig", None) or err)
    u = make_url(url)
    if "password authentication failed" in msg or "no password supplied" in msg:
        return " (check the user and password in --storage, or PGPASSWORD / ~/.pgpass)"
    if f'database "{u.database}" does not exist' in msg:
        return f" (create it first: createdb -h {u.host or 'localhost'} {u.database})"
    if f'role "{u.username}" does not exist' in msg:
        return " (check the user name in --storage)"
    if "refused" in msg or "timeout expired" in msg or "could not translate host name" in msg:
        return f" (is PostgreSQL running and reachable at {u.host or 'localhost'}:{u.port or 5432}?)"
    return ""


def error_reason(err: Exception, url: str) -> str:
    """The first line of the driver's message, the URL's password masked."""
    msg = str(getattr(err, "orig", None) or err).strip().splitlines()
    first = msg[0] if msg else type(err).__name__
    password = make_url(url).password
    return first.replace(str(password), "***") if password else first
