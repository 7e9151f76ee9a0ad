"""bench/compare_gpu.py (the GPU mode of compare_hf.py): its arguments, study files and table, as
pure functions; and bench/gpu.sh (gpu_micro.py, gpu_search.py): its tables, windows and rates, and
the whole script end to end with --dry-run (a CPU, tiny models)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_gpu as cg  # noqa: E402
import gpu_micro as gm  # noqa: E402
import gpu_search as gs  # noqa: E402


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


# --------------------------------------------------------------------------- bench/gpu.sh (issue 23)

REPO = Path(__file__).resolve().parents[1]
MODES = ["pack_auto", "workers_x_pack", "peer", "one", "k_workers"]


def _trial(number, state, start, end=None, value=None, params=None):
    ts = lambda s: None if s is None else _dt.datetime.fromtimestamp(1000.0 + s)  # noqa: E731
    return SimpleNamespace(number=number, state=SimpleNamespace(name=state), datetime_start=ts(start), datetime_complete=ts(end),
                           value=value, params=params or {})


def test_modes_run_packed_first_and_say_what_they_run():
    plan = gs.modes(cuda=True)
    assert [m[0] for m in plan] == MODES  # packed modes first: a timeout cuts the unpacked ones
    assert plan[0][2:] == ([], "auto") and plan[1][2:] == (["--workers-per-gpu", "2"], 4) and plan[2][2] is None
    assert plan[4][2:] == (["--workers-per-gpu", "4"], 1)
    assert gs.modes(cuda=False)[4][2] == ["--workers", "2"]  # no GPU (dry run): plain workers


def test_rate_is_steady_finished_trials_per_hour_from_the_timestamps():
    trials = [_trial(0, "COMPLETE", 10, 20, 0.9, {"base_lr": 2e-5}), _trial(1, "PRUNED", 12, 30), _trial(2, "COMPLETE", 20, 46, 0.8),
              _trial(3, "FAIL", 30, 50), _trial(4, "RUNNING", 46)]
    r = gs.rate(trials, spawn=1000.0)
    # 3 finished between the first start (10 s after spawn) and the last finish (46 s): 3 / 36 s
    assert (r["finished"], r["startup_s"], r["steady_s"]) == (3, 10.0, 36.0)
    assert r["per_hour"] == pytest.approx(300.0) and r["first_value"] == 0.9 and r["first_point"] == {"base_lr": 2e-5}
    assert gs.rate([_trial(0, "RUNNING", 5)], spawn=1000.0) == {"finished": 0, "startup_s": 5.0, "per_hour": None, "steady_s": None,
                                                                 "first_point": {}, "first_value": None}


def test_search_table_has_a_row_for_every_mode_whatever_happened():
    plan = gs.modes(cuda=True)
    ok = {"finished": 10, "startup_s": 12.0, "per_hour": 720.0, "first_value": 0.85, "start_line": "1 worker: 1 per GPU on 1 GPU (auto)"}
    result = {"window": 45, "device": "NVIDIA H100", "date": "2026-12-07", "command": "c", "model": "minilm", "train_limit": 2000,
              "batch_size": 32, "max_length": 128, "plan": plan,
              "modes": {"pack_auto": {**ok, "per_hour": 1440.0, "first_value": 0.80}, "workers_x_pack": {"error": "no study (KeyError)"},
                        "peer": {**ok, "per_hour": 360.0, "first_value": 0.851}, "one": ok, "k_workers": {"skipped": "out of time"}}}
    rows = [line for line in gs.markdown(result).splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [r.split(" | ")[0][2:] for r in rows] == MODES
    assert "| 1440 | 4.0x | 0.8000 | -0.0500 **differs** |" in rows[0]  # trial 0 off by 5 points: flagged
    assert rows[1].endswith("| no study (KeyError) |") and rows[4].endswith("| out of time |")
    assert "| 360 | 1.0x | 0.8510 | +0.0010 |" in rows[2] and "| 720 | 2.0x | 0.8500 | - |" in rows[3]


def test_micro_table_marks_out_of_memory_and_parity():
    result = {"device": "H100", "date": "d", "command": "c", "cuda": True, "rows_per_copy": 32, "width": 128, "steps": 15, "warmup": 3,
              "parity": [{"model": "minilm", "steps": 5, "max_abs_diff": 3e-4, "ok": False}],
              "rows": [{"model": "m", "setup": "unpacked", "ms_per_step": 10.0, "examples_per_s": 3200.0, "peak_gib": 1.0},
                       {"model": "m", "setup": "packed 8", "ms_per_step": 40.0, "examples_per_s": 6400.0, "peak_gib": 6.0},
                       {"model": "m", "setup": "packed 16", "error": "CUDA out of memory"}]}
    text = gm.markdown(result)
    assert "**FAILED**" in text and "| m | packed 8 | 40.0 | 6400 | 2.00x | 6.0 |" in text and "| m | packed 16 | - | - | - | CUDA out of memory |" in text


def test_a_window_stops_a_search_that_would_run_on(tmp_path):
    spawn, rc = gs.windowed([sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), tmp_path / "x.log", gs.Window(0.5), lambda: 0)
    assert rc is None  # stopped by the window, not finished
    spawn, rc = gs.windowed([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "y.log", gs.Window(60), lambda: 0)
    assert rc == 3


def test_gpu_sh_dry_run_end_to_end(tmp_path):
    """`bash bench/gpu.sh --dry-run`: the GPU script's own code on a CPU with tiny models (about a
    minute on a quiet 2-core machine), every output written with every mode's row."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.log", "gpu.md", "micro.json", "micro.md", "parts.tar.gz", "search.json", "search.md"]
    micro = json.loads((tmp_path / "micro.json").read_text())
    assert [p["ok"] for p in micro["parity"]] == [True]
    assert [r["setup"] for r in micro["rows"]] == ["unpacked", "packed 1", "packed 2"] and all("ms_per_step" in r for r in micro["rows"])
    search = json.loads((tmp_path / "search.json").read_text())
    assert list(search["modes"]) == MODES
    for mode, r in search["modes"].items():
        assert "error" not in r and "skipped" not in r, (mode, r)
        assert r["finished"] >= 1 and r["per_hour"] > 0 and r["first_value"] is not None, (mode, r)  # a dry-run mode runs until a trial finished
    text = (tmp_path / "gpu.md").read_text()
    assert "Dry run on a CPU" in text and "part `" not in text  # no part failed or timed out
    for mode in MODES:
        assert f"\n| {mode} | " in text


def test_parity_check_catches_a_wrong_packed_update(monkeypatch):
    import torch

    good = gm.parity("tiny", torch.device("cpu"), steps=3, rows=4, width=16)
    assert good["ok"] and good["max_abs_diff"] <= gm.PARITY_TOL < good["moved"] / 10

    class Doubled(gm.PackedAdamW):  # every copy's LR twice what it should be
        def step(self, multipliers):
            super().step([2 * m for m in multipliers])

    monkeypatch.setattr(gm, "PackedAdamW", Doubled)
    bad = gm.parity("tiny", torch.device("cpu"), steps=3, rows=4, width=16)
    assert not bad["ok"] and bad["max_abs_diff"] > gm.PARITY_TOL
