"""Step hooks: what runs at every training step of the built-in objective, installed for a block by
whoever runs the objective, so nobody assigns attributes on an objective it did not build.

A worker checks for a held Ctrl-C / SIGTERM at each step this way (see worker.py). The hooks live
in a context variable, not on the objective: two in-process workers on two threads sharing one
objective each see only their own. An objective with no steps to report (a user's plain
``function(trial)``) simply never calls them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

StepHook = Callable[[int, int], None]  # (step, total steps)

_HOOKS: ContextVar[tuple[StepHook, ...]] = ContextVar("llrd_search_step_hooks", default=())


@contextlib.contextmanager
def step_hook(hook: StepHook) -> Iterator[None]:
    """Call ``hook(step, total)`` at every training step run inside this block (in this thread)."""
    token = _HOOKS.set((*_HOOKS.get(), hook))
    try:
        yield
    finally:
        _HOOKS.reset(token)


def step_callback(own: StepHook | None = None) -> StepHook | None:
    """One ``on_step`` for a training loop: the hooks installed here, outermost first, then
    ``own`` (the objective's own ``on_step``, e.g. a progress bar); None when there is nothing to
    call. Taken once per trial, when the trial starts."""
    hooks = (*_HOOKS.get(), *((own,) if own is not None else ()))
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def each(step: int, total: int) -> None:
        for hook in hooks:
            hook(step, total)

    return each
