#!/usr/bin/env bash
# Remake the docs' screenshots from the committed SST-2 study (docs/results/sst2-minilm-full.db):
#   docs/img/report-verdict.png  the verdict section of report.html, as a browser shows it
#   docs/img/dashboard.png       optuna-dashboard on the same storage (the search, its control arm, confirm)
#   docs/img/confirm.txt         what `confirm` prints for that study (every run exists: nothing trains)
# Needs headless Chromium (apt-get install -y chromium) and the package importable. About 3 minutes
# on 2 cores, most of it the report's plots. Run from the repository root: bash tools/screenshots.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CHROME=${CHROME:-$(command -v chromium || command -v chromium-browser || command -v google-chrome)}
TMP=$(mktemp -d)
DASH_PID=""
cleanup() { if [ -n "$DASH_PID" ]; then kill "$DASH_PID" 2>/dev/null || true; fi; rm -rf "$TMP"; }
trap cleanup EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p docs/img
cp docs/results/sst2-minilm-full.db "$TMP/sst2.db"
URL="sqlite:///$TMP/sst2.db"
STUDY=sst2-minilm-full
shot() {  # shot URL OUT WIDTH HEIGHT: a headless screenshot, JavaScript given 15 s to draw
  "$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --virtual-time-budget=15000 --window-size="$3,$4" --screenshot="$2" "$1" >/dev/null 2>&1
}

# confirm with the arguments the study was confirmed with: every run exists, so it only reads them.
python -m llrd_search confirm --storage "$URL" --study "$STUDY" --top 3 --seeds 5 \
  --decay-sweep 1.0,0.95,0.9,0.8,0.7 --workers 1 | sed '/^next: /,$d' > docs/img/confirm.txt  # its next: lines name $TMP

python -m llrd_search report --storage "$URL" --study "$STUDY" --out "$TMP/report" >/dev/null
# The verdict section alone: the report's own page with every other section left out.
python - "$TMP/report/report.html" "$TMP/verdict.html" <<'PY'
import re, sys
html = open(sys.argv[1], encoding="utf-8").read()
head, body = html.split("<body>", 1)
sections = re.split(r"(?=<h2>)", body)
keep = [s for s in sections if s.startswith("<h2>Does LLRD help?")]
assert keep, "report.html has no 'Does LLRD help?' section"
open(sys.argv[2], "w", encoding="utf-8").write(head + "<body>" + keep[0].split("</body>")[0] + "</body></html>")
PY
shot "file://$TMP/verdict.html" docs/img/report-verdict.png 1040 340

# optuna-dashboard: started here, stopped by its process id when the script ends.
PORT=${PORT:-18321}
python -m llrd_search dashboard --storage "$URL" --port "$PORT" >"$TMP/dash.log" 2>&1 &
DASH_PID=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 1; done
shot "http://127.0.0.1:$PORT/dashboard/" docs/img/dashboard.png 1280 720
echo "wrote docs/img/report-verdict.png docs/img/dashboard.png docs/img/confirm.txt"
