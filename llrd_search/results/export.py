"""Export the best configuration as a file to keep in git, and load it back for your own training.

The file holds everything needed to reproduce the optimizer: model, data and training settings, the
three LLRD numbers, and the per-group LR table computed on the real model. The best configuration
may come from the search's ξ = 1 control arm (``arm = "control"``): then it is plain fine-tuning,
decay 1.0, and ``arm_study`` (``NAME.control``) is the study its ``trial`` numbers. :func:`load_config` reads
it back; ``LLRDConfig.param_groups(model)`` calls the very function the search used and checks the
result against the file's table, so a different model fails loudly instead of training silently
with the wrong learning rates::

    optimizer = torch.optim.AdamW(load_config("best.json").param_groups(model))

The storage URL appears only masked (``mask_url``): a password never reaches the file.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from llrd_search.engine.metrics import study_metric_name
from llrd_search.exceptions import DataError, ModelError, NoCompleteTrialError, SpecError
from llrd_search.study.arms import CONTROL, CONTROL_SUFFIX, LLRD, load_control, overall_best
from llrd_search.study.compat import backend_of
from llrd_search.study.storage import load_study, mask_url, opened_storage, spec_of
from llrd_search.vocab import PARAMS

FORMAT_VERSION = 1
CONVENTION = (
    "Layer-wise LR decay (Sun et al. 2019). With L encoder layers numbered 0 (bottom) to L-1 (top), "
    "layer i trains at base_lr * decay ** (L - 1 - i), so base_lr is the top layer's LR; the embeddings "
    "train at base_lr * decay ** L; everything above the encoder (pooler, classifier) trains at head_lr. "
    "decay = 1.0 is plain fine-tuning. Matrices use train.weight_decay, biases and norm weights 0. "
    "The LR of every group follows the same warmup-then-linear-decay schedule (a multiplier)."
)


# --------------------------------------------------------------------------- export


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("llrd-search", "torch", "transformers", "optuna"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _best(trials: dict[int, optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def choose(study: optuna.Study, summary: list[dict] | None, control_row: dict | None = None) -> tuple[optuna.trial.FrozenTrial, dict | None, str]:
    """The trial to export, its confirmation row (None when chosen by the search) and its arm.

    :func:`arms.overall_best` decides, as for the report: the confirmed winner against the confirmed
    control (``control_row``) when confirmed runs exist, else the two arms' search bests. When the
    ξ = 1 control arm wins, the trial is one of ``NAME.control``: plain fine-tuning, decay 1.0.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    control_study = load_control(study)
    control_trials = {t.number: t for t in control_study.get_trials(deepcopy=False)} if control_study is not None else {}
    pick = overall_best(_best(trials), _best(control_trials), summary, control_row)
    if pick is None:
        raise NoCompleteTrialError(f"--study: '{study.study_name}' has no complete trial yet; run the search first")
    return (control_trials if pick["arm"] == CONTROL else trials)[pick["trial"]], pick["confirmed"], pick["arm"]


def real_groups(spec: Any, params: dict[str, float]) -> tuple[list[dict], dict[int, str], int]:
    """The LR group table, id2label and L, computed on the study's real (pretrained) model."""
    from llrd_search.engine.labels import clean_labels, label_mapping
    from llrd_search.engine.model import load_template
    from llrd_search.engine.param_groups import build_param_groups, count_layers, group_table
    from llrd_search.engine.splits import load_raw_splits

    raw, _ = load_raw_splits(spec.data)
    train = raw[spec.data.train_split]
    if spec.data.label not in train.column_names:
        raise DataError(f"data.label: column '{spec.data.label}' not in the {spec.data.train_split} split")
    id2label = label_mapping(clean_labels(train[spec.data.label], spec.data.train_split, spec.data.label))
    template = load_template(spec.model, id2label)
    groups = build_param_groups(template.model, weight_decay=spec.train.weight_decay, **{p: params[p] for p in PARAMS})
    return group_table(groups), id2label, count_layers(template.model)


