"""The memory a trial needs: the estimate on exact values, its order of magnitude for RoBERTa-large,
and the one-line warnings of preflight and `validate`."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from llrd_search.engine import memory_check as mc
from llrd_search.spec import TrainSection

MIB, GIB = 1024**2, 1024**3
SMALL = SimpleNamespace(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)


def _estimate(device_type="cuda", bf16=True, **train):
    cfg = TrainSection(**{"batch_size": 4, "grad_accum": 2, **train})
    return mc.estimate_trial_memory(SMALL, 1000, cfg, max_length=3, bf16=bf16, device_type=device_type)


def test_estimate_on_exact_values():
    # Micro-batch 4 / 2 = 2 rows x 3 tokens = 6 tokens. Per token and layer in bf16: 4 x (8x2 + 2x4)
    # + 8 x 2x2 = 128 bytes, 768 a layer; embeddings 6 x 4 x 8 = 192; kept: 2 layers + one layer's
    # gradient buffers.
    e = _estimate()
    assert (e.weights, e.gradients, e.optimizer) == (4000, 4000, 8000)
    assert e.activations == 192 + 2 * 768 + 768
    assert e.other == 2000 + 512 * MIB  # autocast's bf16 copy + the CUDA runtime
    assert (e.micro_batch, e.length) == (2, 3)
    assert e.total == 16000 + 2496 + 2000 + 512 * MIB
    # On a CPU the attention scores are materialised: 2 rows x 2 heads x 3 x 3 x (4 + 2x2) = 288 a layer,
    # and the pretrained template lives in the same memory.
    cpu = _estimate("cpu")
    assert cpu.activations == 192 + 3 * (768 + 288)
    assert cpu.other == 2000 + 4000 + GIB
    # Checkpointed: each layer keeps its input (6 tokens x 4 x 4 bytes), one layer is recomputed.
    assert _estimate(gradient_checkpointing=True).activations == 192 + 2 * 96 + 768 + 768
    # fp32: 4 x (8x4 + 8) + 8 x 2x4 = 224 bytes a token and layer, no bf16 copy.
    fp32 = _estimate(bf16=False)
    assert (fp32.activations, fp32.other) == (192 + 3 * 1344, 512 * MIB)


def test_parameters_counted_from_the_config_alone():
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tiny = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 37, "vocab_size": 99, "max_position_embeddings": 64}
    for family, extra, tolerance in (("bert", {}, 0), ("roberta", {}, 0), ("distilbert", {"dim": 32, "n_layers": 3, "n_heads": 4, "hidden_dim": 37}, 0.01)):
        config = AutoConfig.for_model(family, **tiny, **extra, num_labels=2)
        with torch.device("meta"):
            real = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
        assert mc.count_params(config) == pytest.approx(real, rel=tolerance, abs=0), family


def test_roberta_large_at_batch_32_needs_several_gib():
    from transformers import RobertaConfig

    large = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          max_position_embeddings=514, type_vocab_size=1)
    n = mc.count_params(large)
    assert 350e6 < n < 360e6  # RoBERTa-large's 355 M
    plain = mc.estimate_trial_memory(large, n, TrainSection(batch_size=32), max_length=128, bf16=True, device_type="cuda")
    assert 6 * GIB < plain.total < 20 * GIB
    assert plain.weights + plain.gradients + plain.optimizer == 16 * n  # 5.7 GB before any activation
    accum = mc.estimate_trial_memory(large, n, TrainSection(batch_size=32, grad_accum=2), max_length=128, bf16=True, device_type="cuda")
    assert accum.activations == pytest.approx(plain.activations / 2, rel=1e-9)
    ckpt = mc.estimate_trial_memory(large, n, TrainSection(batch_size=32, gradient_checkpointing=True), max_length=128, bf16=True, device_type="cuda")
    assert ckpt.activations < plain.activations / 5


def test_the_fix_names_what_is_left_to_change():
    assert mc.fixes(TrainSection(batch_size=32)) == (
        "lower [train] batch_size, set [train] grad_accum = 2 or more, or [train] gradient_checkpointing = true")
    assert mc.fixes(TrainSection(batch_size=12, grad_accum=4, gradient_checkpointing=True)) == (
        "lower [train] batch_size, or set [train] grad_accum = 6 or more")
    assert mc.fixes(TrainSection(batch_size=1, gradient_checkpointing=True)) == "lower [model] max_length"


def test_memory_warning_is_one_line_when_it_does_not_fit():
    cfg = TrainSection(batch_size=4, grad_accum=2)
    e = _estimate()
    assert mc.memory_warning(e, e.total, cfg, "cuda") is None
    assert mc.memory_warning(e, None, cfg, "cuda") is None  # free memory unknown: no claim
    line = mc.memory_warning(e, 256 * MIB, cfg, "cuda")
    assert line == (
        "a trial at batch_size 4 (grad_accum 2), max_length 3 needs ~0.5 GiB (weights, gradients and AdamW 0.0 GiB; "
        "activations 0.0 GiB at 2 x 3 tokens a forward pass) but the GPU has 0.2 GiB free: "
        "lower [train] batch_size, set [train] grad_accum = 4 or more, or [train] gradient_checkpointing = true"
    )


def test_preflight_warns_when_a_trial_will_not_fit(write_study, monkeypatch, caplog):
    from llrd_search.search import preflight
    from llrd_search.spec import load_spec

    spec = load_spec(write_study(train={"epochs": 1, "batch_size": 16, "precision": "fp32", "device": "cpu"}))
    monkeypatch.setattr(mc, "free_memory", lambda device: 64 * MIB)
    with caplog.at_level(logging.WARNING, logger="llrd_search"):
        preflight(spec)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("a trial at batch_size 16 (grad_accum 1), max_length ")
    assert "this machine has 0.1 GiB free: lower [train] batch_size" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(mc, "free_memory", lambda device: 64 * GIB)
    with caplog.at_level(logging.WARNING, logger="llrd_search"):
        preflight(spec)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_validate_says_what_a_trial_needs_without_loading_the_model(write_study, monkeypatch, capsys, caplog):
    from llrd_search.cli import main
    from llrd_search.study import local_workers

    path = write_study(train={"epochs": 1, "batch_size": 16, "precision": "fp32", "device": "cpu"})
    monkeypatch.setattr(local_workers, "available_memory", lambda: 32 * GIB)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  memory: a trial needs ~1.0 GiB (weights, gradients and AdamW 0.0 GiB; activations 0.0 GiB at 16 x 32 tokens a forward pass) on cpu in fp32; 32.0 GiB free" in out
    monkeypatch.setattr(local_workers, "available_memory", lambda: 16 * MIB)
    with caplog.at_level(logging.WARNING, logger="llrd_search"):
        assert main(["validate", str(path)]) == 0  # a warning, not an error: the estimate is an estimate
    assert any("this machine has 0.0 GiB free: lower [train] batch_size" in r.getMessage() for r in caplog.records)


def test_validate_is_silent_about_a_model_it_cannot_read(write_study):
    from llrd_search.spec import load_spec

    spec = load_spec(write_study(model="no-such-org/no-such-model-xyz"))
    assert mc.spec_memory(spec) is None
