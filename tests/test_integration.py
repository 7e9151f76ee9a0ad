"""A real 2-trial study: the packaged MiniLM fine-tuned on a slice of the shared SST-2 copy."""

from __future__ import annotations

import optuna
import pytest
from conftest import SHARED_DATA

from llrd_search.cli import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="shared SST-2 copy not present"),
]

STUDY = f"""
[study]
name = "sst2-slice"
n_trials = 2
control_fraction = 0.5  # one trial in each arm: the paper point and its LR-matched ξ = 1 control
seed = 0
sampler = "random"
pruner = "none"

[model]
name = "sentence-transformers/all-MiniLM-L6-v2"
max_length = 64

[data]
path = "{SHARED_DATA / "sst2"}"
train_limit = 256
validation_limit = 128

[train]
epochs = 1
batch_size = 32
evals_per_epoch = 2

[space]
base_lr = {{ low = 1e-5, high = 2e-4, log = true }}
head_lr = {{ low = 1e-5, high = 1e-3, log = true }}
decay = {{ low = 0.8, high = 1.0 }}
"""


def test_real_minilm_study(tmp_path):
    path = tmp_path / "sst2-slice.toml"
    path.write_text(STUDY)
    assert main(["run", str(path)]) == 0
    storage = "sqlite:///" + str(tmp_path / "sst2-slice.db")
    (llrd,) = optuna.load_study(study_name="sst2-slice", storage=storage).get_trials()
    (control,) = optuna.load_study(study_name="sst2-slice.control", storage=storage).get_trials()
    trials = [llrd, control]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # The paper's point is tried first in the LLRD arm, its no-decay control in the control arm.
    assert llrd.params == {"base_lr": 2e-5, "decay": 0.95, "head_lr": 2e-5}
    assert control.params == {"base_lr": 2e-5, "decay": 1.0, "head_lr": 2e-5}
    for t in trials:
        groups = t.user_attrs["lr_groups"]
        assert [g["name"] for g in groups] == ["embeddings", *(f"layer.{i}" for i in range(6)), "head"]
        assert groups[0]["lr"] == pytest.approx(2e-5 * t.params["decay"] ** 6)
        assert sum(g["n_params"] for g in groups) == 22_713_986  # MiniLM-L6 + a 2-way classifier, all trained
        assert t.user_attrs["n_train"] == 256 and t.user_attrs["n_validation"] == 128
        assert t.user_attrs["steps"] == 8 and sorted(t.intermediate_values) == [1, 2]
        assert 0.3 < t.value <= 1.0  # a real accuracy on 128 sentences, not a constant
        assert t.user_attrs["train_examples_per_second"] > 0 and t.user_attrs["precision"] in ("bf16", "fp32")
