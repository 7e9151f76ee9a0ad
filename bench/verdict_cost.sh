#!/usr/bin/env bash
# The compute of confirm's verdict, fixed seeds vs sequential (docs/results.md, issue 17):
#   one search → two copies of its storage → confirm --top K --seeds 5 --decay-sweep XI,... on one,
#   --seeds auto (--max-seeds 10) on the other → report both → total trial-seconds and runs of each
#   linked study NAME.confirm, split into the verdict's runs, the runners-up's and the sweep's.
# Usage: bash bench/verdict_cost.sh [STUDY.toml] [OUTDIR] [TOP] [DECAYS]   (DECAYS "" for no sweep)
# Writes OUTDIR/NAME.log (every command's output and wall time), OUTDIR/{fixed,auto}.db and
# OUTDIR/{fixed,auto}-report/ (summary.md, summary.json).
set -euo pipefail
study_file=${1:-bench/sst2-cpu-verdict.toml}; out=${2:-docs/results/verdict-cost}; top=${3:-3}; decays=${4-1.0,0.95,0.9,0.8,0.7}
sweep=(); [ -n "$decays" ] && sweep=(--decay-sweep "$decays")
name=$(python3 -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['study']['name'])" "$study_file")
mkdir -p "$out"
abs=$(cd "$out" && pwd)
log="$out/$name.log"
: > "$log"
step() {  # step LABEL CMD...: run one command, log its output and wall time
    local label=$1; shift
    local t0=$SECONDS
    echo "## $label: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    echo "## $label took $((SECONDS - t0)) s" | tee -a "$log"
}
echo "## machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; python -m llrd_search from $(pwd)" | tee -a "$log"
rm -f "$abs/search.db" "$abs/fixed.db" "$abs/auto.db"
step search python3 -m llrd_search run "$study_file" --storage "sqlite:///$abs/search.db" --workers 1
cp "$abs/search.db" "$abs/fixed.db"
cp "$abs/search.db" "$abs/auto.db"
step confirm-fixed python3 -m llrd_search confirm --storage "sqlite:///$abs/fixed.db" --study "$name" --top "$top" --seeds 5 "${sweep[@]}"
step confirm-auto python3 -m llrd_search confirm --storage "sqlite:///$abs/auto.db" --study "$name" --top "$top" --seeds auto --max-seeds 10 "${sweep[@]}"
for kind in fixed auto; do
    step "report-$kind" python3 -m llrd_search report --storage "sqlite:///$abs/$kind.db" --study "$name" --out "$out/$kind-report"
done
python3 - "$abs" "$name" <<'PY' | tee -a "$log"
import json, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
out, name = sys.argv[1], sys.argv[2]
cost = {}
for kind in ("fixed", "auto"):
    study = optuna.load_study(study_name=f"{name}.confirm", storage=f"sqlite:///{out}/{kind}.db")
    meta = json.loads(study.user_attrs["llrd:confirm"])
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    ours = {str(meta.get("winner"))} | {str(s) for s in meta["sources"] if str(s).startswith(("control:", "plain:"))}
    part = {"verdict": [0, 0.0], "runners-up": [0, 0.0], "sweep": [0, 0.0]}
    for t in done:
        src = str(t.user_attrs.get("llrd:confirm_of"))
        key = "verdict" if src in ours else "sweep" if src.startswith("sweep:") else "runners-up"
        part[key][0] += 1
        part[key][1] += t.user_attrs.get("wall_seconds", 0.0)
    cost[kind] = (len(done), sum(t.user_attrs.get("wall_seconds", 0.0) for t in done))
    s = json.load(open(f"{out}/{kind}-report/summary.json"))
    v = s["verdict"]
    print(f"## {kind}: {cost[kind][0]} runs, {cost[kind][1]:.0f} trial-seconds ("
          + ", ".join(f"{k} {n} runs {sec:.0f} s" for k, (n, sec) in part.items()) + ")")
    print(f"##   validation: {v['text']}")
    print(f"##   stopped: {v['stopped']['text']}")
    t = s.get("test")
    print(f"##   held-out test: LLRD {t['llrd']:.4f}, control {t['control']:.4f}: {t['verdict']['text']}" if t else "##   held-out test: none")
print(f"## auto / fixed: {cost['auto'][0] / cost['fixed'][0]:.0%} of the runs, {cost['auto'][1] / cost['fixed'][1]:.0%} of the trial-seconds")
PY
rm -f "$abs/search.db"
