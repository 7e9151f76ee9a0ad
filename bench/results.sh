#!/usr/bin/env bash
# The results behind docs/results.md.
#   bash bench/results.sh
#       regenerates every committed report under docs/results/ from its committed database with
#       today's code (bench/committed_reports.py: report only, no training; minutes on a CPU).
#   bash bench/results.sh STUDY.toml OUTDIR [WORKERS] [SEEDS]
#       the whole pipeline for one study file (on a GPU): search (with the LR-matched ξ = 1 arm)
#       → confirm the top 3 and the control with 5 paired seeds → re-run the winner's LRs at the
#       paper's ξ values → report.
# Environment: THREADS (torch threads per worker; default: cores / WORKERS), REPORT_DIR
# (default OUTDIR/NAME-report).
# Writes OUTDIR/NAME.db (the study), OUTDIR/NAME.log (every command's output, with wall times)
# and OUTDIR/NAME-report/ (report.html, summary.md, summary.json, plots).
set -euo pipefail
if [[ $# -eq 0 ]]; then
    cd "$(dirname "$0")/.."
    exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 bench/committed_reports.py
fi
study_file=$1; out=$2; workers=${3:-1}; seeds=${4:-5}
name=$(python3 -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['study']['name'])" "$study_file")
mkdir -p "$out"
db="sqlite:///$(cd "$out" && pwd)/$name.db"
log="$out/$name.log"
report_dir=${REPORT_DIR:-$out/$name-report}
threads=()
if [[ -n ${THREADS:-} ]]; then threads=(--threads "$THREADS"); fi
step() {  # step LABEL CMD...: run one command, log its output and wall time
    local label=$1; shift
    local t0=$SECONDS
    echo "## $label: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    echo "## $label took $((SECONDS - t0)) s" | tee -a "$log"
}
python3 - <<'PY' | tee -a "$log"
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
print(f"## machine: {dev}; torch {torch.__version__}; {torch.get_num_threads()} threads")
PY
step search python3 -m llrd_search run "$study_file" --storage "$db" --workers "$workers" "${threads[@]}"
step report-search python3 -m llrd_search report "$study_file" --storage "$db" --out "$report_dir"
step confirm python3 -m llrd_search confirm "$study_file" --storage "$db" --top 3 --seeds "$seeds" \
    --decay-sweep 1.0,0.95,0.9,0.8,0.7 --workers "$workers" "${threads[@]}"
step report python3 -m llrd_search report "$study_file" --storage "$db" --out "$report_dir"