def build_config(study: optuna.Study, url: str, summary: list[dict] | None = None, control_row: dict | None = None) -> dict[str, Any]:
    """The exported document as a plain dict (``url`` is only used masked)."""
    spec = spec_of(study)
    metric = study_metric_name(study)
    trial, confirmed, arm = choose(study, summary, control_row)
    params = {p: float(trial.params[p]) for p in PARAMS}
    table, id2label, n_layers = real_groups(spec, params)
    stored = trial.user_attrs.get("lr_groups")
    if stored and [(r["name"], r["n_params"]) for r in stored] != [(r["name"], r["n_params"]) for r in table]:
        raise ModelError(
            f"model.name: '{spec.model.name}' now maps to LR groups {[r['name'] for r in table]}, but trial {trial.number} "
            f"trained with {[r['name'] for r in stored]}; the model changed since the search"
        )
    return {
        "llrd_search_config": FORMAT_VERSION,
        "study": study.study_name,
        "trial": trial.number,
        "storage": mask_url(url),
        # Through `llrd-search proxy`, the database it serves (as the proxy names it), beside grpc://...
        **({"proxied_storage": served} if (served := getattr(backend_of(study), "info", {}).get("storage")) else {}),
        "arm": arm,  # "control": the ξ = 1 arm beat LLRD, and this is plain fine-tuning (decay 1.0)
        "arm_study": study.study_name + CONTROL_SUFFIX if arm == CONTROL else study.study_name,  # the study `trial` numbers
        "selected_by": _selected_by(confirmed, arm),
        "metric": metric,
        "validation_score": trial.value,  # the validation value of `metric`
        # Kept for files and scripts from before `metric`; only an accuracy is called one.
        "validation_accuracy": trial.value if metric == "accuracy" else None,
        "confirmed": None
        if confirmed is None
        else {k: confirmed[k] for k in ("mean", "std", "n", "accuracies")},
        "base_lr": params["base_lr"],
        "head_lr": params["head_lr"],
        "decay": params["decay"],
        "convention": CONVENTION,
        "n_layers": n_layers,
        "groups": table,
        "seed": spec.study.seed,
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "id2label": {str(k): v for k, v in id2label.items()},
        "versions": _versions(),
    }


def _selected_by(confirmed: dict | None, arm: str) -> str:
    how = f"confirmation (best mean over {confirmed['n']} seeds)" if confirmed else "search (best single run)"
    return how + ("; the ξ = 1 control arm beat the LLRD arm, so this is plain fine-tuning (decay 1.0)" if arm == CONTROL else "")


def export_config(url: str, study_name: str) -> dict[str, Any]:
    """Build the export document for ``study_name`` (after confirmation when it exists)."""
    from llrd_search.study.confirm import confirmation_summary, control_summary

    with opened_storage(url, must_exist=True) as storage:
        study = load_study(storage, study_name)
        return build_config(study, url, confirmation_summary(storage, study_name), control_summary(storage, study_name))


def render(config: dict[str, Any], fmt: str = "json") -> str:
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- load


