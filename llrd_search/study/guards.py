"""What keeps a running trial accounted for: its heartbeat, and signals held while it is recorded.

A worker (worker.py) beats for the trial it runs from a thread, so that a dead worker's trial goes
stale and is retried, and holds Ctrl-C / SIGTERM during bookkeeping (ask, tell), so that an
interrupted worker never leaves a trial RUNNING behind.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import optuna

log = logging.getLogger(__name__)


class Heartbeat:
    """Records the trial's heartbeat in the storage every ``interval`` seconds from a thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)
        storage.record_heartbeat(trial_id)  # before ask's caller can be interrupted: the trial is never beat-less
        self._thread.start()

    def _beat(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int) -> None:
        try:
            while not self._stop.wait(interval):
                try:
                    # Unretried: this loop is the retry, and a stuck beat must not outlive the trial.
                    if isinstance(storage, optuna.storages.RDBStorage):
                        optuna.storages.RDBStorage.record_heartbeat(storage, trial_id)
                    else:  # the proxy client (proxy.py)
                        storage.record_heartbeat(trial_id, retried=False)
                except Exception as err:  # a storage hiccup must not kill the training thread
                    log.warning("heartbeat failed (will retry): %s", type(err).__name__)
        finally:
            storage.remove_session()  # give this thread's connection back to the pool

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Signals:
    """SIGINT/SIGTERM raise KeyboardInterrupt, except inside :meth:`deferred` sections (bookkeeping
    that must not be cut in half), where the signal is held and raised when the section ends."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        # Remembered even when raised: Python drops an exception raised while a GC or weakref
        # callback runs ("Exception ignored in ..."), and the next check() must still see it.
        self._pending = signum
        if self._depth:
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def clear(self) -> None:
        self._pending = None

    @contextlib.contextmanager
    def deferred(self, *, raise_pending: bool = True) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if raise_pending:
            self.check()

    def check(self) -> None:
        """Raise the signal held by a deferred section, if any."""
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
