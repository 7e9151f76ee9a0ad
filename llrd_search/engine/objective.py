"""The Optuna objective: sample (base_lr, head_lr, decay), fine-tune with LLRD groups, return the metric.

Everything expensive and trial-independent (tokenized data, pretrained weights, device and
precision choice) is prepared once in :class:`Objective` and reused by every trial of a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna

from llrd_search.engine.data import TaskData, load_task_data
from llrd_search.engine.metrics import check_metric
from llrd_search.engine.model import ModelTemplate, fresh_model, load_template, load_tokenizer
from llrd_search.engine.param_groups import build_param_groups, group_table
from llrd_search.engine.space import suggest
from llrd_search.engine.steps import step_callback
from llrd_search.engine.train import evaluate, pick_device, pick_precision, train_and_evaluate
from llrd_search.exceptions import DivergedError
from llrd_search.spec import StudySpec
from llrd_search.vocab import CONFIRM_OF_ATTR, SEED_ATTR, TEST_ATTR

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
        params = suggest(trial, self.spec.space)
        # A confirmation run's training seed is set when it is queued: run i of every configuration
        # trains with the same seed, so configurations are compared on paired seeds.
        seed = int(trial.user_attrs.get(SEED_ATTR, self.spec.study.seed + self.spec.study.trial_seed_offset + trial.number))
        model = fresh_model(self.template, seed)
        groups = build_param_groups(model, weight_decay=self.spec.train.weight_decay, **params)
        trial.set_user_attr("lr_groups", group_table(groups))
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(self.device))
        trial.set_user_attr("precision", self.precision_name)
        trial.set_user_attr("n_train", len(self.task.train))
        trial.set_user_attr("n_validation", len(self.task.validation))
        evals: list[dict] = []

        metric = self.spec.train.metric
        # A confirmation run also scores the held-out test split, at the evaluation validation picks
        # (the first best, as train_and_evaluate's best_score): reported beside it, never ranked by.
        test = self.task.test if CONFIRM_OF_ATTR in trial.user_attrs else None
        best_val = [float("-inf")]

        def on_eval(step: int, value: float) -> None:
            evals.append({"eval": len(evals) + 1, "step": step, metric: value})
            if test is not None and value > best_val[0]:
                best_val[0] = value
                score = evaluate(model, test, pad_id=self.pad_id, batch_size=self.spec.train.eval_batch_size, device=self.device,
                                 dtype=self.dtype, metric=metric)
                trial.set_user_attr(TEST_ATTR, score)
                trial.set_user_attr("n_test", len(test))
            # Intermediate steps are evaluation indices: the pruner's resources are evaluations.
            trial.report(value, len(evals))
            if trial.should_prune():
                trial.set_user_attr("evals", evals)
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at evaluation {len(evals)} ({metric} {value:.4f})")

        overhead = time.perf_counter() - t0
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
            # PRUNED, not FAIL: the point was tried and is bad (its LRs are too high). It uses its
            # slot of the budget (a FAIL would be refilled), TPE learns to avoid the region (it
            # ignores FAIL trials), and a search space reaching into diverging LRs does not trip
            # the worker's repeated-failure stop. The reason stays in the trial.
            trial.set_user_attr("diverged", str(err))
            trial.set_user_attr("evals", evals)
            raise optuna.TrialPruned(f"diverged: {err}") from None
        trial.set_user_attr("evals", evals)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("best_step", result.best_step)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        trial.set_user_attr("eval_seconds", round(result.eval_seconds, 3))
        trial.set_user_attr("train_examples_per_second", round(result.examples_per_second, 2))
        trial.set_user_attr("trial_overhead_seconds", round(overhead, 3))
        return result.best_score
