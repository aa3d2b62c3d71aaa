#!/usr/bin/env bash
# On a machine whose Python already has its own torch (the GPU image: a CUDA build), install
# demoalign the way a user would and show that torch is left as it was. No package index is
# needed: the project is installed without its dependencies into a virtual environment that
# sees the system's packages, then `pip check` compares every requirement with what is
# installed. A torch pin the installed build does not meet would be reported there
# ("demoalign requires torch==X, but you have torch Y"); a range it meets is not.
# The wheel is built beforehand where a package index is reachable (`pip wheel --no-deps -w dist
# .`) and carried in dist/: building it on the machine would need setuptools' wheel support there.
set -o pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/demoalign-install-check}
torch_before=$($PY -c "import torch; print(torch.__version__)")
rm -rf "$VENV" && $PY -m venv --system-site-packages "$VENV"
WHEEL=${WHEEL:-$(ls dist/demoalign-*.whl 2>/dev/null | head -1)}
"$VENV/bin/python" -m pip install -q --no-index --no-deps "${WHEEL:-.}" || exit 2
torch_after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
echo "torch before: $torch_before  after: $torch_after"
unmet=$("$VENV/bin/python" -m pip check | grep -i "^demoalign ")
echo "${unmet:-pip check: every demoalign requirement is met}"
if echo "$unmet" | grep -qi "requires torch"; then
  echo "torch: the installed build does not meet demoalign's requirement"; exit 1
fi
[ "$torch_before" = "$torch_after" ] && echo "torch kept: $torch_after"
