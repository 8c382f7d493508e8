#!/usr/bin/env bash
# One experiment on one GPU, with the XLA flags that matter (launch/xla_flags.sh).
#   launch/run_single_gpu.sh configs/easyvqa_smollm2.py [--workdir=runs/x] [--config.model.dtype=bfloat16 ...]
# Needs a CUDA jax: pip install -U "jax[cuda12]". The same config runs unchanged on CPU (launch/run_local.sh).
set -euo pipefail
config=${1:?usage: launch/run_single_gpu.sh CONFIG [flags...]}
shift
cd "$(dirname "$0")/.."
source launch/xla_flags.sh
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec python -m fednano_jax.main --config="$config" "$@"
