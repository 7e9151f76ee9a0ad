"""The Optuna objective: sample (base_lr, head_lr, decay), fine-tune with LLRD groups, return the metric.

Everything expensive and trial-independent (tokenized data, pretrained weights, device and
precision choice) is prepared once in :class:`Objective` and reused by every trial of a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
import torch

from llrd_search.engine.data import Encoded, TaskData, load_task_data
from llrd_search.engine.memory import PEAK_ATTR, peak_bytes, reset_peak
from llrd_search.engine.memory_guard import release_memory
from llrd_search.engine.metrics import check_metric
from llrd_search.engine.model import ModelTemplate, fresh_model, load_template, load_tokenizer
from llrd_search.engine.param_groups import build_param_groups, group_table
from llrd_search.engine.space import suggest
from llrd_search.engine.steps import step_callback
from llrd_search.engine.train import TrainResult, evaluate, pick_device, pick_precision, train_and_evaluate
from llrd_search.exceptions import DivergedError, OutOfMemoryError
from llrd_search.spec import StudySpec
from llrd_search.vocab import CONFIRM_OF_ATTR, TEST_ATTR, training_seed

log = logging.getLogger(__name__)


class Objective:
    """Callable objective for one worker process. Build once, call once per trial.

    ``on_step(step, total)`` runs at every training step, after the hooks whoever calls the
    objective installed with :func:`steps.step_hook` (a worker's signal check).
    """

    def __init__(
        self,
        spec: StudySpec,
        *,
        task: TaskData | None = None,
        template: ModelTemplate | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ):
        t0 = time.perf_counter()
        self.spec = spec
        tokenizer = template.tokenizer if template else load_tokenizer(spec.model)
        self.task = task or load_task_data(spec.data, tokenizer, spec.model.max_length, spec.study.seed)
        check_metric(spec.train.metric, self.task.num_labels)  # before a model loads or a study is written
        self.template = template or load_template(spec.model, self.task.id2label, tokenizer)
        self.device = pick_device(spec.train.device)
        self.dtype = pick_precision(spec.train.precision, self.device)
        self.pad_id = self.template.tokenizer.pad_token_id or 0
        self.on_step = on_step
        self.setup_seconds = time.perf_counter() - t0

    @property
    def precision_name(self) -> str:
        return "bf16" if self.dtype is not None else "fp32"

    def __call__(self, trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        model, groups, seed = self.prepare(trial)
        evals: list[dict] = []
        test = self.test_split_for(trial)
        test_score = None if test is None else lambda: evaluate(
            model, test, pad_id=self.pad_id, batch_size=self.spec.train.eval_batch_size, device=self.device, dtype=self.dtype, metric=self.spec.train.metric
        )
        on_eval = self.pruning_callback(trial, evals, test_score)
        overhead = time.perf_counter() - t0
        reset_peak(self.device)  # what this trial takes on a GPU sizes `run --workers-per-gpu auto` on resume
        out_of_memory: str | None = None
        try:
            result = train_and_evaluate(
                model,
                self.task,
                groups,
                self.spec.train,
                seed=seed,
                pad_id=self.pad_id,
                device=self.device,
                dtype=self.dtype,
                on_eval=on_eval,
                on_step=step_callback(self.on_step),
            )
        except DivergedError as err:
            raise self.diverged(trial, err, evals) from None
        except OutOfMemoryError as err:
            out_of_memory = str(err)
        if out_of_memory is not None:
            # Raised again from here without the trial's model: its weights leave the device now, not
            # when the worker lets go of the error, and the worker's next trial finds the memory free.
            del model, groups
            release_memory(self.device)
            trial.set_user_attr("evals", evals)
            raise OutOfMemoryError(out_of_memory)
        return self.record(trial, result, evals, overhead)

    # The steps of a trial, shared with packed trials (engine/packed_trials.py), which run the
    # training in between for several trials at once.

    def seed_of(self, trial: optuna.Trial) -> int:
        # A confirmation run's training seed is set when it is queued: run i of every configuration
        # trains with the same seed, so configurations are compared on paired seeds.
        return training_seed(trial.user_attrs, self.spec.study.seed, self.spec.study.trial_seed_offset, trial.number)

    def prepare(self, trial: optuna.Trial) -> tuple[torch.nn.Module, list[dict], int]:
        """Sample the trial's LRs; its fresh model, LLRD groups and seed, recorded in its user attrs."""
        params = suggest(trial, self.spec.space)
        seed = self.seed_of(trial)
        model = fresh_model(self.template, seed)
        groups = build_param_groups(model, weight_decay=self.spec.train.weight_decay, **params)
        trial.set_user_attr("lr_groups", group_table(groups))
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(self.device))
        trial.set_user_attr("precision", self.precision_name)
        trial.set_user_attr("n_train", len(self.task.train))
        trial.set_user_attr("n_validation", len(self.task.validation))
        # Memory knobs are not part of a study's identity (a study may resume with them changed): each trial says its own.
        if self.spec.train.grad_accum > 1:
            trial.set_user_attr("grad_accum", self.spec.train.grad_accum)
        if self.spec.train.gradient_checkpointing:
            trial.set_user_attr("gradient_checkpointing", True)
        return model, groups, seed

    def test_split_for(self, trial: optuna.Trial) -> Encoded | None:
        """The held-out test split when ``trial`` is a confirmation run and the data has one: it is
        scored there, beside validation, and never ranked by."""
        return self.task.test if CONFIRM_OF_ATTR in trial.user_attrs else None

    def record_test(self, trial: optuna.Trial, score: float) -> None:
        trial.set_user_attr(TEST_ATTR, score)
        trial.set_user_attr("n_test", len(self.task.test) if self.task.test is not None else 0)

    def pruning_callback(
        self, trial: optuna.Trial, evals: list[dict], test_score: Callable[[], float] | None = None
    ) -> Callable[[int, float], None]:
        """``on_eval`` for the loop: record, report, raise TrialPruned when the pruner says so.
        With ``test_score``, the test split is scored at every evaluation that beats the ones before
        (so what is kept is the test score at the evaluation validation picks: the first best, as
        ``train_and_evaluate``'s best_score)."""
        metric = self.spec.train.metric
        best = [float("-inf")]

        def on_eval(step: int, value: float) -> None:
            evals.append({"eval": len(evals) + 1, "step": step, metric: value})
            if test_score is not None and value > best[0]:
                best[0] = value
                self.record_test(trial, test_score())
            # Intermediate steps are evaluation indices: the pruner's resources are evaluations.
            trial.report(value, len(evals))
            if trial.should_prune():
                trial.set_user_attr("evals", evals)
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at evaluation {len(evals)} ({metric} {value:.4f})")

        return on_eval

    def diverged(self, trial: optuna.Trial, err: DivergedError, evals: list[dict]) -> optuna.TrialPruned:
        # PRUNED, not FAIL: the point was tried and is bad (its LRs are too high). It uses its
        # slot of the budget (a FAIL would be refilled), TPE learns to avoid the region (it
        # ignores FAIL trials), and a search space reaching into diverging LRs does not trip
        # the worker's repeated-failure stop. The reason stays in the trial.
        trial.set_user_attr("diverged", str(err))
        trial.set_user_attr("evals", evals)
        return optuna.TrialPruned(f"diverged: {err}")

    def record(self, trial: optuna.Trial, result: TrainResult, evals: list[dict], overhead: float, *, alone: bool = True) -> float:
        """Store a finished run's numbers in the trial; its value. ``alone``: the trial had the
        device to itself, so the device's peak memory is its own (not a packed trial's)."""
        trial.set_user_attr("evals", evals)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("best_step", result.best_step)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        trial.set_user_attr("eval_seconds", round(result.eval_seconds, 3))
        trial.set_user_attr("train_examples_per_second", round(result.examples_per_second, 2))
        trial.set_user_attr("trial_overhead_seconds", round(overhead, 3))
        if alone and (peak := peak_bytes(self.device)) is not None:
            trial.set_user_attr(PEAK_ATTR, peak)
        return result.best_score
