#!/usr/bin/env bash
# The project's GPU script, in two parts so that each fits one device call (10 minutes):
#   bash benchmarks/gpu_stage.sh checks   (about 7 min) tests/test_gpu.py (the bf16 IRFT run, the
#        fast engine's compile-once test, IRFT under FSDP2 and padding-free batches on one GPU,
#        liger vs plain where liger-kernel is carried), one IRFT stage per engine at the
#        pythia-1.4b shape with the training levers as a run resolves them (benchmarks/stage.py),
#        and the install check: demoalign's wheel (built beforehand with `pip wheel --no-deps -w
#        dist .`, carried as dist/) beside the image's own torch (scripts/gpu_install_check.sh).
#   bash benchmarks/gpu_stage.sh speed    (about 6 min) benchmarks/train_step.py at the
#        pythia-1.4b shape: demoalign plain, each lever, all levers, compiled, and TRL's
#        DPOTrainer plain and with its own padding_free/liger options; last line `ratio mfu=...
#        vs_trl=... memory_vs_trl=...`.
#   bash benchmarks/gpu_stage.sh          both, one after the other (over one call's limit).
# Carry .gpudata/ (scripts/gpu_bundle.sh): the GPT-NeoX tokenizer file, the data samples, and the
# pure-Python wheels the image lacks (trl, datasets, dill, multiprocess, liger-kernel), installed
# into a folder on PYTHONPATH so that the image's torch stays as it is.
# With liger-kernel carried, kernels=auto applies liger in every GPU test run, as it does for a
# user who installed demoalign[kernels]. The exit status is the first failing step's.
set -o pipefail
PART=${1:-all}
case "$PART" in checks|speed|all) ;; *) echo "usage: $0 [checks|speed|all]" >&2; exit 2;; esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/demoalign-bench-site
if [ ! -d "$SITE" ] && ls .gpudata/whl/bench/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpudata/whl/bench/*.whl \
    || rm -rf "$SITE"  # a warm machine's next call tries again
fi
status=0
step() {  # one step ($0 in it is $OUT); the first failure's status is kept, and the rest run
  bash -o pipefail -c "$1" "$OUT"; local rc=$?
  if [ "$status" = 0 ]; then status=$rc; fi
}
export PYTHONPATH=$PWD/src:$PWD/tests:$SITE PYTHONUNBUFFERED=1 DEMOALIGN_DATA=$PWD/.gpudata
export DEMOALIGN_TOKENIZER=${DEMOALIGN_TOKENIZER:-$PWD/.gpudata/20B_tokenizer.json}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
python3 -c "import trl, datasets, liger_kernel; print('trl', trl.__version__, 'datasets', \
datasets.__version__, 'liger-kernel carried')" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
if [ "$PART" = checks ] || [ "$PART" = all ]; then
  step 'timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$0/pytest_gpu.log"'
  step 'timeout 220 python3 benchmarks/stage.py --device cuda 2>&1 | tee "$0/stage.log"'
  step 'bash scripts/gpu_install_check.sh 2>&1 | tee "$0/install.log"'
fi
if [ "$PART" = speed ] || [ "$PART" = all ]; then
  # pythia-1.4b's width and depth, HH-like mixed lengths up to 512 tokens, 8 pairs a step.
  step 'timeout 420 python3 benchmarks/train_step.py --device cuda --hidden-size 2048 \
    --layers 24 --heads 16 --vocab-size 50304 --pairs 64 --batch-size 8 --seq-len 512 \
    --prompt-len 128 --steps 10 2>&1 | tee "$0/train_step.log"'
fi
exit "$status"
