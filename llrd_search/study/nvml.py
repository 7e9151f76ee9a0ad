"""Free GPU memory read through NVML (``nvidia-ml-py``, imported as ``pynvml``), which opens no
CUDA context: the parent of a GPU fleet asks every GPU for its free memory, and a CUDA context on
each (``torch.cuda.mem_get_info``) would hold ~0.3-0.5 GiB there for the whole run.

GPUs are matched by UUID, not by index: CUDA orders devices fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` while NVML orders them by PCI bus, and a ``CUDA_VISIBLE_DEVICES``
entry may itself be a ``GPU-``/``MIG-`` UUID. Anything NVML cannot answer gives None, and the
caller falls back to asking CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


def nvml_uuid(torch_uuid: object, visible_id: str) -> str:
    """The NVML UUID of one visible GPU: the ``CUDA_VISIBLE_DEVICES`` entry when it is already one
    (``GPU-...``, ``MIG-...``), else ``GPU-`` + the UUID torch reads from the device's properties
    (which needs no context)."""
    if visible_id.startswith(("GPU-", "MIG-")):
        return visible_id
    text = str(torch_uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def nvml_memory(uuids: Sequence[str]) -> list[tuple[int, int]] | None:
    """``(free, total)`` bytes of each GPU in ``uuids``, read through NVML; None when NVML is not
    installed, has no driver to talk to, or does not know one of the UUIDs (the caller then asks
    CUDA for all of them: one source for every GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        log.debug("NVML unavailable (%s): free memory from CUDA", err)
        return None
    try:
        out = []
        for uuid in uuids:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid))
            out.append((int(info.free), int(info.total)))
        return out
    except pynvml.NVMLError as err:
        log.debug("NVML cannot read %s (%s): free memory from CUDA", list(uuids), err)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
