"""bench/gpu.sh, part 1, in one process: packed-vs-unpacked parity on the device, then a step
micro-benchmark (ms per optimizer step timed with CUDA events, examples/s, peak memory) of one
unpacked model with fused AdamW against packs of K = 1, 2, 4, 8 copies (engine/packed_model.py,
``PackedAdamW``), for MiniLM and a BERT-base-shaped model (random weights from a config: no download).

    python bench/gpu_micro.py --out gpu-out             # on a GPU: ~90 s
    python bench/gpu_micro.py --out /tmp/x --dry-run    # CPU, tiny shapes: checks the plumbing

Parity: K = 2 copies with different LLRD settings, fp32, dropout 0, the same batches; the packed
copies' weights after a few steps must equal the unpacked models' (AdamW + clip_grad_norm_) to 1e-4.
Writes OUT/micro.json and OUT/micro.md (after each model, so a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

from llrd_search.engine.packed import copy_losses, lr_of
from llrd_search.engine.packed_model import copy_weights, pack_models
from llrd_search.engine.packed_optim import PackedAdamW
from llrd_search.engine.param_groups import build_param_groups
from llrd_search.engine.train import prepared_mask

SHAPES = {"bert-base": (768, 12, 12, 3072, 30522), "tiny": (32, 2, 2, 64, 2000)}  # hidden, layers, heads, intermediate, vocab
POINTS = [dict(base_lr=2e-5, decay=0.95, head_lr=2e-5), dict(base_lr=1e-4, decay=0.8, head_lr=1e-3)]  # copy k: POINTS[k % 2]
PARITY_TOL = 1e-4


def build(model: str, device: torch.device, *, dropout: bool = True) -> torch.nn.Module:
    """MiniLM (the packaged weights), or a BERT of ``SHAPES[model]`` with random weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    drop = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    if model == "minilm":
        from llrd_search.engine.model import resolve_model_path

        path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
        config = AutoConfig.from_pretrained(path, num_labels=2, **drop)
        m = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    else:
        h, layers, heads, inter, vocab = SHAPES[model]
        config = BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                            num_labels=2, **drop)
        m = AutoModelForSequenceClassification.from_config(config)
    return m.to(device).train()


def groups(model: torch.nn.Module, k: int) -> list[dict]:
    return build_param_groups(model, weight_decay=0.01, **POINTS[k % len(POINTS)])


def batches(n: int, rows: int, width: int, vocab: int, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random batches of ``rows`` sentences of ``width`` tokens (no padding: every copy's rows
    are equally long, the best case of the packed stack)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (rows, width), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (rows,), generator=g)})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


