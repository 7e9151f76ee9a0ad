"""Divergence: tell from a run's training losses that it has blown up, so the trial ends early.

With learning rates far too high (base and head LR of 1-10) the loss climbs to hundreds while
staying finite; left alone such a run trains to the end (slowly) and scores the majority class.
One rule covers both ways a run blows up:

- a loss that is not finite (NaN or inf), at any step;
- the median of the last ``WINDOW`` step losses above ``FACTOR`` times the starting level: the
  loss of the first step, the only one no update has touched yet (with LRs of 1-10 the loss is in
  the tens by step 3, so a mean over the first steps would already be diverged), and never below
  ln(num_labels), the loss of a uniform guess, so a model that starts near zero loss (one that was
  fine-tuned already) is not flagged for ordinary noise.

Why this never fires on a healthy run: a fresh head starts at about ln(num_labels) (0.69 for two
classes) and fine-tuning only lowers the loss; three times that level (2.1 for two classes) is
far worse than guessing. A median over 8 steps ignores a few bad batches. Measured (median / start,
2 seeds each): the tiny test BERT, 6 epochs at base/head LRs from 1e-4/1e-3 to 1e-2/5e-2, peaked
at 1.07; MiniLM on 800 SST-2 sentences at the quickstart space's corners (5e-6/1e-5 to 2e-4/5e-3)
at 1.02. Base/head LRs of 1/1, 10/10 (tiny) and 1/10 (MiniLM) crossed 3 at the first check (step
7, 0-based), with medians from 2.7 to 866.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from llrd_search.exceptions import DivergedError

WINDOW = 8
FACTOR = 3.0


class DivergenceGuard:
    """Feed it every step's loss in order (:meth:`update`); it raises :class:`DivergedError`."""

    def __init__(self, num_labels: int = 2, window: int = WINDOW, factor: float = FACTOR):
        self.window, self.factor = window, factor
        self.floor = math.log(max(2, num_labels))
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=window)
        self.steps = 0
        self.peak_ratio = 0.0  # highest median / start seen: how close a run came (for tests and tuning)

    @property
    def start(self) -> float | None:
        return None if self.first is None else max(self.first, self.floor)

    def update(self, losses: list[float], first_step: int) -> None:
        """Check the losses of steps ``first_step``, ``first_step + 1``, ... (0-based, as the loop counts)."""
        for i, loss in enumerate(losses):
            step = first_step + i
            self.steps += 1
            if not math.isfinite(loss):
                raise DivergedError(f"loss became {loss} at step {step} (learning rate too high?)")
            if self.first is None:
                self.first = loss
            self.recent.append(loss)
            if len(self.recent) < self.window:
                continue
            start = self.start
            median = statistics.median(self.recent)
            self.peak_ratio = max(self.peak_ratio, median / start)
            if median > self.factor * start:
                raise DivergedError(
                    f"loss diverged at step {step}: median of the last {self.window} steps {median:.3g} "
                    f"> {self.factor:g} x the starting {start:.3g} (learning rate too high?)"
                )
