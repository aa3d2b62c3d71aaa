#!/usr/bin/env bash
# Builds what the GPU scripts carry to a machine that reaches no package index and no model hub
# (benchmarks/gpu_stage.sh, benchmarks/gpu_check.sh, experiments/gpu_real_text.sh):
#   .gpudata/   the data sets they read (Dolly/HH/UltraFeedback samples, the leaderboard tasks but
#               GSM8K), the GPT-NeoX tokenizer file, and wheels the GPU image lacks, for its Python
#               3.12: gguf (whl/), lm-evaluation-harness with the pure-Python packages it needs
#               beyond the image's own (whl/lmeval/), TRL, liger-kernel and datasets (whl/bench/)
#   .gpuparts/  the SmolLM2-135M-Instruct GGUF (98 MB, sha256 checked) in three parts of < 40 MB,
#               since one call carries at most 64 MiB: part_00 and part_01 go to /tmp/m in two
#               calls, part_02 travels with the run (see experiments/gpu_real_text.sh)
# Both folders are for the device tool's `carry`, never for git (.gitignore lists them).
# Usage: bash scripts/gpu_bundle.sh [SHARED_DATA]   (default ../shared/data); needs `make setup`.
set -euo pipefail
SHARED=${1:-../shared/data}
PY=${PY:-.venv/bin/python}
mkdir -p .gpudata/whl/lmeval .gpuparts
for d in dolly_hhrlhf hh_rlhf ultrafeedback_sample arc truthfulqa winogrande hellaswag mmlu; do
  rm -rf ".gpudata/$d" && cp -r "$SHARED/$d" .gpudata/
done
cp "$SHARED/tokenizers/gpt-neox-20b/20B_tokenizer.json" .gpudata/

# Wheels: --no-deps, one version each (the image has numpy, pandas, pyarrow, scikit-learn,
# sacrebleu, jinja2, xxhash, fsspec, huggingface-hub, absl-py, ...). Some of lm-eval's needs are
# published as source only: `pip wheel` builds those here (all pure Python).
"$PY" -m pip wheel -q --no-deps -w .gpudata/whl gguf==0.19.0
# benchmarks/gpu_stage.sh's TRL comparison and fused kernels (whl/bench/): TRL and liger-kernel
# (pure Python; liger's Triton comes with the image's torch), and datasets with its own needs.
mkdir -p .gpudata/whl/bench
for spec in trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1; do
  "$PY" -m pip wheel -q --no-deps -w .gpudata/whl/bench "$spec"
done
LMEVAL="lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 more-itertools==11.2.1
  nltk==3.10.4 pathvalidate==3.3.1 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 rouge_score==0.1.2
  sqlitedict==2.1.0 word2number==1.1"
for spec in $LMEVAL; do
  "$PY" -m pip wheel -q --no-deps -w .gpudata/whl/lmeval "$spec"
done
rm -f .gpudata/whl/lmeval/multiprocess-*.whl  # per Python version: the image's 3.12 one
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform any -d .gpudata/whl/lmeval multiprocess==0.70.19
cp .gpudata/whl/lmeval/multiprocess-*.whl .gpudata/whl/bench/

# The model, split for the 64 MiB limit of a call.
GGUF=$("$PY" -c "
import sys; sys.path.insert(0, 'scripts')
from pathlib import Path
from smollm2 import fetch_gguf
print(fetch_gguf(Path('models/download')))")
rm -f .gpuparts/part_*
split -b 39000000 -d -a 2 "$GGUF" .gpuparts/part_
sha256sum "$GGUF"
du -sh .gpudata .gpuparts/*
