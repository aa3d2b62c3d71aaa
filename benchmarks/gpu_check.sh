#!/usr/bin/env bash
# The GPU checks of one device session: the bf16 IRFT test, then the train-step benchmark against
# TRL at two model sizes. Expects trl/datasets/dill/multiprocess wheels in .whl/ and the dolly file
# in .gpudata/ (the GPU image lacks them; nothing can be downloaded there).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 DEMOALIGN_SHARED_DATA=$PWD/.gpudata
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
python3 benchmarks/train_step.py --device cuda --hidden-size 1024 --layers 8 --heads 16 --vocab-size 32000 \
  --pairs 64 --batch-size 8 --seq-len 512 --prompt-len 128 --steps 20 --warmup-steps 6 2>&1 | tee "$OUT/bench_mid.log"
python3 benchmarks/train_step.py --device cuda --hidden-size 2048 --layers 24 --heads 16 --vocab-size 50304 \
  --pairs 64 --batch-size 8 --seq-len 512 --prompt-len 128 --steps 10 --warmup-steps 6 2>&1 | tee "$OUT/bench_1p4b.log"
