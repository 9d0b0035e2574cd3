# Shared body of examples/pretrain_*_torchrun.sh: reads the environment variables those scripts
# document, builds the pretrain_early_exit_gpt.py command and runs it under torchrun.
# The sourcing script sets MODEL_ARGS, EXIT_ARGS and its defaults for TP, PP, MICRO_BATCH and
# RECOMPUTE first. Not meant to be run on its own.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${MODEL_ARGS:?}" "${EXIT_ARGS:?}"
: "${DATA_PATH:?set DATA_PATH to the dataset prefix written by tools/preprocess_data.py}"
: "${CKPT_DIR:?set CKPT_DIR to the checkpoint directory}"
NPROC="${NPROC:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-ee-pretrain}"
DEVICE="${DEVICE:-gpu}"
TOKENIZER="${TOKENIZER:-gpt2}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
TRAIN_ITERS="${TRAIN_ITERS:-100000}"
LR="${LR:-3e-4}"
MIN_LR="${MIN_LR:-3e-5}"
WARMUP="${WARMUP:-2000}"
SAVE_INTERVAL="${SAVE_INTERVAL:-1000}"
EVAL_INTERVAL="${EVAL_INTERVAL:-1000}"
EVAL_ITERS="${EVAL_ITERS:-20}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
LOG_JSON="${LOG_JSON:-$CKPT_DIR/train_log.jsonl}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"
FILL_BUBBLES="${FILL_BUBBLES:-0}"
TORCHRUN="${TORCHRUN:-torchrun}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"

case "$DEVICE" in
    gpu) PRECISION_ARGS=(--bf16); DIST_OPT="${DIST_OPT:-1}" ;;
    # no GPU visible: pretrain_early_exit_gpt.py then runs on CPU with gloo, in float32
    cpu) PRECISION_ARGS=(); DIST_OPT="${DIST_OPT:-0}"; export CUDA_VISIBLE_DEVICES="" ;;
    *) echo "DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

case "$TOKENIZER" in
    gpt2)
        : "${VOCAB_FILE:?TOKENIZER=gpt2 needs VOCAB_FILE (GPT-2 vocab.json)}"
        : "${MERGE_FILE:?TOKENIZER=gpt2 needs MERGE_FILE (GPT-2 merges.txt)}"
        TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE") ;;
    sentencepiece)
        : "${TOKENIZER_MODEL:?TOKENIZER=sentencepiece needs TOKENIZER_MODEL (a SentencePiece .model)}"
        TOKENIZER_ARGS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL") ;;
    byte)
        TOKENIZER_ARGS=(--tokenizer-type ByteTokenizer) ;;
    *)
        echo "TOKENIZER must be gpt2, sentencepiece or byte, got '$TOKENIZER'" >&2; exit 2 ;;
esac

PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if (( TP > 1 )); then PARALLEL_ARGS+=(--sequence-parallel); fi
if [[ "$FILL_BUBBLES" == 1 ]]; then PARALLEL_ARGS+=(--fill-explicit-bubbles); fi
if [[ -n "$RECOMPUTE" ]]; then PARALLEL_ARGS+=(--recompute-granularity "$RECOMPUTE"); fi
TRAIN_ARGS=(
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    "${PRECISION_ARGS[@]}" --seed 1234
)
if [[ "$DIST_OPT" == 1 ]]; then TRAIN_ARGS+=(--use-distributed-optimizer); fi
# shellcheck disable=SC2206  # DATA_PATH may be a weighted list: split it into words
DATA_ARGS=(--data-path $DATA_PATH --split 969,30,1 "${TOKENIZER_ARGS[@]}" --make-vocab-size-divisible-by 128)
RUN_ARGS=(
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$SAVE_INTERVAL"
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --log-interval "$LOG_INTERVAL" --log-json "$LOG_JSON"
)
if [[ -n "$TENSORBOARD_DIR" ]]; then RUN_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR"); fi

if (( NNODES > 1 )); then   # one torchrun per node, all meeting at RDZV_ENDPOINT (c10d)
    : "${RDZV_ENDPOINT:?NNODES > 1 needs RDZV_ENDPOINT=host:port (reachable from every node)}"
    LAUNCH_ARGS=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
                 --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --max-restarts 0)
else
    LAUNCH_ARGS=(--standalone)
fi

# shellcheck disable=SC2206  # EXTRA_ARGS is a flag list
CMD=("$TORCHRUN" "${LAUNCH_ARGS[@]}" --nproc-per-node "$NPROC"
     "$REPO/pretrain_early_exit_gpt.py" "${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" "${PARALLEL_ARGS[@]}"
     "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${RUN_ARGS[@]}" $EXTRA_ARGS)

if [[ "$DRY_RUN" == 1 ]]; then
    if [[ "$DEVICE" == cpu ]]; then printf 'CUDA_VISIBLE_DEVICES= '; fi
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
mkdir -p "$CKPT_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${CMD[@]}"
