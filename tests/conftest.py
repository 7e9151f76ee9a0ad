"""Shared fixtures: a tiny random BERT saved to disk (2 layers, hidden 32) with a real tokenizer,
a small learnable text-classification dataset, and study-file helpers. No network anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv
import random
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tiny models gain nothing from more, and under load (parallel test
# subprocesses) spinning OpenMP threads made each trial 10x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The real SST-2 and TREC data shipped in the repo (byte-for-byte the ../shared/datasets copies).
SHARED_DATA = REPO / "studies" / "data"

POSITIVE = "good great fine superb lovely brilliant moving funny charming warm".split()
NEGATIVE = "bad awful dull boring weak clumsy tedious flat bland messy".split()
FILLER = "the a movie film story plot it is was and very quite rather acting".split()


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
    rng.shuffle(words)
    return " ".join(words)


def write_toy_dataset(folder: Path, n_train: int = 240, n_val: int = 60, n_test: int = 0, labels: tuple = (0, 1), seed: int = 0) -> Path:
    """A learnable 2-class dataset: the label decides which sentiment words appear."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        if n == 0:
            continue
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for i in range(n):
                y = i % 2
                w.writerow([_sentence(rng, y), labels[y]])
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random BERT backbone plus a word-level BERT tokenizer, saved like a hub
    checkpoint (no classifier weights, so the head is initialised per trial as with real models)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(POSITIVE + NEGATIVE + FILLER)), "?", ".", ","]
    # transformers 5 takes the vocabulary as a dict (``vocab=``); 4.x took a file (``vocab_file=``).
    try:
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    assert tok.unk_token_id not in tok("good movie")["input_ids"], "tiny tokenizer maps words to [UNK]"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy-data"))


@pytest.fixture(scope="module")
def tiny_template_and_task(tiny_model_dir, toy_data_dir, tmp_path_factory):
    """The tiny model's template and the toy data, tokenized at max_length 32: one per test module,
    so a module may change the template (e.g. set dropout to 0) without touching the others."""
    from llrd_search.engine.data import load_task_data
    from llrd_search.engine.model import load_template
    from llrd_search.spec import DataSection, ModelSection

    mp = pytest.MonkeyPatch()
    mp.setenv("LLRD_SEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    template = load_template(ModelSection(name=str(tiny_model_dir), max_length=32), {0: "0", 1: "1"})
    task = load_task_data(DataSection(path=str(toy_data_dir)), template.tokenizer, 32, 0)
    mp.undo()
    return template, task


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One tokenization cache per test session, never the user's ~/.cache.
    monkeypatch.setenv("LLRD_SEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "llrd-cache"))
    # `run` defaults to one worker process per core; tests of tiny trials run one worker in-process
    # unless they ask for more (test_workers.py tests the default itself).
    monkeypatch.setenv("LLRD_SEARCH_WORKERS", "1")


# Heartbeats for tests whose workers must never be reaped: a beat would have to be 30 s late on a
# loaded machine. Tests that need a dead worker's trial reaped quickly ask for STALE_FAST and keep
# their live trials out of a reaper's reach (one worker, or a reaper that only runs between trials).
GENEROUS_HEARTBEAT = {"heartbeat_interval": 2, "grace_period": 30}
STALE_FAST = {"heartbeat_interval": 1, "grace_period": 2}


SPACE = {
    "base_lr": "{ low = 1e-4, high = 1e-3, log = true }",
    "head_lr": "{ low = 1e-3, high = 1e-2, log = true }",
    "decay": "{ low = 0.5, high = 1.0 }",
}


def study_toml(
    model: Path | str, data: Path | str, *, name: str = "toy", n_trials: int = 2, extra: str = "", space: dict[str, str] | None = None, **sections: dict
) -> str:
    """A study file's text for the tiny model; ``sections`` override keys, e.g. train={"epochs": 2};
    ``space`` overrides dimensions with TOML text, e.g. space={"decay": "[0.9, 1.0]"}."""
    base = {
        "study": {"name": name, "n_trials": n_trials, "seed": 0, "sampler": "random", "pruner": "none", **GENEROUS_HEARTBEAT,
                  # One arm unless a test asks for the control arm (tests/test_arms.py): counts stay simple.
                  "control_fraction": 0.0},
        "model": {"name": str(model), "max_length": 32},
        "data": {"path": str(data)},
        "train": {"epochs": 1, "batch_size": 16, "evals_per_epoch": 1, "precision": "fp32"},
    }
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml(v)}")
    lines.append("[space]")
    lines += [f"{k} = {v}" for k, v in {**SPACE, **(space or {})}.items()]
    return "\n".join(lines) + "\n" + extra


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


@pytest.fixture
def write_study(tmp_path, tiny_model_dir, toy_data_dir):
    """write_study(**overrides) -> path of a valid study file in tmp_path using the tiny model."""

    def _write(filename: str = "study.toml", **kw) -> Path:
        path = tmp_path / filename
        path.write_text(study_toml(kw.pop("model", tiny_model_dir), kw.pop("data", toy_data_dir), **kw))
        return path

    return _write
