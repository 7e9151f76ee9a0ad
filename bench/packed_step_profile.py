"""The packed step, counted on a CPU: operators per optimizer step, host reads per 100 pack steps,
tokens computed per real token, for MiniLM's shape on the SST-2 quickstart slice.

    python bench/packed_step_profile.py              # ~5 min on 2 busy cores (the counted run is slow)
    python bench/packed_step_profile.py --json out.json

Counts, not times (engine/packed_profile.py says how they are taken), so the machine's load does
not move them. The model is MiniLM's architecture (6 layers, its vocabulary, its LLRD groups) at
hidden size 24 (2 heads, dropout 0) with random weights: operator and read counts depend on the number of parameter
tensors, groups and steps, not on their sizes, and a small width keeps 8 copies quick on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "studies" / "sst2-minilm.toml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packs", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--check-every", type=int, default=32, help="steps between loss checks (the GPU default)")
    p.add_argument("--reads-pack", type=int, default=4, help="K of the pack whose host reads are counted (2 epochs of the slice)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from transformers import AutoModelForSequenceClassification

    from llrd_search.engine.data import load_task_data
    from llrd_search.engine.model import load_tokenizer, resolve_model_path
    from llrd_search.engine.packed import PackJob
    from llrd_search.engine.packed_batches import padding_profile
    from llrd_search.engine.packed_profile import loop_reads, optimizer_step_ops
    from llrd_search.engine.param_groups import build_param_groups
    from llrd_search.spec import load_spec

    spec = load_spec(QUICKSTART)
    tokenizer = load_tokenizer(spec.model)
    task = load_task_data(spec.data, tokenizer, spec.model.max_length, spec.study.seed)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(spec.model.name), num_labels=2)
    config.update({"hidden_size": 24, "intermediate_size": 48, "num_attention_heads": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)

    out: dict = {"cpu": _cpu(), "torch": torch.__version__, "train": len(task.train), "batch_size": spec.train.batch_size}
    out["optimizer_step"] = [{k: v for k, v in optimizer_step_ops(make, k).items() if k != "packed_by_op"} for k in args.packs]
    lengths = task.train.lengths
    out["tokens_per_real_token"] = {
        str(k): {"shared_bins": round(padding_profile(lengths, spec.train.batch_size, k, epochs=spec.train.epochs), 3),
                 "each_slot_alone": round(padding_profile(lengths, spec.train.batch_size, k, shared=False, epochs=spec.train.epochs), 3)}
        for k in args.packs
    }
    jobs = []
    print(json.dumps(out, indent=1), flush=True)
    for seed in range(args.reads_pack):
        model = make(seed)
        groups = build_param_groups(model, base_lr=1e-4, decay=0.9, head_lr=1e-3, weight_decay=spec.train.weight_decay)
        jobs.append(PackJob(model=model, groups=groups, seed=seed))
    cfg = spec.train.model_copy(update={"precision": "fp32", "device": "cpu", "fast_path": False})
    reads = loop_reads(jobs, task, cfg, check_every=args.check_every, pad_id=tokenizer.pad_token_id)
    per_100 = 100 / reads["steps"]
    out["reads"] = {**reads, "k": len(jobs), "scalar_syncs_per_100_steps": round(reads["scalar_syncs"] * per_100, 2),
                    "reads_per_100_steps": round(reads["reads"] * per_100, 2), "evaluations_per_100_steps": round(reads["evaluations"] * per_100, 2)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
