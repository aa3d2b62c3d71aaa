#!/usr/bin/env bash
# The GPU checks of one device session (about 7 minutes on an H100/H200): tests/test_gpu.py (the
# bf16 IRFT run and the fast engine's compile-once test), then one IRFT stage per engine at the
# pythia-1.4b shape. Needs only torch, transformers and accelerate (no trl/datasets), and in
# .gpudata/ the GPT-NeoX tokenizer file and the Dolly sample (copy them there before the run).
# tests/test_gpu.py includes IRFT under accelerate's FSDP2 on one GPU. Last, the install check:
# demoalign's wheel (built here with `pip wheel --no-deps -w dist .`, carried as dist/) installed
# beside the image's own torch, which must stay (scripts/gpu_install_check.sh).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 DEMOALIGN_DATA=$PWD/.gpudata
export DEMOALIGN_TOKENIZER=${DEMOALIGN_TOKENIZER:-$PWD/.gpudata/20B_tokenizer.json}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log"
timeout 220 python3 benchmarks/stage.py --device cuda 2>&1 | tee "$OUT/stage.log"
bash scripts/gpu_install_check.sh 2>&1 | tee "$OUT/install.log"
