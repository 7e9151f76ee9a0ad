"""Packed evaluation: the validation (or test) split through the copies whose slots are due, and the
attention mask in the form that spares the model a device sync per forward."""

from __future__ import annotations

import numpy as np
import torch

from llrd_search.engine.data import Encoded
from llrd_search.engine.metrics import score
from llrd_search.engine.packed_model import PackState, only_copies
from llrd_search.engine.train import prepared_mask, to_device


@torch.inference_mode()
def evaluate_packed(
    model: torch.nn.Module,
    state: PackState,
    data: Encoded,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    metric: str = "accuracy",
    copies: list[int] | None = None,
) -> list[float]:
    """The ``metric`` on ``data`` of ``copies`` (None: every copy), in that order, in one pass: each
    batch is fed to all those copies at once, and the others compute nothing."""
    with only_copies(state, copies, device):
        return _evaluate(model, state, data, pad_id=pad_id, batch_size=batch_size, device=device, dtype=dtype, metric=metric)


def _evaluate(model: torch.nn.Module, state: PackState, data: Encoded, *, pad_id: int, batch_size: int, device: torch.device,
              dtype: torch.dtype | None, metric: str) -> list[float]:
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    predictions = []
    for i in range(0, len(order), batch_size):
        batch = data.batch(order[i : i + batch_size], pad_id)
        batch.pop("labels")
        rows = len(batch["input_ids"])
        state.rows = rows
        batch = to_device({name: v.repeat(state.k, 1) for name, v in batch.items()}, device)
        batch["attention_mask"] = prepared_mask(model, batch["attention_mask"], dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**batch).logits
        predictions.append(logits.reshape(state.k, rows, -1).argmax(-1))
    model.train(was_training)
    if not predictions:
        return [0.0] * state.k
    predicted = torch.cat(predictions, dim=1).cpu().numpy()
    return [score(metric, predicted[k], data.labels[order]) for k in range(state.k)]