class Unpacked:
    """One model, torch's AdamW (fused on CUDA) and clip_grad_norm_: the unpacked loop's step."""

    def __init__(self, model: torch.nn.Module, k: int = 0):
        self.model = model
        self.opt = torch.optim.AdamW(groups(model, k), fused=model.device.type == "cuda")

    def step(self, batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        # the mask as engine/train.py passes it: 4D, so the model does not sync to inspect it
        batch = {**batch, "attention_mask": prepared_mask(self.model, batch["attention_mask"], dtype)}
        with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Packed:
    """K copies as one packed model with ``PackedAdamW``: the packed loop's step (engine/packed.py)."""

    def __init__(self, models: list[torch.nn.Module]):
        first = groups(models[0], 0)
        names = {id(p): n for n, p in models[0].named_parameters()}
        group_of = {names[id(p)]: g["name"] for g in first for p in g["params"]}
        decay = {g["name"]: g["weight_decay"] for g in first}
        lrs = [lr_of(groups(m, k)) for k, m in enumerate(models)]
        self.k = len(models)
        self.model, self.state = pack_models(models)
        params = {n: p for n, p in self.model.named_parameters() if n in group_of}
        self.opt = PackedAdamW(params, group_of, decay, lrs)
        # constant multipliers made on the device once: a list per step would be a host-to-device copy
        self.ones = torch.ones(self.k, dtype=torch.float64, device=next(self.model.parameters()).device)

    def step(self, parts: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
        batch, labels = _stack_on_device(parts)
        self.state.rows = labels.shape[1]
        batch["attention_mask"] = prepared_mask(self.model, batch["attention_mask"], dtype)
        with torch.autocast(labels.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(**batch).logits
        copy_losses(logits, labels).sum().backward()
        self.opt.clip_grad_norm_(1.0)
        self.opt.step(self.ones)
        self.opt.zero_grad()


def _stack_on_device(parts: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    # Equal widths and rows (batches()): engine/packed.stack_batches' layout is a plain concat here,
    # kept on the device so the timing is the step's own, not the host's padding.
    return ({k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "attention_mask")}, torch.stack([p["labels"] for p in parts]))


def parity(model_name: str, device: torch.device, steps: int, rows: int, width: int) -> dict:
    """Max |packed - unpacked| over every weight of 2 copies after ``steps`` steps, fp32 (no TF32),
    dropout 0."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _parity(model_name, device, steps, rows, width)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _parity(model_name: str, device: torch.device, steps: int, rows: int, width: int) -> dict:
    template = build(model_name, device, dropout=False)
    vocab = template.config.vocab_size
    data = [batches(steps, rows, width, vocab, device, seed=k) for k in range(2)]
    alone = [Unpacked(copy.deepcopy(template), k) for k in range(2)]
    for k, u in enumerate(alone):
        for b in data[k]:
            u.step(b, None)
    packed = Packed([copy.deepcopy(template) for _ in range(2)])
    for i in range(steps):
        packed.step([data[0][i], data[1][i]], None)
    worst = moved = 0.0
    start = dict(template.named_parameters())
    for k, u in enumerate(alone):
        mine = copy_weights(packed.model, k)
        for name, p in u.model.named_parameters():
            worst = max(worst, (mine[name].float() - p.detach().float()).abs().max().item())
            moved = max(moved, (p.detach().float() - start[name].detach().float()).abs().max().item())
    # moved: how far training took the weights, so a tolerance met by weights that never moved shows
    return {"model": model_name, "steps": steps, "max_abs_diff": worst, "moved": moved, "ok": worst <= PARITY_TOL and moved > 10 * PARITY_TOL}


def timed(step, n_warm: int, n: int, device: torch.device) -> float:
    """Seconds per step: ``n`` steps after ``n_warm``, CUDA events on a GPU (no host sync inside)."""
    for _ in range(n_warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def bench_one(model_name: str, setup: str, template: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """One row: ``setup`` is "unpacked" or "packed K"."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    k = 1 if setup == "unpacked" else int(setup.split()[1])
    vocab = template.config.vocab_size
    row = {"model": model_name, "setup": setup, "k": k, "rows_per_copy": args.rows, "width": args.width}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        data = [batches(2, args.rows, args.width, vocab, device, seed=c) for c in range(k)]
        if setup == "unpacked":
            u = Unpacked(copy.deepcopy(template))
            state = {"i": 0}

            def step() -> None:
                u.step(data[0][state["i"] % 2], dtype)
                state["i"] += 1
        else:
            p = Packed([copy.deepcopy(template) for _ in range(k)])
            state = {"i": 0}

            def step() -> None:
                p.step([d[state["i"] % 2] for d in data], dtype)
                state["i"] += 1

        s = timed(step, args.warmup, args.steps, device)
        row.update(ms_per_step=s * 1000, examples_per_s=k * args.rows / s)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        row["error"] = "CUDA out of memory"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(result: dict) -> str:
    lines = [f"### Step micro-benchmark ({result['device']}, {result['date']})", "",
             f"`{result['command']}`; batch {result['rows_per_copy']} x {result['width']} tokens per copy, "
             f"{'bf16 autocast' if result['cuda'] else 'fp32'}, {result['steps']} timed steps after {result['warmup']}"
             f"{', CUDA events' if result['cuda'] else ''}.", ""]
    for p in result["parity"]:
        lines.append(f"Parity, {p['model']}, packed K = 2 vs 2 unpacked (fp32, dropout 0, {p['steps']} steps): "
                     f"max |diff| {p['max_abs_diff']:.2e} (weights moved up to {p.get('moved', 0):.2e}): "
                     f"**{'ok' if p['ok'] else 'FAILED'}** (tolerance {PARITY_TOL:g})")
    lines += ["", "| model | setup | ms / step | examples / s | vs unpacked | peak GiB |", "|---|---|---:|---:|---:|---:|"]
    base = {r["model"]: r.get("examples_per_s") for r in result["rows"] if r["setup"] == "unpacked"}
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['setup']} | - | - | - | {r['error']} |")
            continue
        vs = f"{r['examples_per_s'] / base[r['model']]:.2f}x" if base.get(r["model"]) else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['model']} | {r['setup']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.0f} | {vs} | {peak} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, few steps: runs the same code, measures nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        args.models, args.ks, args.rows, args.width, args.warmup, args.steps, args.parity_steps = ["tiny"], [1, 2], 4, 16, 1, 2, 3
    else:
        args.models, args.ks, args.rows, args.width, args.warmup, args.steps, args.parity_steps = ["minilm", "bert-base"], [1, 2, 4, 8], 32, 128, 3, 15, 5
    return args


def main(argv: list[str] | None = None) -> int:
    import datetime

    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else ("CPU (dry run: measures nothing)" if args.dry_run else "CPU, no CUDA")
    result = {"device": name, "date": datetime.date.today().isoformat(), "cuda": device.type == "cuda", "torch": torch.__version__,
              "command": "python bench/gpu_micro.py" + " --dry-run" * args.dry_run, "rows_per_copy": args.rows, "width": args.width,
              "steps": args.steps, "warmup": args.warmup, "parity": [], "rows": []}

    def save() -> None:
        (args.out / "micro.json").write_text(json.dumps(result, indent=1))
        (args.out / "micro.md").write_text(markdown(result))

    t0 = time.time()
    result["parity"].append(parity(args.models[0], device, args.parity_steps, min(args.rows, 8), min(args.width, 32)))
    print(f"[micro] parity: {result['parity'][-1]} ({time.time() - t0:.0f} s)", flush=True)
    save()
    for model_name in args.models:
        template = build(model_name, device)
        for setup in ["unpacked", *(f"packed {k}" for k in args.ks)]:
            result["rows"].append(bench_one(model_name, setup, template, args, device))
            print(f"[micro] {result['rows'][-1]} ({time.time() - t0:.0f} s)", flush=True)
            save()
        del template
    print(markdown(result), flush=True)
    return 0 if all(p["ok"] for p in result["parity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
