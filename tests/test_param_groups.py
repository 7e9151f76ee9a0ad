from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from llrd_search.engine import param_groups as pg
from llrd_search.engine.param_groups import (
    build_param_groups,
    count_layers,
    group_table,
    layer_lrs,
)
from llrd_search.exceptions import ModelError, ParamGroupError

BASE, DECAY, HEAD_LR, WD = 1e-3, 0.5, 1e-2, 0.01
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
}
CONFIGS: dict[str, tuple[str, dict]] = {
    "bert": ("bert", {}),
    "roberta": ("roberta", {}),
    "xlm-roberta": ("xlm-roberta", {}),
    "deberta-v2": (
        "deberta-v2",
        {
            "relative_attention": True,
            "position_buckets": 8,
            "pos_att_type": ["p2c", "c2p"],
        },
    ),
    # v3 checkpoints use the DebertaV2 classes with a LayerNorm on the relative embeddings.
    "deberta-v3": (
        "deberta-v2",
        {
            "relative_attention": True,
            "position_buckets": 8,
            "pos_att_type": ["p2c", "c2p"],
            "norm_rel_ebd": "layer_norm",
            "position_biased_input": False,
        },
    ),
    "electra": ("electra", {"embedding_size": 16}),
    "distilbert": (
        "distilbert",
        {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37},
    ),
    "albert": ("albert", {"embedding_size": 16}),
    "mpnet": ("mpnet", {}),
    "modernbert": (
        "modernbert",
        {
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "cls_token_id": 1,
            "sep_token_id": 2,
        },
    ),
}
FAMILIES = [*CONFIGS, "custom"]

# Parameter-name prefixes whose placement is the point of the design (see the module docstring).
PLACEMENTS: dict[str, dict[str, str]] = {
    "bert": {
        "bert.embeddings.": "embeddings",
        "bert.encoder.layer.0.": "layer.0",
        "bert.encoder.layer.1.": "layer.1",
        "bert.pooler.": "head",
        "classifier.": "head",
    },
    "roberta": {
        "roberta.embeddings.": "embeddings",
        "roberta.encoder.layer.1.": "layer.1",
        "classifier.": "head",
    },
    "xlm-roberta": {
        "roberta.embeddings.": "embeddings",
        "roberta.encoder.layer.0.": "layer.0",
        "classifier.": "head",
    },
    "deberta-v2": {
        "deberta.embeddings.": "embeddings",
        "deberta.encoder.rel_embeddings.": "embeddings",
        "deberta.encoder.layer.1.": "layer.1",
        "pooler.": "head",
        "classifier.": "head",
    },
    "deberta-v3": {
        "deberta.embeddings.": "embeddings",
        "deberta.encoder.rel_embeddings.": "embeddings",
        "deberta.encoder.LayerNorm.": "embeddings",
        "deberta.encoder.layer.0.": "layer.0",
        "pooler.": "head",
        "classifier.": "head",
    },
    "electra": {
        "electra.embeddings.": "embeddings",
        "electra.embeddings_project.": "embeddings",
        "electra.encoder.layer.1.": "layer.1",
        "classifier.": "head",
    },
    "distilbert": {
        "distilbert.embeddings.": "embeddings",
        "distilbert.transformer.layer.0.": "layer.0",
        "pre_classifier.": "head",
        "classifier.": "head",
    },
    "albert": {
        "albert.embeddings.": "embeddings",
        "albert.encoder.embedding_hidden_mapping_in.": "embeddings",
        "albert.encoder.albert_layer_groups.": "layer.shared",
        "albert.pooler.": "head",
        "classifier.": "head",
    },
    "mpnet": {
        "mpnet.embeddings.": "embeddings",
        "mpnet.encoder.relative_attention_bias.": "embeddings",
        "mpnet.encoder.layer.1.": "layer.1",
        "classifier.": "head",
    },
    "modernbert": {
        "model.embeddings.": "embeddings",
        "model.layers.0.": "layer.0",
        "model.layers.1.": "layer.1",
        "model.final_norm.": "layer.1",
        "head.": "head",
        "classifier.": "head",
    },
    "custom": {
        "backbone.embeddings.": "embeddings",
        "backbone.encoder.layer.0.": "layer.0",
        "backbone.pooler.": "head",
        "out.": "head",
    },
}