@dataclass
class LLRDConfig:
    """An exported configuration. ``param_groups(model)`` gives the optimizer groups it lists."""

    base_lr: float
    head_lr: float
    decay: float
    groups: list[dict]
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    id2label: dict[int, str] = field(default_factory=dict)
    seed: int = 0
    study: str | None = None
    trial: int | None = None
    validation_accuracy: float | None = None
    metric: str = "accuracy"
    validation_score: float | None = None
    confirmed: dict[str, Any] | None = None
    arm: str = LLRD  # "control": the search's ξ = 1 arm won, and decay is 1.0
    convention: str = CONVENTION
    versions: dict[str, str] = field(default_factory=dict)
    source: str = "<config>"

    @property
    def weight_decay(self) -> float:
        return float(self.train.get("weight_decay", 0.0))

    def param_groups(self, model: Any, weight_decay: float | None = None, *, check: bool = True) -> list[dict]:
        """Torch optimizer groups for ``model``, from the same ``build_param_groups`` the search used.

        ``weight_decay`` defaults to the file's ``train.weight_decay``. With ``check`` (default), raise
        :class:`ModelError` unless the model's groups match the file's table (names, LRs, sizes).
        """
        from llrd_search.engine.param_groups import build_param_groups, group_table

        groups = build_param_groups(
            model,
            base_lr=self.base_lr,
            decay=self.decay,
            head_lr=self.head_lr,
            weight_decay=self.weight_decay if weight_decay is None else weight_decay,
        )
        if check:
            self.check(group_table(groups))
        return groups

    def check(self, table: list[dict]) -> None:
        """Raise :class:`ModelError` naming the first difference between ``table`` and the file's."""
        names = [r["name"] for r in table]
        expected = [r["name"] for r in self.groups]
        hint = f"{self.source} was exported for {self.model.get('name')}; pass that model or check=False"
        if names != expected:
            raise ModelError(f"LR groups of this model are {names}, the file lists {expected}: {hint}")
        for got, want in zip(table, self.groups, strict=True):
            if not math.isclose(got["lr"], float(want["lr"]), rel_tol=1e-9):
                raise ModelError(f"group '{got['name']}': lr {got['lr']:.6g} here, {float(want['lr']):.6g} in the file: {hint}")
            if got["n_params"] != int(want["n_params"]):
                raise ModelError(f"group '{got['name']}': {got['n_params']} parameters here, {want['n_params']} in the file: {hint}")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), ["file not found (export one with: llrd-search export --storage URL --study NAME --out best.json)"])
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as err:
        raise SpecError(str(path), [f"not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {err}"]) from None
    if not isinstance(doc, dict):
        raise SpecError(str(path), ["expected a mapping of keys (an llrd-search export)"])
    return doc


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problems(doc: dict[str, Any]) -> list[str]:
    """Every problem of an export document, each as ``"key: message"`` (a hand-edited file must not
    reach the library as a traceback)."""
    problems = [f"{k}: required key is missing" for k in ("base_lr", "head_lr", "decay", "groups", "model", "train", "data") if k not in doc]
    for key in ("base_lr", "head_lr"):
        if key in doc and not (_number(doc[key]) and doc[key] > 0):
            problems.append(f"{key}: must be a number > 0 (got {doc[key]!r})")
    if "decay" in doc and not (_number(doc["decay"]) and 0 < doc["decay"] <= 1):
        problems.append(f"decay: must lie in (0, 1] (got {doc['decay']!r})")
    groups = doc.get("groups")
    if "groups" in doc:
        if not (isinstance(groups, list) and all(isinstance(g, dict) and {"name", "lr", "n_params"} <= set(g) for g in groups)):
            problems.append("groups: must be a list of {name, lr, n_params}")
        else:
            for i, g in enumerate(groups):
                if not (_number(g["lr"]) and g["lr"] > 0):
                    problems.append(f"groups[{i}].lr: must be a number > 0 (got {g['lr']!r})")
                if not (isinstance(g["n_params"], int) and not isinstance(g["n_params"], bool) and g["n_params"] >= 0):
                    problems.append(f"groups[{i}].n_params: must be a whole number >= 0 (got {g['n_params']!r})")
    for key in ("model", "data", "train"):
        if key in doc and not isinstance(doc[key], dict):
            problems.append(f"{key}: must be a mapping of settings (got {doc[key]!r})")
    if isinstance(doc.get("model"), dict) and not doc["model"].get("name"):
        problems.append("model.name: required key is missing")
    if isinstance(doc.get("train"), dict) and "weight_decay" in doc["train"] and not _number(doc["train"]["weight_decay"]):
        problems.append(f"train.weight_decay: must be a number (got {doc['train']['weight_decay']!r})")
    if "seed" in doc and not (isinstance(doc["seed"], int) and not isinstance(doc["seed"], bool)):
        problems.append(f"seed: must be a whole number (got {doc['seed']!r})")
    if doc.get("arm") is not None and doc["arm"] not in (LLRD, CONTROL):
        problems.append(f"arm: must be {LLRD!r} or {CONTROL!r} (got {doc['arm']!r})")
    if doc.get("id2label") is not None and not isinstance(doc["id2label"], dict):
        problems.append(f"id2label: must be a mapping of class id to label (got {doc['id2label']!r})")
    elif isinstance(doc.get("id2label"), dict) and not all(str(k).lstrip("-").isdigit() for k in doc["id2label"]):
        problems.append(f"id2label: keys must be class ids 0, 1, ... (got {list(doc['id2label'])!r})")
    return problems


def load_config(path: str | Path) -> LLRDConfig:
    """Read an exported config (.json, .yaml or .yml) and check its LLRD numbers and group table."""
    path = Path(path)
    return config_from_doc(_read(path), source=str(path))


def config_from_doc(doc: dict[str, Any], source: str = "<config>") -> LLRDConfig:
    """An export document (what :func:`export_config` returns, or a file read back) as a checked :class:`LLRDConfig`."""
    problems = _problems(doc)
    if problems:
        raise SpecError(source, problems)
    groups = doc["groups"]
    return LLRDConfig(
        base_lr=float(doc["base_lr"]),
        head_lr=float(doc["head_lr"]),
        decay=float(doc["decay"]),
        groups=groups,
        model=dict(doc["model"]),
        data=dict(doc["data"]),
        train=dict(doc["train"]),
        id2label={int(k): str(v) for k, v in (doc.get("id2label") or {}).items()},
        seed=int(doc.get("seed", 0)),
        study=doc.get("study"),
        trial=doc.get("trial"),
        validation_accuracy=doc.get("validation_accuracy"),
        metric=str(doc.get("metric") or "accuracy"),
        validation_score=doc.get("validation_score", doc.get("validation_accuracy")),
        confirmed=doc.get("confirmed"),
        arm=str(doc.get("arm") or LLRD),
        convention=doc.get("convention", CONVENTION),
        versions=dict(doc.get("versions") or {}),
        source=source,
    )
