#!/usr/bin/env bash
# One LLM stage (align / understand / generate / joint) on NNODES x NPROC processes; every argument goes to
# `dualtoken train-mllm` (training/train_mllm.py).
#
#   NPROC=8 scripts/train_mllm.sh --config configs/stages/qwen2_5_3b/understand.yaml \
#       --set deepspeed.zero_stage=3 --set deepspeed.offload_optimizer=true
#
# Multi-node: run the same line on every node with NNODES, NODE_RANK (0..NNODES-1) and
# MASTER_ADDR / MASTER_PORT of node 0; loop.output_dir must be on a shared filesystem.
set -euo pipefail
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-1}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m training.train_mllm "$@"
