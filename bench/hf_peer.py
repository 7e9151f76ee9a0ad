"""The peer: the same LLRD search written the way a Hugging Face user writes it.

``transformers.Trainer`` with its defaults (fp32, its own sampler, ``DataCollatorWithPadding``,
AdamW as ``TrainingArguments.optim`` says), LLRD added the way the maintainers recommend (subclass,
override ``create_optimizer``), the search through ``Trainer.hyperparameter_search(backend="optuna")``
with ``model_init`` so every trial starts from the pretrained weights. The LLRD groups come from
``llrd_search.engine.param_groups.build_param_groups``, so both sides train exactly the same LR per tensor.

Run by ``bench/compare_hf.py`` in its own process; it writes one JSON file of timings. Only timing
hooks are added (a callback and a timed ``evaluate``); they do not change what is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train.csv and validation.csv")
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True, help="where to write the timings")
    p.add_argument("--spawn", type=float, required=True, help="time.time() when the parent started this process")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=8, help="per_device_eval_batch_size (the Trainer's default 8; llrd-search's is 128)")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--startup", type=int, default=10, help="TPE startup trials (llrd-search's choice for the budget)")
    p.add_argument("--storage", help="optuna storage URL (search mode)")
    p.add_argument("--enqueue", default="[]", help="JSON list of param dicts enqueued first (the same as ours)")
    p.add_argument("--space", required=True, help="JSON {name: [low, high, log]}")
    p.add_argument("--fixed", help="JSON params: train this one config for each of --seeds instead of searching")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): what a Trainer user sets on a GPU")
    p.add_argument("--first-seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    import optuna
    import transformers
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llrd_search.engine.param_groups import build_param_groups

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # ---- what a user writes -------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = load_dataset("csv", data_files={s: os.path.join(args.data, f"{s}.csv") for s in ("train", "validation")})
    data = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True, remove_columns=["text"])

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)

    def compute_metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    space = json.loads(args.space)

    def hp_space(trial):
        return {k: trial.suggest_float(k, lo, hi, log=log) for k, (lo, hi, log) in space.items()}

    class LLRDTrainer(Trainer):
        fixed: dict | None = None

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                hp = self.fixed or self._trial.params
                groups = build_param_groups(self.model, weight_decay=self.args.weight_decay, **hp)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                kwargs.pop("lr", None)  # every group carries its own LR
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

        # ---- timing only ----
        def evaluate(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super().evaluate(*a, **kw)
            finally:
                clock.eval_s += time.perf_counter() - t0

    steps_per_epoch = math.ceil(len(data["train"]) / args.batch_size)
    out_dir = tempfile.mkdtemp(prefix="hf-peer-")

    def training_args(seed: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            num_train_epochs=args.epochs,
            weight_decay=0.01,
            warmup_steps=0.1,  # a float below 1 is a ratio of the total steps
            eval_strategy="steps",
            eval_steps=round(steps_per_epoch / 2),  # twice an epoch (and at the end), as llrd-search does
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=seed,
            bf16=args.bf16,
        )

    # ---- timing hooks ---------------------------------------------------------------------------
    class Clock(TrainerCallback):
        def __init__(self):
            self.runs: list[dict] = []
            self.eval_s = 0.0

        def on_train_begin(self, args_, state, control, **kw):
            self.eval_s = 0.0
            self.runs.append({"t_begin": time.time() - args.spawn, "evals": []})

        def on_evaluate(self, args_, state, control, metrics=None, **kw):
            self.runs[-1]["evals"].append([state.global_step, metrics["eval_accuracy"], time.time() - args.spawn])

        def on_train_end(self, args_, state, control, **kw):
            run = self.runs[-1]
            run["t_end"] = time.time() - args.spawn
            run["eval_s"] = self.eval_s
            run["loop_s"] = run["t_end"] - run["t_begin"]

    clock = Clock()
    setup_s = time.time() - args.spawn
    result: dict = {"setup_s": setup_s, "n_train": len(data["train"]), "n_validation": len(data["validation"]), "threads": __import__("torch").get_num_threads()}

    if args.fixed:
        fixed = json.loads(args.fixed)
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            trainer = LLRDTrainer(model_init=model_init, args=training_args(seed), train_dataset=data["train"], eval_dataset=data["validation"],
                                  processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics, callbacks=[clock])
            trainer.fixed = fixed
            t0 = time.time()
            trainer.train()
            runs.append({"seed": seed, "wall": time.time() - t0, **clock.runs[-1]})
        result["fixed"] = {"params": fixed, "runs": runs}
    else:
        trainer = LLRDTrainer(model_init=model_init, args=training_args(42), train_dataset=data["train"], eval_dataset=data["validation"],
                              processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics, callbacks=[clock])
        # The same first points as llrd-search enqueues (the paper's point and its no-decay control).
        study = optuna.create_study(storage=args.storage, study_name="peer", direction="maximize")
        for point in json.loads(args.enqueue):
            study.enqueue_trial(point)
        t_search = time.time() - args.spawn
        best = trainer.hyperparameter_search(
            hp_space=hp_space,
            compute_objective=lambda m: m["eval_accuracy"],
            n_trials=args.trials,
            direction="maximize",
            backend="optuna",
            storage=args.storage,
            study_name="peer",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=args.sampler_seed, n_startup_trials=args.startup),
            pruner=optuna.pruners.NopPruner(),
        )
        trials = optuna.load_study(study_name="peer", storage=args.storage).get_trials()
        result["search_start_s"] = t_search
        result["best"] = {"value": best.objective, "params": best.hyperparameters}
        result["trials"] = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "wall": (t.datetime_complete - t.datetime_start).total_seconds(),
                "t_complete": t.datetime_complete.timestamp() - args.spawn,
                **run,
            }
            for t, run in zip(trials, clock.runs, strict=True)
        ]
    result["total_s"] = time.time() - args.spawn
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
