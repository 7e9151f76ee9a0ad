from __future__ import annotations

import copy
from pathlib import Path

import pytest

from llrd_search.exceptions import SpecError
from llrd_search.spec import PAPER_POINTS, Range, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

VALID = {
    "study": {"name": "s", "n_trials": 4},
    "model": {"name": "some/model"},
    "data": {"path": "some/data"},
    "space": {
        "base_lr": {"low": 1e-5, "high": 1e-4, "log": True},
        "head_lr": {"low": 1e-4, "high": 1e-3},
        "decay": {"low": 0.5, "high": 1.0},
    },
}


def spec_with(**changes):
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return data


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "s.toml")
    return info.value.problems


def test_defaults():
    spec = parse_spec(VALID)
    assert spec.study.sampler == "tpe" and spec.study.pruner == "hyperband"
    assert spec.train.epochs == 3 and spec.train.precision == "auto"
    assert isinstance(spec.space.decay, Range) and spec.space.decay.log is False


def test_every_error_reported_at_once_with_key_paths():
    data = spec_with(study__n_trials=0, space__decay={"low": 0.5, "high": 1.5}, train__lerning_rate=1)
    data["space"]["base_lr"] = {"low": 1e-3, "high": 1e-4}
    found = problems(data)
    assert any(p.startswith("study.n_trials:") for p in found)
    assert any(p.startswith("space.decay:") and "(0, 1]" in p for p in found)
    assert any(p.startswith("space.base_lr:") and "low" in p for p in found)
    assert any(p.startswith("train.lerning_rate: unknown key") for p in found)
    assert len(found) == 4


def test_unknown_key_suggests_closest():
    (msg,) = problems(spec_with(study__n_trail=3))
    assert msg == "study.n_trail: unknown key (did you mean 'n_trials'?)"


def test_train_fast_path_is_on_by_default_and_validated():
    assert parse_spec(VALID).train.fast_path is True
    assert parse_spec(spec_with(train__fast_path=False)).train.fast_path is False
    assert problems(spec_with(train__fast_path="fast")) == ["train.fast_path: Input should be a valid boolean, unable to interpret input"]
    assert problems(spec_with(train__fastpath=False)) == ["train.fastpath: unknown key (did you mean 'fast_path'?)"]


def test_train_pack_is_auto_by_default_and_a_count():
    assert parse_spec(VALID).train.pack == "auto"
    assert parse_spec(spec_with(train__pack=3)).train.pack == 3
    for bad in (0, True, "many", 2.5):
        assert problems(spec_with(train__pack=bad)) == [f'train.pack: {bad!r} must be a count >= 1 or "auto"']


def test_missing_section_named():
    data = copy.deepcopy(VALID)
    del data["model"]
    assert problems(data) == ["model: required key is missing"]


@pytest.mark.parametrize("value", [0.0, -1e-5])
def test_learning_rates_must_be_positive(value):
    (msg,) = problems(spec_with(space__head_lr=[value, 1e-3]))
    assert msg.startswith("space.head_lr: learning rates must be > 0")


@pytest.mark.parametrize("decay", [0.0, 1.01, -0.5])
def test_decay_outside_unit_interval(decay):
    (msg,) = problems(spec_with(space__decay=[decay]))
    assert msg.startswith("space.decay: decay must lie in (0, 1]")


def test_grid_needs_value_lists():
    (msg,) = problems(spec_with(study__sampler="grid"))
    assert "space.base_lr, space.head_lr, space.decay" in msg
    ok = spec_with(study__sampler="grid", space__base_lr=[1e-5], space__head_lr=[1e-4], space__decay=[0.9, 1.0])
    assert parse_spec(ok).space.decay == [0.9, 1.0]


def test_grace_period_must_exceed_heartbeat():
    (msg,) = problems(spec_with(study__heartbeat_interval=30, study__grace_period=30))
    assert msg.startswith("study: grace_period (30) must exceed heartbeat_interval (30)")


def test_initial_points_inside_space_only():
    spec = parse_spec(spec_with(space__base_lr={"low": 1e-5, "high": 1e-4}, space__head_lr={"low": 1e-5, "high": 1e-4}))
    # With the control arm (default), the paper's ξ = 1 point is queued there, not in the LLRD arm.
    assert spec.initial_points() == [PAPER_POINTS[0]] and spec.control_points() == [PAPER_POINTS[1]]
    one_arm = parse_spec(spec_with(study__control_fraction=0.0, space__base_lr={"low": 1e-5, "high": 1e-4}, space__head_lr={"low": 1e-5, "high": 1e-4}))
    assert one_arm.initial_points() == PAPER_POINTS and one_arm.control_points() == []
    narrow = parse_spec(spec_with(space__decay={"low": 0.5, "high": 0.97}, space__head_lr={"low": 1e-5, "high": 1e-4}))
    assert narrow.initial_points() == [PAPER_POINTS[0]]
    none = parse_spec(VALID)  # head_lr range excludes the paper's 2e-5
    assert none.initial_points() == []


def test_user_enqueue_points_validated():
    point = {"base_lr": 5e-5, "head_lr": 5e-4, "decay": 0.9}
    spec = parse_spec(spec_with(study__enqueue=[point]))
    assert spec.initial_points() == [point]
    (msg,) = problems(spec_with(study__enqueue=[{"base_lr": 5e-5, "head_lr": 5e-4, "decay": 0.3}]))
    assert msg.startswith("study.enqueue.0: ") and "outside [space]" in msg


def test_identity_ignores_budget_and_storage():
    a = parse_spec(VALID)
    b = parse_spec(spec_with(study__n_trials=40, study__storage="sqlite:///x.db"))
    c = parse_spec(spec_with(train__epochs=5))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_load_spec_resolves_paths_against_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "s.toml"
    f.write_text(
        '[study]\nname = "s"\nn_trials = 1\n[model]\nname = "org/model"\n[data]\npath = "../data"\n'
        "[space]\nbase_lr = [1e-5]\nhead_lr = [1e-4]\ndecay = [0.9]\n"
    )
    spec = load_spec(f)
    assert spec.data.path == str(tmp_path / "data")
    assert spec.model.name == "org/model"  # no such folder: a hub id, left alone


def test_toml_syntax_error_names_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[study\nname = 1\n")
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert str(info.value).startswith(f"{f}: TOML syntax error")


def test_shipped_studies_validate():
    files = sorted((REPO / "studies").glob("*.toml"))
    assert {f.stem for f in files} >= {"sst2-minilm", "trec-minilm", "imdb-bert-base", "seed-roberta-large"}
    for f in files:
        spec = load_spec(f)
        assert spec.study.name == f.stem
    paper = load_spec(REPO / "studies" / "imdb-bert-base.toml")
    assert paper.train.batch_size == 24 and paper.model.max_length == 512 and 0.95 in paper.space.decay
    seed = load_spec(REPO / "studies" / "seed-roberta-large.toml")
    assert seed.initial_points() == [{"base_lr": 5e-6, "head_lr": 5e-5, "decay": 0.95}]