class CustomHead(nn.Module):
    """Not an HF head: a bare encoder plus a Linear, to keep detection off HF class names."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = AutoModel.from_config(AutoConfig.for_model("bert", **TINY))
        self.out = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids).last_hidden_state[:, 0]
        return nn.functional.cross_entropy(self.out(hidden), labels)


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "custom":
        return CustomHead()
    model_type, extra = CONFIGS[family]
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra}))


def n_layers(family: str) -> int:
    return 1 if family == "albert" else 2


def expected_lr(layer: str, n: int, base: float = BASE, decay: float = DECAY) -> float:
    if layer == "head":
        return HEAD_LR
    if layer == "embeddings":
        return base * decay**n
    if layer == "layer.shared":
        return base
    return base * decay ** (n - 1 - int(layer.split(".")[1]))


def build(model: nn.Module, **kw: float) -> list[dict]:
    args = {
        "base_lr": BASE,
        "decay": DECAY,
        "head_lr": HEAD_LR,
        "weight_decay": WD,
    } | kw
    return build_param_groups(model, **args)


def layer_of(groups: list[dict]) -> dict[int, str]:
    return {id(p): g["layer"] for g in groups for p in g["params"]}


def loss_of(model: nn.Module) -> torch.Tensor:
    input_ids = torch.randint(3, 99, (2, 8))
    labels = torch.tensor([0, 1])
    if isinstance(model, CustomHead):
        return model(input_ids, labels)
    return model(input_ids=input_ids, labels=labels).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_lrs_per_group(family: str) -> None:
    groups = build(make(family))
    n = n_layers(family)
    expected_layers = (
        ["embeddings", "layer.shared", "head"] if family == "albert" else ["embeddings", "layer.0", "layer.1", "head"]
    )
    assert [row["name"] for row in group_table(groups)] == expected_layers
    for g in groups:
        assert g["lr"] == pytest.approx(expected_lr(g["layer"], n), rel=1e-12)
    if family != "albert":
        lrs = {g["layer"]: g["lr"] for g in groups}
        assert lrs["layer.1"] == pytest.approx(1e-3, rel=1e-12)
        assert lrs["layer.0"] == pytest.approx(5e-4, rel=1e-12)
        assert lrs["embeddings"] == pytest.approx(2.5e-4, rel=1e-12)
        assert lrs["head"] == pytest.approx(HEAD_LR, rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_param_once(family: str) -> None:
    model = make(family)
    groups = build(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    assert set(ids) == set(trainable)
    assert sum(g["n_params"] for g in groups) == sum(p.numel() for p in trainable.values())
    for g in groups:
        assert g["n_params"] == sum(p.numel() for p in g["params"])


@pytest.mark.parametrize("family", FAMILIES)
def test_placement_of_family_specific_parts(family: str) -> None:
    model = make(family)
    placed = layer_of(build(model))
    checked = 0
    for name, param in model.named_parameters():
        for prefix, layer in PLACEMENTS[family].items():
            if name.startswith(prefix):
                assert placed[id(param)] == layer, name
                checked += 1
    assert checked > 0
    for prefix in PLACEMENTS[family]:
        assert any(n.startswith(prefix) for n, _ in model.named_parameters()), prefix


@pytest.mark.parametrize("family", FAMILIES)
def test_group_shape_order_and_weight_decay(family: str) -> None:
    groups = build(make(family))
    keys = [(g["depth"], g["name"].endswith(".no_decay")) for g in groups]
    assert keys == sorted(keys)
    assert len({g["name"] for g in groups}) == len(groups)
    for g in groups:
        assert g["params"]
        assert isinstance(g["lr"], float) and isinstance(g["n_params"], int)
        if g["name"].endswith(".no_decay"):
            assert g["name"] == f"{g['layer']}.no_decay"
            assert g["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["name"] == g["layer"]
            assert g["weight_decay"] == WD
            assert all(p.ndim >= 2 for p in g["params"])
    depths = {g["layer"]: g["depth"] for g in groups}
    n = n_layers(family)
    assert depths["embeddings"] == 0 and depths["head"] == n + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_one_is_plain_fine_tuning(family: str) -> None:
    groups = build(make(family), decay=1.0)
    for g in groups:
        assert g["lr"] == (HEAD_LR if g["layer"] == "head" else BASE)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_accepts_groups_and_steps(family: str) -> None:
    model = make(family)
    groups = build(model)
    opt = torch.optim.AdamW(groups)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model).backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_count_layers(family: str) -> None:
    assert count_layers(make(family)) == n_layers(family)


def test_frozen_params_left_out() -> None:
    model = make("bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    groups = build(model)
    frozen = {id(p) for p in model.bert.embeddings.parameters()}
    assert not frozen & set(layer_of(groups))
    assert "embeddings" not in {g["layer"] for g in groups}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(g["n_params"] for g in groups) == trainable
    # Depth and LRs keep their place in the rule even when a group is missing.
    assert groups[0]["layer"] == "layer.0" and groups[0]["depth"] == 1


def test_tied_weight_of_custom_head_appears_once_in_embeddings() -> None:
    model = CustomHead()
    model.out = nn.Linear(32, 99)
    model.out.weight = model.backbone.embeddings.word_embeddings.weight
    groups = build(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert layer_of(groups)[id(model.out.weight)] == "embeddings"
    assert layer_of(groups)[id(model.out.bias)] == "head"


def test_hf_tied_mlm_decoder_appears_once() -> None:
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", **TINY))
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    groups = build(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(decoder)) == 1
    assert layer_of(groups)[id(decoder)] == "embeddings"
    assert sum(g["n_params"] for g in groups) == sum(p.numel() for p in model.parameters())


def test_albert_warns_about_shared_layers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llrd_search.engine.param_groups"):
        groups = build(make("albert"))
    assert any("shared" in r.message and "per-layer decay" in r.message for r in caplog.records)
    lrs = {g["layer"]: g["lr"] for g in groups}
    assert lrs == {
        "embeddings": pytest.approx(BASE * DECAY, rel=1e-12),
        "layer.shared": pytest.approx(BASE, rel=1e-12),
        "head": pytest.approx(HEAD_LR, rel=1e-12),
    }


def test_no_warning_without_shared_layers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llrd_search.engine.param_groups"):
        build(make("bert"))
    assert not caplog.records


@pytest.mark.parametrize(
    "model, cls_name",
    [
        (nn.Sequential(nn.Linear(4, 4)), "Sequential"),
        (nn.Linear(4, 4), "Linear"),
    ],
)
def test_unsupported_model_raises_model_error(model: nn.Module, cls_name: str) -> None:
    with pytest.raises(ModelError, match=cls_name) as err:
        build(model)
    assert "BERT" in str(err.value) and "ModernBERT" in str(err.value)
    with pytest.raises(ModelError, match=cls_name):
        count_layers(model)


def test_wrapper_with_two_backbones_is_ambiguous() -> None:
    model = nn.ModuleDict({"a": make("bert"), "b": make("bert")})
    with pytest.raises(ModelError, match="several PreTrainedModels"):
        build(model)


def test_coverage_checker_names_missing_and_duplicate_params() -> None:
    model = make("bert")
    groups = build(model)
    dropped = groups[-1]["params"][-1]
    broken = [dict(g, params=[p for p in g["params"] if p is not dropped]) for g in groups]
    with pytest.raises(ParamGroupError, match=r"left out of every group: classifier\.bias \(1\)"):
        pg._check_coverage(model, broken)
    doubled = [*groups, dict(groups[0])]
    with pytest.raises(ParamGroupError, match="in more than one group"):
        pg._check_coverage(model, doubled)
    stranger = [*groups, {"params": [nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ParamGroupError, match="not trainable"):
        pg._check_coverage(model, stranger)


def test_coverage_error_surfaces_from_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """build runs the checker on its own groups and lets its error through to the caller."""
    model = make("bert")
    real_check = pg._check_coverage

    def check_with_extra_group(model: nn.Module, groups: list[dict]) -> None:
        real_check(model, [*groups, {"params": [model.classifier.weight]}])

    monkeypatch.setattr(pg, "_check_coverage", check_with_extra_group)
    with pytest.raises(ParamGroupError, match=r"classifier\.weight"):
        build(model)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"base_lr": 0.0}, "base_lr"),
        ({"base_lr": -1e-3}, "base_lr"),
        ({"head_lr": 0.0}, "head_lr"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.01}, "decay"),
        ({"decay": float("nan")}, "decay"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_args_raise_value_error(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(make("bert"), **kw)
    if message != "weight_decay":
        args = {"base_lr": BASE, "decay": DECAY, "head_lr": HEAD_LR} | kw
        with pytest.raises(ValueError, match=message):
            layer_lrs(2, **args)


def test_layer_lrs_exact_values() -> None:
    lrs = layer_lrs(2, base_lr=1e-3, decay=0.5, head_lr=1e-2)
    assert list(lrs) == ["embeddings", "layer.0", "layer.1", "head"]
    assert lrs == {
        "embeddings": pytest.approx(2.5e-4, rel=1e-12),
        "layer.0": pytest.approx(5e-4, rel=1e-12),
        "layer.1": pytest.approx(1e-3, rel=1e-12),
        "head": pytest.approx(1e-2, rel=1e-12),
    }
    twelve = layer_lrs(12, base_lr=2e-5, decay=0.9, head_lr=1e-4)
    assert twelve["layer.11"] == 2e-5
    assert twelve["layer.0"] == pytest.approx(2e-5 * 0.9**11, rel=1e-12)
    assert twelve["embeddings"] == pytest.approx(2e-5 * 0.9**12, rel=1e-12)
    with pytest.raises(ValueError, match="n_layers"):
        layer_lrs(0, base_lr=1e-3, decay=0.5, head_lr=1e-2)


def test_group_table_merges_halves_in_depth_order() -> None:
    w = torch.zeros(3, 4)

    def group(name: str, layer: str, depth: int, lr: float, n: int) -> dict:
        return {
            "params": [w],
            "lr": lr,
            "weight_decay": 0.0,
            "name": name,
            "layer": layer,
            "depth": depth,
            "n_params": n,
        }

    groups = [
        group("head", "head", 3, 1e-2, 12),
        group("layer.1.no_decay", "layer.1", 2, 1e-3, 4),
        group("embeddings", "embeddings", 0, 2.5e-4, 12),
        group("layer.1", "layer.1", 2, 1e-3, 12),
        group("head.no_decay", "head", 3, 1e-2, 4),
    ]
    assert group_table(groups) == [
        {"name": "embeddings", "lr": 2.5e-4, "n_params": 12},
        {"name": "layer.1", "lr": 1e-3, "n_params": 16},
        {"name": "head", "lr": 1e-2, "n_params": 16},
    ]


def test_group_table_on_real_model() -> None:
    model = make("bert")
    rows = group_table(build(model))
    by_prefix = {
        "embeddings": "bert.embeddings.",
        "layer.0": "bert.encoder.layer.0.",
        "layer.1": "bert.encoder.layer.1.",
    }
    for row in rows[:3]:
        prefix = by_prefix[row["name"]]
        n = sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))
        assert row["n_params"] == n
    head = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("bert.pooler.", "classifier.")))
    assert rows[3] == {"name": "head", "lr": HEAD_LR, "n_params": head}


def test_roberta_large_seed_snippet_table_at_24_layers() -> None:
    # The seed snippet's RoBERTa-large point (base 5e-6, decay 0.95, head 5e-5) on a tiny 24-layer
    # RoBERTa: same depth as roberta-large, hidden 32 so it builds in a moment.
    config = AutoConfig.for_model("roberta", **(TINY | {"num_hidden_layers": 24}))
    model = AutoModelForSequenceClassification.from_config(config)
    groups = build_param_groups(model, base_lr=5e-6, decay=0.95, head_lr=5e-5, weight_decay=WD)
    table = {row["name"]: row["lr"] for row in group_table(groups)}
    assert list(table) == ["embeddings", *(f"layer.{i}" for i in range(24)), "head"]
    assert table["embeddings"] == pytest.approx(5e-6 * 0.95**24, rel=1e-12)
    assert f"{table['embeddings']:.2e}" == "1.46e-06"  # the snippet's table, to its 3 digits
    assert table["layer.0"] == pytest.approx(5e-6 * 0.95**23, rel=1e-12)
    assert f"{table['layer.0']:.2e}" == "1.54e-06"
    assert table["layer.23"] == pytest.approx(5e-6, rel=1e-12)
    assert table["head"] == pytest.approx(5e-5, rel=1e-12)
    for i in range(24):
        assert table[f"layer.{i}"] == pytest.approx(5e-6 * 0.95 ** (23 - i), rel=1e-12)
    # every group, decayed or not, carries its layer's rate; embeddings are trained, not forgotten
    for g in groups:
        assert g["lr"] == pytest.approx(table[g["layer"]], rel=1e-12)
    embeddings = {id(p) for p in model.roberta.embeddings.parameters()}
    assert embeddings <= {id(p) for g in groups if g["layer"] == "embeddings" for p in g["params"]}
