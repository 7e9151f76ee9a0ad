"""``llrd-search dashboard``: optuna-dashboard on the study storage, on loopback by default.

optuna-dashboard has no authentication and its API can edit and delete studies, so it binds to
127.0.0.1 unless the user names another host, and then we warn. It is served by the standard
library's WSGI server with one thread per request (the web page polls several endpoints at once).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from llrd_search.exceptions import LLRDSearchError
from llrd_search.study.storage import mask_url, opened_storage

NO_AUTH_WARNING = (
    "warning: the dashboard has no authentication and can delete studies; anyone who reaches "
    "{host}:{port} can. Prefer the default 127.0.0.1 and an SSH tunnel (ssh -L {port}:127.0.0.1:{port} HOST)."
)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6ThreadingServer(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the page polls every few seconds; request lines would flood the terminal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_url(host: str, port: int) -> str:
    # A wildcard bind is reached through the machine's name, not through 0.0.0.0.
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/dashboard/"


@contextlib.contextmanager
def dashboard_server(url: str, host: str = "127.0.0.1", port: int = 8080) -> Iterator[WSGIServer]:
    """A bound (not yet serving) WSGI server for optuna-dashboard on ``url``; port 0 picks a free
    one. The server and its storage are closed on leaving the block, however it is left."""
    import optuna_dashboard

    with opened_storage(url, must_exist=True) as storage:
        server_class = _IPv6ThreadingServer if ":" in host else _ThreadingServer
        try:
            server = make_server(host, port, optuna_dashboard.wsgi(storage), server_class=server_class, handler_class=_QuietHandler)
        except OSError as err:
            raise LLRDSearchError(f"--host/--port: cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None
        try:
            yield server
        finally:
            server.server_close()


def serve(url: str, host: str = "127.0.0.1", port: int = 8080, *, say: Callable[[str], None] = print) -> None:
    """Serve until interrupted, after saying where (never with the storage password)."""
    if not is_loopback(host):
        say(NO_AUTH_WARNING.format(host=host, port=port))
    with dashboard_server(url, host, port) as server:
        say(f"optuna-dashboard for {mask_url(url)} at {dashboard_url(host, server.server_port)}  (Ctrl-C stops it)")
        server.serve_forever()
