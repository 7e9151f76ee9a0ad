#!/usr/bin/env bash
# One llrd-search worker per GPU as a Slurm job array, all joining one PostgreSQL study.
#
#   1. once, from a login node:   llrd-search create studies/sst2-minilm.toml --storage "$LLRD_STORAGE_WITH_PASSWORD"
#   2. put the password in ~/.pgpass (db-host:5432:llrd:llrd:PASSWORD, chmod 600) on the shared home,
#      or export PGPASSWORD before sbatch (--export=ALL passes it on; it never goes on a command line)
#   3. sbatch --array=0-15 deploy/slurm-array.sh       # 16 workers; add more any time, they join
#
# Where llrd-search comes from: by default the `llrd-search` on PATH (a venv on the shared file
# system, installed as the README says; activate it before sbatch). Or the container image
# (README, "Fleet") through Apptainer/Singularity: pull it once on a login node, create
# the study from it too (the data path stored in the study, /app/studies/data/..., is the image's),
# and point LLRD_IMAGE at the .sif:
#      apptainer pull llrd-search.sif docker://ghcr.io/OWNER/llrd-search:0.1.0-cuda
#      apptainer exec llrd-search.sif llrd-search create /app/studies/sst2-minilm.toml --storage "$LLRD_STORAGE_WITH_PASSWORD"
#      LLRD_IMAGE=$PWD/llrd-search.sif sbatch --array=0-15 deploy/slurm-array.sh
#
# Workers stop by themselves when the study-wide budget is spent. Preemption, scancel or a time
# limit send SIGTERM: the running trial is marked FAIL ("interrupted") and a later worker fills
# its slot. A node that dies without a signal is handled by heartbeats: after grace_period seconds
# another worker retries its trial with the same parameters.
#
#SBATCH --job-name=llrd-worker
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=logs/llrd-worker-%A_%a.out
#SBATCH --export=ALL
set -euo pipefail

STORAGE="${LLRD_STORAGE:-postgresql+psycopg://llrd@db-host:5432/llrd}"   # no password here
STUDY="${LLRD_STUDY:-sst2-minilm}"

# The tokenized-data cache is per machine; node-local disk avoids NFS contention.
export LLRD_SEARCH_CACHE="${SLURM_TMPDIR:-/tmp}/llrd-search-cache"
export TOKENIZERS_PARALLELISM=false

# tests/test_deploy.py runs this script with stand-ins for llrd-search and apptainer and checks
# these arguments against the real command-line parser.
ARGS=(worker --storage "$STORAGE" --study "$STUDY" --threads "${SLURM_CPUS_PER_TASK:-8}")

# exec: the worker itself receives Slurm's SIGTERM (Apptainer passes it on) and exits 130 after
# marking its trial.
if [[ -n "${LLRD_IMAGE:-}" ]]; then
  exec apptainer exec --nv "$LLRD_IMAGE" llrd-search "${ARGS[@]}"
fi
exec llrd-search "${ARGS[@]}"
