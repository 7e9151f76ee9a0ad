"""Optimizer parameter groups for layer-wise learning-rate decay (LLRD).

The rule (the product's convention, Sun et al. 2019 "How to Fine-Tune BERT"):

* the encoder has L layers, numbered 0 (bottom, next to the embeddings) ... L-1 (top);
* layer i trains at ``base_lr * decay ** (L - 1 - i)``, so ``base_lr`` is the *top* layer's LR;
* the embeddings train at ``base_lr * decay ** L``, one step below the bottom layer;
* everything above the encoder (pooler, classifier, any task head) trains at ``head_lr``;
* ``decay = 1.0`` is plain fine-tuning: the whole backbone at ``base_lr``.

Each LR group is split in two optimizer groups: ``<layer>`` with ``weight_decay`` for matrices and
``<layer>.no_decay`` with 0.0 for 1-D tensors (biases, norm weights), as is customary for BERT.

Layers are found by walking modules, not by one hard-coded path per family. The backbone is
``model.base_model`` (or, for a custom wrapper, the one ``PreTrainedModel`` inside it); the layer
stack is its largest ``nn.ModuleList`` whose entries share one class. Backbone parameters outside
the stack are placed by where they sit relative to it:

* before the stack, or beside it in the same parent (relative-position tables, projections) go to
  ``embeddings``: they feed every layer, so they get the most conservative LR;
* after it, a normalisation module joins the top layer (it finishes that layer's output); any
  other module (a pooler) goes to ``head``: it is new-ish, task-facing and sits above the encoder;
* anything outside the backbone goes to ``head``.

Placement per family (``embeddings.*`` is the backbone's embeddings module; the layer stack's
top-level path is given for layer.i; "outside" means outside the backbone):

    family              embeddings                   layer.i                head
    ------------------  ---------------------------  ---------------------  ----------------------
    BERT/RoBERTa/XLM-R  embeddings.*                 encoder.layer.i        pooler, classifier
    DeBERTa-v2/v3       embeddings.*,                encoder.layer.i        pooler (outside),
                        encoder.rel_embeddings,                             classifier
                        encoder.LayerNorm (of rel.)
    ELECTRA             embeddings.*,                encoder.layer.i        classifier
                        embeddings_project
    DistilBERT          embeddings.*                 transformer.layer.i    pre_classifier,
                                                                            classifier
    ALBERT (L = 1)      embeddings.*, encoder.       layer.shared: encoder  pooler, classifier
                        embedding_hidden_mapping_in  .albert_layer_groups
    MPNet               embeddings.*, encoder.       encoder.layer.i        classifier
                        relative_attention_bias
    ModernBERT          embeddings.*                 layers.i; final_norm   head, classifier
                                                     joins layer.{L-1}
    custom wrapper      as its PreTrainedModel       as its backbone        everything outside it

ALBERT reuses one block for all its layers, so per-layer decay cannot apply: the shared block is a
single group ``layer.shared`` at ``base_lr`` with L = 1 (embeddings at ``base_lr * decay``), and a
warning says so. Sharing is detected generically: fewer blocks than ``config.num_hidden_layers``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from llrd_search.exceptions import ModelError, ParamGroupError

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = (
    "BERT",
    "RoBERTa",
    "XLM-RoBERTa",
    "DeBERTa-v2/v3",
    "ELECTRA",
    "DistilBERT",
    "ALBERT",
    "MPNet",
    "ModernBERT",
)
EMBEDDINGS = "embeddings"
HEAD = "head"
SHARED = "layer.shared"
NO_DECAY_SUFFIX = ".no_decay"


def layer_lrs(n_layers: int, *, base_lr: float, decay: float, head_lr: float) -> dict[str, float]:
    """LR per group name for an encoder of ``n_layers`` layers, in depth order.

    Layer i gets ``base_lr * decay ** (n_layers - 1 - i)`` (``base_lr`` is the top layer's LR),
    embeddings ``base_lr * decay ** n_layers``, ``head`` gets ``head_lr``. Pure math, so reports
    can draw the LR profile without loading a model.
    """
    _check_args(base_lr=base_lr, decay=decay, head_lr=head_lr)
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    lrs = {EMBEDDINGS: base_lr * decay**n_layers}
    for i in range(n_layers):
        lrs[f"layer.{i}"] = base_lr * decay ** (n_layers - 1 - i)
    lrs[HEAD] = head_lr
    return lrs


def count_layers(model: nn.Module) -> int:
    """L of the LR rule: the number of encoder layers with their own weights (1 for ALBERT)."""
    _, stack, shared = _find_layers(model)
    return 1 if shared else len(stack)


def build_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    decay: float,
    head_lr: float,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Torch optimizer param groups implementing layer-wise LR decay.

    With L encoder layers numbered 0 (bottom) ... L-1 (top), layer i trains at
    ``base_lr * decay ** (L - 1 - i)`` (``base_lr`` is the top layer's LR), the embeddings at
    ``base_lr * decay ** L`` and everything above the encoder (pooler, classifier, task head) at
    ``head_lr``. ``decay = 1.0`` is plain fine-tuning. ALBERT's shared block counts as L = 1.

    Each group holds ``params``, the real ``lr``, ``weight_decay``, ``name``, ``layer``, ``depth``
    (0 embeddings, i + 1 for layer i, L + 1 head) and ``n_params``. 1-D tensors go in
    ``<layer>.no_decay`` with weight decay 0.0. Empty groups are omitted; groups come in depth
    order, decayed half first. Frozen parameters are left out; tied weights appear once.

    Raises ValueError on bad arguments, ModelError if the encoder layers cannot be found and
    ParamGroupError if the groups do not cover every trainable parameter exactly once.
    """
    _check_args(base_lr=base_lr, decay=decay, head_lr=head_lr, weight_decay=weight_decay)
    backbone, stack, shared = _find_layers(model)
    n_layers = 1 if shared else len(stack)
    if shared:
        logger.warning(
            "%s shares its layers (%d blocks reused for %d layers, as in ALBERT): per-layer decay "
            "cannot apply; the shared block is one group 'layer.shared' at base_lr and the "
            "embeddings train at base_lr * decay.",
            type(backbone).__name__,
            len(stack),
            backbone.config.num_hidden_layers,
        )
    lrs = layer_lrs(n_layers, base_lr=base_lr, decay=decay, head_lr=head_lr)
    if shared:
        lrs = {EMBEDDINGS: lrs[EMBEDDINGS], SHARED: lrs["layer.0"], HEAD: lrs[HEAD]}
    depths = {layer: depth for depth, layer in enumerate(lrs)}

    placement = _place_params(backbone, stack, shared)
    buckets: dict[str, list[torch.Tensor]] = {}
    seen: set[int] = set()
    # named_parameters() dedups tied weights already; the id check guards custom modules too.
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        layer = placement.get(id(param), HEAD)
        name = layer + NO_DECAY_SUFFIX if param.ndim <= 1 else layer
        buckets.setdefault(name, []).append(param)

    groups = []
    for layer, lr in lrs.items():
        for name, wd in ((layer, weight_decay), (layer + NO_DECAY_SUFFIX, 0.0)):
            params = buckets.get(name)
            if not params:
                continue
            groups.append(
                {
                    "params": params,
                    "lr": float(lr),
                    "weight_decay": float(wd),
                    "name": name,
                    "layer": layer,
                    "depth": depths[layer],
                    "n_params": sum(p.numel() for p in params),
                }
            )
    _check_coverage(model, groups)
    return groups


def group_table(groups: list[dict]) -> list[dict]:
    """One row per layer, ``{"name", "lr", "n_params"}``, halves merged, in depth order."""
    rows: dict[str, dict] = {}
    for group in sorted(groups, key=lambda g: g["depth"]):
        row = rows.setdefault(group["layer"], {"name": group["layer"], "lr": group["lr"], "n_params": 0})
        row["n_params"] += group["n_params"]
    return list(rows.values())


def _check_args(*, base_lr: float, decay: float, head_lr: float, weight_decay: float = 0.0) -> None:
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if not head_lr > 0:
        raise ValueError(f"head_lr must be > 0, got {head_lr}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1] (1.0 = no decay), got {decay}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _unsupported(model: nn.Module, why: str) -> ModelError:
    return ModelError(
        f"cannot map the encoder layers of {type(model).__name__} to LR groups: {why}. "
        f"Supported families: {', '.join(SUPPORTED_FAMILIES)} (or a module wrapping one of them)."
    )


def check_encoder(config: object) -> None:
    """Refuse, from a model's config alone, a decoder (GPT-2, Llama, Jamba) or an encoder-decoder
    (T5, BART): their blocks stack too, so the walk below would map them, but LLRD as this package
    searches it decays over an encoder's layers. A model type transformers knows only as a causal LM
    is a decoder; one it does not know at all (remote code) is left to the walk."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder"
    elif getattr(config, "is_decoder", False) or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        kind = "a decoder-only (causal LM)"
    else:
        return
    raise ModelError(
        f"cannot map the layers of this {model_type} model to LR groups: it is {kind} architecture, and LLRD here decays "
        f"over an encoder's layers; use an encoder. Supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _find_backbone(model: nn.Module) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model.base_model
    # Outermost PreTrainedModels only: their own submodules may be PreTrainedModels too.
    found: list[tuple[str, PreTrainedModel]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    if len(found) != 1:
        if not found:
            raise _unsupported(model, "no transformers PreTrainedModel inside it")
        names = ", ".join(name for name, _ in found)
        raise _unsupported(model, f"several PreTrainedModels inside it ({names})")
    return found[0][1].base_model


def _find_layers(model: nn.Module) -> tuple[PreTrainedModel, nn.ModuleList, bool]:
    """Backbone, its stack of transformer blocks, and whether the blocks are shared (ALBERT)."""
    backbone = _find_backbone(model)
    check_encoder(backbone.config)
    best: tuple[int, int, nn.ModuleList] | None = None
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(entry) for entry in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        # Largest by parameter count; on a tie the outer list wins (ALBERT's groups vs layers).
        key = (size, -name.count("."))
        if size > 0 and (best is None or key > best[:2]):
            best = (*key, module)
    if best is None:
        raise _unsupported(model, "no nn.ModuleList of identical transformer blocks in its backbone")
    stack = best[2]
    n_config = getattr(backbone.config, "num_hidden_layers", None)
    shared = isinstance(n_config, int) and n_config > len(stack)
    return backbone, stack, shared


def _place_params(backbone: nn.Module, stack: nn.ModuleList, shared: bool) -> dict[int, str]:
    """Map id(param) -> layer name for every backbone parameter (the rest of the model is head)."""
    top = SHARED if shared else f"layer.{len(stack) - 1}"
    placement: dict[int, str] = {}

    # First placement wins: blocks go first, so "a parent's parameters" below means the rest of
    # them, and a weight tied across parts stays where it was first met.
    def put(params: Iterable[torch.Tensor], layer: str) -> None:
        for p in params:
            placement.setdefault(id(p), layer)

    for i, block in enumerate(stack):
        put(block.parameters(), SHARED if shared else f"layer.{i}")

    after_stack = False
    for child in backbone.children():
        if any(m is stack for m in child.modules()):
            # Siblings of the stack inside its parent (relative-position tables, the DeBERTa
            # rel-embedding LayerNorm, ALBERT's input projection) feed every layer.
            put(child.parameters(), EMBEDDINGS)
            after_stack = True
        elif not after_stack:
            put(child.parameters(), EMBEDDINGS)
        elif "Norm" in type(child).__name__:
            put(child.parameters(), top)  # final norm finishes the top layer's output
        else:
            put(child.parameters(), HEAD)  # pooler: above the encoder
    put(backbone.parameters(recurse=False), EMBEDDINGS)
    return placement


def _check_coverage(model: nn.Module, groups: list[dict]) -> None:
    """Raise ParamGroupError unless every trainable parameter is in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    counts: dict[int, int] = {}
    for group in groups:
        for p in group["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    missing = [i for i in names if i in trainable and i not in counts]
    doubled = [i for i, c in counts.items() if c > 1]
    strangers = [i for i in counts if i not in trainable]
    problems = []
    for label, ids in (
        ("left out of every group", missing),
        ("in more than one group", doubled),
        ("grouped but not trainable parameters of the model", strangers),
    ):
        if ids:
            shown = ", ".join(names.get(i, "<unnamed tensor>") for i in ids[:5])
            more = f", ... ({len(ids)} in all)" if len(ids) > 5 else f" ({len(ids)})"
            problems.append(f"{label}: {shown}{more}")
    if problems:
        raise ParamGroupError(f"param groups of {type(model).__name__} are wrong: " + "; ".join(problems))
