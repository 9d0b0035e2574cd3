#!/usr/bin/env bash
# Serve an early-exit checkpoint with tools/run_text_generation_server.py: one process, or one
# torchrun rank per (TP, PP) shard (rank 0 serves HTTP; the others run the same engine steps).
#
#   CKPT=ckpt bash examples/serve.sh                          # http://127.0.0.1:5000
#   CKPT=ckpt TAU=0.8 API_KEY=secret bash examples/serve.sh   # early exit by default, API key
#   CKPT=ckpt TP=2 PP=2 bash examples/serve.sh                # torchrun, 4 ranks (gloo on CPU)
#   DRY_RUN=1 CKPT=ckpt TP=2 bash examples/serve.sh           # print the command only
#
# Variables (environment, with defaults):
#   CKPT=                 checkpoint directory (required): --load
#   PYTHON=python         interpreter with the project installed (e.g. .venv/bin/python)
#   HOST=127.0.0.1 PORT=5000   address to bind (--host, --port)
#   TP=1 PP=1             --tensor-model-parallel-size / --pipeline-model-parallel-size;
#                         TP*PP > 1 launches that many ranks with torchrun
#   TAU=                  --early-exit-thres: server-wide default tau (requests may override)
#   API_KEY=              --api-key (every endpoint but /health then needs it)
#   MAX_BATCH=8 MAX_QUEUE=64   --max-batch-size / --max-queue
#   THREADS=              OMP_NUM_THREADS per rank (default: cores / ranks)
#   TORCHRUN=torchrun     the launcher for TP*PP > 1
#   EXTRA_ARGS=           more flags, appended last (they win)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${CKPT:?set CKPT to the checkpoint directory}"
PYTHON="${PYTHON:-python}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
TP="${TP:-1}"
PP="${PP:-1}"
TAU="${TAU:-}"
API_KEY="${API_KEY:-}"
MAX_BATCH="${MAX_BATCH:-8}"
MAX_QUEUE="${MAX_QUEUE:-64}"
TORCHRUN="${TORCHRUN:-torchrun}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"
NPROC=$(( TP * PP ))
THREADS="${THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"

ARGS=(--load "$CKPT" --host "$HOST" --port "$PORT" --max-batch-size "$MAX_BATCH"
      --max-queue "$MAX_QUEUE" --tensor-model-parallel-size "$TP"
      --pipeline-model-parallel-size "$PP")
if [[ -n "$TAU" ]]; then ARGS+=(--early-exit-thres "$TAU"); fi
if [[ -n "$API_KEY" ]]; then ARGS+=(--api-key "$API_KEY"); fi
# shellcheck disable=SC2206  # EXTRA_ARGS is split into words on purpose
ARGS+=($EXTRA_ARGS)

if (( NPROC > 1 )); then
    CMD=("$TORCHRUN" --standalone --nproc-per-node "$NPROC" "$REPO/tools/run_text_generation_server.py" "${ARGS[@]}")
else
    CMD=("$PYTHON" "$REPO/tools/run_text_generation_server.py" "${ARGS[@]}")
fi
if [[ "$DRY_RUN" == 1 ]]; then
    echo "OMP_NUM_THREADS=$THREADS ${CMD[*]}"
    exit 0
fi
export OMP_NUM_THREADS="$THREADS"
exec "${CMD[@]}"
