#!/usr/bin/env bash
# GPU acceptance check: run on one GPU machine before booking a cluster (issue 13).
#   bash scripts/gpu_check.sh            # writes gpu_check.json (+ gpu_check_outputs/) in the current folder
# 1. bench/gpu_check.py: the miniature in bf16 on CUDA: re-scoring error, our sampler's rows/s
#    against a bare diffusers denoising loop, CUDA peak memory against `--plan`, and a 3-iteration
#    Ray run of the real CLI with every pool on the one GPU (num_gpus 0.25 each)
# 2. the GPU test tier: pytest -m gpu (bf16 on CUDA for each family; FSDP when >= 2 GPUs)
# Not yet run on a GPU by this project (no GPU on its machines); BENCHMARKS.md says so until it is.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$REPO" python "$REPO/bench/gpu_check.py" --device cuda --out gpu_check.json "$@"
(cd "$REPO" && python -m pytest -q -m gpu tests/test_gpu.py)
