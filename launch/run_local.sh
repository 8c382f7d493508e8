#!/usr/bin/env bash
# Run one experiment on this machine (CPU or a single GPU).
#   launch/run_local.sh configs/easyvqa_tiny.py [--workdir=runs/x] [--config.fed.rounds=3 ...]
# XLA_FLAGS is passed through; e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8 CPU devices.
set -euo pipefail
config=${1:?usage: launch/run_local.sh CONFIG [flags...]}
shift
cd "$(dirname "$0")/.."
exec python -m fednano_jax.main --config="$config" "$@"
