"""What each slot of a pack trains on: its own batches, stacked into one, drawn from a shared length bin.

A pack runs its K copies' batches as one stacked batch padded to the widest of the K. With each slot
bucketing by length on its own (as the unpacked loop does), the widest of K random buckets is far
wider than the typical one: on the SST-2 quickstart slice that computed ~1.9 tokens per real token at
K = 8. So with ``length_bucketing`` on, the slots share a *length profile*: the training set, sorted
by length, is cut into bins of :data:`BIN_BATCHES` batches (the same bins for every slot), the pack
picks one bin per step (:class:`LengthBins`: every bin as often as it has batches, in an order drawn
from the pack's seed), and every slot draws its next batch from that bin: a random batch of the
bin's examples, shuffled with the slot's own seed, each example once before the bin repeats for that
slot. A slot that starts with the pack sees every example exactly once an epoch; one that fills a
freed slot mid-way sees the bins in the order the pack had left, so its batch order (not its seed's
choice of examples within a bin) depends on when it started. With bucketing off each slot draws the
unpacked loop's ``batch_order`` from its own seed, unconstrained (a packed trial then reaches the
unpacked trial's numbers; tests/test_packed.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llrd_search.engine.train import batch_order

BIN_BATCHES = 4  # batches per length bin: wider bins mix more examples per step, pad more


class LengthBins:
    """The pack's shared length profile: which bin of the length-sorted training set each step draws from."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        order = np.argsort(lengths, kind="stable")
        size = batch_size * BIN_BATCHES
        self.bins = [order[i : i + size] for i in range(0, len(order), size)]
        self.batch_size = batch_size
        self._counts = np.array([math.ceil(len(b) / batch_size) for b in self.bins])
        self._rng = np.random.default_rng(seed)
        self._round: list[int] = []

    def next_bin(self) -> int:
        if not self._round:  # a round: every bin as many times as it has batches, shuffled
            self._round = self._rng.permutation(np.repeat(np.arange(len(self.bins)), self._counts)).tolist()
        return self._round.pop()


class SlotBatches:
    """One slot's batches: from its own seed; with ``bins``, from the bin the pack picked."""

    def __init__(self, seed: int, lengths: np.ndarray, batch_size: int, bucketing: bool):
        self.rng = np.random.default_rng(seed)
        self.lengths, self.batch_size, self.bucketing = lengths, batch_size, bucketing
        self._order: list[np.ndarray] = []
        self._queues: dict[int, list[np.ndarray]] = {}

    def draw(self, bins: LengthBins | None, b: int | None) -> np.ndarray:
        if bins is None or b is None:
            if not self._order:  # an epoch as the unpacked loop draws it
                self._order = batch_order(self.lengths, self.batch_size, self.rng, self.bucketing)[::-1]
            return self._order.pop()
        queue = self._queues.setdefault(b, [])
        if not queue:  # this slot's next pass over bin b
            members = self.rng.permutation(bins.bins[b])
            queue.extend(members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size))
            queue.reverse()
        return queue.pop()

def stack_batches(parts: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """K batches as one: copy k's rows at ``k*B:(k+1)*B``, padded to the longest batch and the
    widest; labels ``[K, B]`` with -100 on padding rows. A padding row attends to its first token
    only (a row with nothing to attend to would be NaN in some attention kernels)."""
    k, rows, width = len(parts), max(len(p["labels"]) for p in parts), max(p["input_ids"].shape[1] for p in parts)
    ids = torch.full((k, rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((k, rows, width), dtype=torch.long)
    mask[:, :, 0] = 1
    labels = torch.full((k, rows), -100, dtype=torch.long)
    types = torch.zeros((k, rows, width), dtype=torch.long) if "token_type_ids" in parts[0] else None
    for i, part in enumerate(parts):
        b, t = part["input_ids"].shape
        ids[i, :b, :t] = part["input_ids"]
        mask[i, :b, :] = 0
        mask[i, :b, :t] = part["attention_mask"]
        labels[i, :b] = part["labels"]
        if types is not None:
            types[i, :b, :t] = part["token_type_ids"]
    out = {"input_ids": ids.reshape(k * rows, width), "attention_mask": mask.reshape(k * rows, width)}
    if types is not None:
        out["token_type_ids"] = types.reshape(k * rows, width)
    return out, labels


def copy_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K]``: each copy's mean cross-entropy over its own real rows (what the unpacked model's loss is)."""
    k, rows = labels.shape
    ce = F.cross_entropy(logits.float().reshape(k * rows, -1), labels.reshape(-1), reduction="none", ignore_index=-100)
    return ce.reshape(k, rows).sum(1) / (labels != -100).sum(1).clamp(min=1)


def padding_profile(lengths: np.ndarray, batch_size: int, k: int, *, shared: bool = True, epochs: int = 1, seed: int = 0) -> float:
    """Tokens computed / real tokens of ``k`` slots starting together for ``epochs`` epochs, drawn as
    a pack draws them (shared bins, or each slot bucketing alone with ``shared=False``): each step
    computes ``k x rows x width`` tokens, rows and width the largest of the K batches."""
    bins = LengthBins(lengths, batch_size, seed) if shared else None
    slots = [SlotBatches(seed + 1 + i, lengths, batch_size, bucketing=True) for i in range(k)]
    computed = real = 0
    for _ in range(math.ceil(len(lengths) / batch_size) * epochs):
        b = bins.next_bin() if bins is not None else None
        picks = [s.draw(bins, b) for s in slots]
        computed += k * max(len(p) for p in picks) * max(int(lengths[p].max()) for p in picks)
        real += sum(int(lengths[p].sum()) for p in picks)
    return computed / real
