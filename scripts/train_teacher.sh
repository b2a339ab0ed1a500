#!/usr/bin/env bash
# Stage 0 (the small SigLIP teacher) on NNODES x NPROC processes; every argument goes to
# `dualtoken train-teacher` (training/train_teacher.py).
#
#   NPROC=2 scripts/train_teacher.sh --config configs/tokenizer/tiny_teacher.yaml \
#       --set deepspeed.enabled=true --set deepspeed.zero_stage=2
#
# Multi-node: run the same line on every node with NNODES, NODE_RANK (0..NNODES-1) and
# MASTER_ADDR / MASTER_PORT of node 0; loop.output_dir must be on a shared filesystem.
set -euo pipefail
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-1}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m training.train_teacher "$@"
