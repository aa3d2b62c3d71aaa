#!/usr/bin/env bash
# The GPU run of experiments/real_text.py in one device call: the SmolLM2-135M-Instruct GGUF
# arrives in three parts (a call carries at most 64 MiB; the first two calls copied part_00 and
# part_01 to /tmp/m), is joined and checked by its sha256, converted with `demoalign convert`
# (the gguf wheel from .gpudata/whl), then the experiment runs within a time budget. Everything it
# carries is built by scripts/gpu_bundle.sh. RT_ARGS passes options to the experiment, e.g.
# RT_ARGS="--generation-backend auto --leaderboard arc_easy,arc_challenge --leaderboard-limit 100".
# A later slice continues an earlier one: commit its results.json (docs/results/), then pass
# RT_ARGS="... --continue-from docs/results/real-text-<gpu>.json" with the same other options.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/m
cp .gpuparts/part_02 /tmp/m/
cat /tmp/m/part_00 /tmp/m/part_01 /tmp/m/part_02 > /tmp/m/smollm2.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/m/smollm2.gguf" \
  | sha256sum -c - || exit 1
# gguf, and lm-eval with its needs where scripts/gpu_bundle.sh put them (for --leaderboard).
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site .gpudata/whl/*.whl \
  $(ls .gpudata/whl/lmeval/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD/src DEMOALIGN_DATA=$PWD/.gpudata PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m demoalign convert /tmp/m/smollm2.gguf /tmp/m/hf 2>&1 | tail -2 || exit 1
timeout "${RT_TIMEOUT:-430}" python3 experiments/real_text.py --model /tmp/m/hf --out "$OUT" \
  --budget-s "${RT_BUDGET:-360}" ${RT_ARGS:-} 2>&1 | tail -60
