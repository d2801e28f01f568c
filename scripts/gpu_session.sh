#!/usr/bin/env bash
# The whole GPU session in one call (the device budget is 15 minutes, start-up included):
# the Pallas/cuDNN kernel checks and timings first (most likely to need a fix and a rerun),
# then correctness against torch cuDNN, the benchmark table and the unroll sweep, and last a
# kernel-by-kernel profile of the training step (scripts/gpu_profile.py -> profile.md).
#   OUT=/tmp/out bash scripts/gpu_session.sh        # about 9 minutes on an H100
set -o pipefail
OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  timeout --kill-after=10 "${KERNELS_TIMEOUT:-140}" python scripts/gpu_kernels.py --budget "${KERNELS_BUDGET:-90}" 2>&1 \
    | tee "$OUT/kernels_log.txt"
fi
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  REPEATS="${REPEATS:-3}" CHECK_TIMEOUT="${CHECK_TIMEOUT:-50}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-220}" \
  SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-60}" \
  BENCH_SHAPES="${BENCH_SHAPES:-64,100,256,256 8,1000,128,256 256,100,1024,1024 32,200,512,512 1,500,64,64 16,500,128,128 32,100,128,256,L2,bi}" \
  SWEEP_SHAPES="${SWEEP_SHAPES:-64,100,256,256 8,1000,128,256 1,500,64,64 256,100,1024,1024}" \
    BENCH_IMPLS="${BENCH_IMPLS:-lstm_jax,lstm_jax-bf16,lstm_jax-scan,lstm_jax*-inplace,lstm_jax-pallas*,lstm_jax-cudnn,flax,jax.experimental.rnn,torch*}" \
    SWEEP_IMPLS="${SWEEP_IMPLS:-lstm_jax-scan,torch}" bash scripts/gpu_check.sh
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then  # last: what the bf16 backward spends its time on
  timeout --kill-after=10 "${PROFILE_TIMEOUT:-75}" python scripts/gpu_profile.py 2>&1 \
    | tee "$OUT/profile_log.txt"
fi
