#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in one call of the device tool
# (see docs/benchmarks.md): the GPU tests, then the decode benchmark at EE-LLM's 1.3B shape.
#   bash benchmarks/gpu_check.sh            # needs megatron-core (the .whl folder is installed if present)
# Logs go to $OUT (the device tool's output folder) or ./gpu_out.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/megatron_core-*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
STAGE=${STAGE:-all}
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  python3 -m pytest -q -x -p no:cacheprovider tests/gpu -W ignore::DeprecationWarning 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  python3 benchmarks/decode.py --device cuda --dtype bfloat16 --layers 24 --hidden 2048 --heads 16 \
    --vocab 512 --exits 6,12,18 --spec-exits 6,12 --lr 3e-4 --train-steps ${TRAIN_STEPS:-200} \
    --compile --repeats 3 --new-tokens 32 --prompts 8 --batch-sizes 1,8 2>&1 | grep -v -i warn | tee "$OUT/decode_gpu.log" | tail -30
fi
