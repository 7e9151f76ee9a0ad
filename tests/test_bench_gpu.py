"""bench/compare_gpu.py (the GPU mode of compare_hf.py): its arguments, study files and table, as
pure functions. The end-to-end run is `python bench/compare_hf.py --gpu --smoke` (minutes here)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_gpu as cg  # noqa: E402


def test_smoke_arguments_are_tiny_and_modes_are_checked(capsys):
    a = cg.parse_args(["--smoke", "--out", "/tmp/x"])
    assert (a.model, a.trials, a.train_limit, a.max_length, a.workers_per_gpu, a.pack) == ("tiny-random", 2, 64, 32, 2, 2)
    assert a.modes == ["peer", "ours", "ours_k", "packed"] and a.out == Path("/tmp/x")
    assert cg.parse_args(["--modes", "peer,packed"]).modes == ["peer", "packed"]
    for bad in ("peer,fast", "ours"):
        with pytest.raises(SystemExit):
            cg.parse_args(["--modes", bad])
    assert "the peer is needed" in capsys.readouterr().err


def test_our_runs_flags_labels_and_pack():
    a = cg.parse_args(["--workers-per-gpu", "3", "--pack", "5"])
    a.cuda = True
    assert cg.our_runs(a, packing=True) == [
        ("ours", "llrd-search, 1 worker, pack 1", ["--workers", "1"], 1),
        ("ours_k", "llrd-search, 3 workers on the GPU, pack 1", ["--workers-per-gpu", "3"], 1),
        ("packed", "llrd-search, 1 worker, pack 5", ["--workers", "1"], 5),
    ]
    a.cuda, a.modes = False, ["peer", "ours_k"]
    # without the key, pack is not written (the packed run is skipped by main)
    assert cg.our_runs(a, packing=False) == [("ours_k", "llrd-search, 3 workers (CPU), pack 1", ["--workers", "3"], None)]


def test_study_dict_is_a_valid_study_file(tmp_path):
    from llrd_search.spec import load_spec

    a = cg.parse_args(["--smoke"])
    a.model_path = "sentence-transformers/all-MiniLM-L6-v2"
    plain = cg.study_dict("ours", tmp_path / "data", a, tmp_path / "ours.db", pack=None)
    toml = tmp_path / "ours.toml"
    toml.write_text(cg.toml_text(plain))
    assert tomllib.loads(toml.read_text()) == plain
    spec = load_spec(toml)
    assert (spec.study.n_trials, spec.study.control_fraction, spec.study.pruner, spec.train.batch_size) == (2, 0, "none", 16)
    assert spec.space.base_lr.low == 1e-5 and spec.space.decay.log is False
    packed = cg.study_dict("packed", tmp_path / "data", a, tmp_path / "p.db", pack=4)
    assert packed["train"]["pack"] == 4 and "pack" not in plain["train"]


def test_rows_and_table():
    peer = {"wall_s": 360.0, "trials": 12, "best": 0.8326}
    ours = {"wall_s": 72.0, "trials": 12, "best": 0.8349}
    far = {"wall_s": 36.0, "trials": 12, "best": 0.8200}
    rows = [{**cg.row("Trainer", peer, None), "speedup": 1.0}, cg.row("ours", ours, peer), cg.row("far", far, peer),
            {"label": "packed", "skipped": "this llrd-search has no `[train] pack` key"}]
    assert rows[0]["per_gpu_hour"] == 120 and rows[1]["per_gpu_hour"] == 600 and rows[1]["speedup"] == 5
    assert (rows[1]["same_accuracy"], rows[2]["same_accuracy"]) == (True, False)
    assert cg.row("edge", {"wall_s": 36.0, "trials": 1, "best": 0.8376}, peer)["same_accuracy"] is True  # exactly 0.5 points
    text = cg.markdown(rows, title="Trials per GPU-hour: minilm", device="NVIDIA H200", date="2026-12-03", command="python x", notes=["n"])
    assert text.splitlines() == [
        "### Trials per GPU-hour: minilm", "", "NVIDIA H200, 2026-12-03; `python x`", "", "n", "",
        "| run | finished trials | wall (s) | **trials per GPU-hour** | vs Trainer | best val. accuracy | within 0.5 points of the Trainer |",
        "|---|---:|---:|---:|---:|---:|---|",
        "| Trainer | 12 | 360 | 120 | 1.0x | 0.8326 | - |",
        "| ours | 12 | 72 | 600 | 5.0x | 0.8349 | yes |",
        "| far | 12 | 36 | 1200 | 10.0x | 0.8200 | **no**: does not count |",
        "| packed | - | - | - | - | - | skipped: this llrd-search has no `[train] pack` key |",
    ]
    alone = cg.row("ours, the peer failed", ours, None)
    assert (alone["speedup"], alone["same_accuracy"]) == (None, None)
    assert cg.markdown([alone], title="t", device="d", date="x", command="c", notes=[]).splitlines()[-1] == "| ours, the peer failed | 12 | 72 | 600 | - | 0.8349 | - |"


def test_random_model_labels_say_speed_only():
    assert "random weights, speed only" in cg.model_label("bert-base-random")
    assert cg.SHAPES["bert-base-random"] == (768, 12, 12, 3072)
