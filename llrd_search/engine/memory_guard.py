"""What a trial does about memory while it trains: gradient checkpointing, and an out-of-memory
turned into one line naming the fix (the numbers come from :mod:`llrd_search.engine.memory_check`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llrd_search.engine.memory_check import GIB, estimate_trial_memory, fixes, free_memory
from llrd_search.exceptions import OutOfMemoryError, TrainingError
from llrd_search.spec import TrainSection


def release_memory(device: torch.device) -> None:
    """Collect what is unreachable and hand the CUDA cache back, for the next trial or another process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (CUDA's), or a RuntimeError saying it (from older torch or an extension)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "CUDA out of memory" in str(err))


def out_of_memory_error(
    model: torch.nn.Module, cfg: TrainSection, *, longest: int, evaluating: bool, device: torch.device, dtype: torch.dtype | None
) -> OutOfMemoryError:
    """Free what the failed step left (gradients, the cache) and say in one line what to change:
    the batch that did not fit, what a trial needs and has, the keys that make it smaller."""
    model.zero_grad(set_to_none=True)
    release_memory(device)
    free = free_memory(device)
    sizes = [] if free is None else [f"{free / GIB:.1f} GiB free"]
    where = "CUDA" if device.type == "cuda" else device.type.upper()
    if evaluating:  # evaluation keeps no activations: only its batch can be smaller
        return OutOfMemoryError(
            f"{where} out of memory evaluating at eval_batch_size {cfg.eval_batch_size}, max_length {longest}"
            + (f" ({sizes[0]})" if sizes else "") + ": lower [train] eval_batch_size"
        )
    try:
        need = estimate_trial_memory(getattr(model, "config", None), sum(p.numel() for p in model.parameters()), cfg,
                                     max_length=longest, bf16=dtype is not None, device_type=device.type)
        sizes.insert(0, f"needs ~{need.total / GIB:.1f} GiB")
    except ValueError:  # a model without a transformers config: no estimate
        pass
    micro = f" (micro-batches of {cfg.batch_size // cfg.grad_accum})" if cfg.grad_accum > 1 else ""
    return OutOfMemoryError(
        f"{where} out of memory at batch_size {cfg.batch_size}{micro}, max_length {longest}"
        + (f" ({', '.join(sizes)})" if sizes else "") + f": {fixes(cfg)}"
    )


@contextmanager
def checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """transformers' gradient checkpointing (non-reentrant) for the block, off again after it."""
    if not on:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainingError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; set it to false")
    kwargs = {"use_reentrant": False}  # the reentrant variant drops gradients of inputs passed by keyword
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        undo = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        undo = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        undo()
