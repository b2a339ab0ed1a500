#!/usr/bin/env bash
# Side by side on one machine: one process with 2 threads vs 2 data-parallel ranks with 1 thread
# each (DeepSpeed ZeRO-2, gloo), same global batch 16, 60 understand steps of the tiny model.
# Needs a finished tiny run (runs/tiny/mllm/align/model). Prints train_seconds of each.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dualtoken/torch_extensions} DS_ACCELERATOR=cpu
COMMON="--config configs/stages/tiny/understand.yaml --set stage.init=runs/tiny/mllm/align/model --set loop.max_steps=60 --set loop.log_every=20 --set loop.save_every=1000 --set eval.vqa_samples=0"
for round in 1 2; do
  rm -rf runs/bench_dp/single runs/bench_dp/ranks; mkdir -p runs/bench_dp
  .venv/bin/python -m training.cli train-mllm $COMMON --set loop.output_dir=runs/bench_dp/single --set loop.batch_size=16 > runs/bench_dp/single.log 2>&1
  echo "round $round single 2 threads: $(python3 -c "import json;print(json.load(open('runs/bench_dp/single/metrics.json'))['train_seconds'])")"
  OMP_NUM_THREADS=1 NPROC=2 PYTHON=.venv/bin/python scripts/train_mllm.sh $COMMON --set loop.output_dir=runs/bench_dp/ranks --set loop.batch_size=8 --set loop.num_threads=1 --set deepspeed.enabled=true > runs/bench_dp/ranks.log 2>&1
  echo "round $round 2 ranks x 1 thread: $(python3 -c "import json;print(json.load(open('runs/bench_dp/ranks/metrics.json'))['train_seconds'])")"
done
