#!/usr/bin/env bash
# Pretrain a 7B early-exit GPT on one node with torchrun (8 GPUs).
#
# Shape: EE-LLM's 7B (32 layers, hidden 4096, 32 heads, sequence 2048) with the Llama
# architecture preset (RMSNorm, SwiGLU, RoPE, no biases, untied output layer; FFN 11008, as in
# Llama-2 7B) and two early exits, after layers 8 and 16, each an RMSNorm followed by an output
# projection tied to the word embedding. Exit loss weights start at 0.1 and rise (cosine) to
# 0.25 / 0.5 over the first 2000 iterations; the final head keeps weight 1.
# Layout: TP=2 with sequence parallelism, PP=4 (8 layers per stage: exit 8 on stage 0, exit 16 on
# stage 1, which also holds a copy of the word embedding for its tied exit), DP = NPROC/8 = 1.
# The AdamW state is not sharded over DP (no distributed optimizer), so a 7B model needs TP x PP
# = 8 to keep weights, gradients and fp32 Adam moments (~16 bytes/parameter) near 14 GB per GPU.
# Selective recomputation (core attention) is on by default to bound activation memory.
#
# The data must be preprocessed with the same tokenizer, e.g.
#   python tools/text_to_jsonl.py --output corpus.jsonl --input my_text/*.txt --unit paragraph
#   python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
#       --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \
#       --append-eod --workers 16
#   DATA_PATH=data/corpus_text_document VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#       CKPT_DIR=/checkpoints/ee7b bash examples/pretrain_7b_torchrun.sh
#
# Variables (environment, with defaults):
#   DATA_PATH        (required) indexed dataset prefix(es) from preprocess_data.py; several
#                    corpora may be blended as "W1 PREFIX1 W2 PREFIX2 ..."
#   CKPT_DIR         (required) checkpoint directory: saved to, and resumed from when it holds one
#   NPROC=8          GPUs (processes) on this node; TP x PP must divide it, DP = NPROC / (TP x PP)
#   NNODES=1 NODE_RANK=0   several nodes: run the script once per node with the same NNODES,
#                    RDZV_ENDPOINT=host:port (c10d rendezvous, e.g. on the first node) and
#                    RDZV_ID; DP = NNODES x NPROC / (TP x PP); ranks are node-major, so a TP
#                    group (TP <= NPROC) stays inside a node
#   DEVICE=gpu       cpu: no GPU is used (CUDA_VISIBLE_DEVICES=""), gloo, float32 (no --bf16),
#                    DIST_OPT defaults to 0; for trying the scripts with tiny shapes via EXTRA_ARGS
#   TP=2 PP=4        tensor / pipeline model-parallel sizes (SP is turned on when TP > 1)
#   TOKENIZER=gpt2   gpt2: GPT2BPETokenizer with VOCAB_FILE and MERGE_FILE (vocab.json, merges.txt);
#                    sentencepiece: SentencePieceTokenizer with TOKENIZER_MODEL (a .model file)
#                    byte: ByteTokenizer (256 bytes + end of document; no files)
#   MICRO_BATCH=1 GLOBAL_BATCH=512   sequences per micro-batch / per step (512 x 2048 = 1M tokens)
#   TRAIN_ITERS=100000 LR=3e-4 MIN_LR=3e-5 WARMUP=2000   cosine schedule after linear warm-up
#   SAVE_INTERVAL=1000 EVAL_INTERVAL=1000 EVAL_ITERS=20 LOG_INTERVAL=10
#   LOG_JSON=$CKPT_DIR/train_log.jsonl   --log-json records (plot: tools/plot_training.py)
#   TENSORBOARD_DIR=  write TensorBoard scalars there too (needs the tensorboard package)
#   FILL_BUBBLES=0   1: --fill-explicit-bubbles (exit-loss micro-batches in the 1F1B bubbles; PP > 1)
#   DIST_OPT=1       1: --use-distributed-optimizer (megatron-core's, AdamW state sharded over DP;
#                    GPU only, default 0 with DEVICE=cpu)
#   RECOMPUTE=selective  "selective" (core attention), "full" (whole layers) or "" (none)
#   TORCHRUN=torchrun  launcher (--standalone on one node: rendezvous on a free local port)
#   EXTRA_ARGS=      more pretrain_early_exit_gpt.py flags, appended last (they win)
#   DRY_RUN=0        1: print the command instead of running it
set -euo pipefail

TP="${TP:-2}"
PP="${PP:-4}"
MICRO_BATCH="${MICRO_BATCH:-1}"
RECOMPUTE="${RECOMPUTE-selective}"

MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008
    --seq-length 2048 --max-position-embeddings 2048
    --architecture llama   # RMSNorm, SwiGLU, RoPE, no biases, untied output layer
    --rotary-base 10000 --norm-epsilon 1e-5 --init-method-std 0.02
)
EXIT_ARGS=(
    --exit-layer-nums 8 16 --use-exit-norm
    --exit-layer-weight 0.25 0.5 --exit-layer-weight-init 0.1
    --exit-layer-weight-warmup-iters 2000 --exit-layer-weight-warmup-style cosine
    --final-layer-weight 1.0
)
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_common.sh"
