#!/usr/bin/env bash
# XLA / runtime settings that matter on NVIDIA GPUs. Source it before a run:
#   source launch/xla_flags.sh && python -m fednano_jax.main --config=...
# (run_single_gpu.sh and slurm_multinode.sbatch source it.) Every flag below exists in the pinned jaxlib;
# an unknown XLA flag aborts start-up, so check after upgrading jax.
gpu_flags=(
  # Overlap communication (FSDP all-gathers of the frozen backbone, the clients' reduce for aggregation)
  # with compute: the scheduler that makes FSDP cost little more than replication.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Prefetch the next layer's all-gathered weights inside loops (scan over local steps) while this one computes.
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_enable_pipelined_all_gather=true
  # Fewer, larger collectives: the frozen backbone is gathered in big chunks, not per tensor.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  # cuBLAS for bf16 GEMMs (Triton GEMM fusions are often slower for LLM shapes; MaxText does the same).
  --xla_gpu_enable_triton_gemm=false
  # Collectives on a high-priority stream, so they are not starved by compute kernels.
  --xla_gpu_enable_highest_priority_async_stream=true
)
export XLA_FLAGS="${XLA_FLAGS:-} ${gpu_flags[*]}"
# Let JAX take 95% of GPU memory up front (the 7B plan needs most of an 80 GB H100); no TF-style growth.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# Multi-node: NCCL over InfiniBand when present; print NCCL's choice once if a run hangs at start-up.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
