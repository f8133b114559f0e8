#!/usr/bin/env bash
# The v2 recipe's training on a lent GPU (the workplace's device tool), in one call of at most
# 10 minutes: every run side by side on the one GPU for BUDGET seconds each, then the model-space
# CV of the folds, then the bundles, logs and CV archived under $OUT to come back.
#
# Here, before (the device reaches no registry and has no liverseg dependencies but torch):
#   python pipelines/train_default_v2.py prepare            # caches + teacher targets, on the CPU
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl monai nibabel isal pydantic pydantic_core annotated-types typing-inspection pydicom \
#     typing_extensions                                      # the versions this venv has (pip list)
# The call (timeout_s 600; about 11 MB of wheels and 13 MB of caches travel with the tree):
#   run(command="bash pipelines/gpu_v2.sh", carry=[".whl", "runs/v2/cache4", "runs/v2/splits"])
# Here, after: for a in <files_at>/*.tar; do tar -xf "$a" -C runs/v2/runs; done, then
#   python pipelines/train_default_v2.py evaluate --approach distill (and package, card) on the CPU.
#
# Environment: BUDGET (training seconds per run, default 330), RUNS (default: the distill folds
# and the final run), EXTRA (more `--set` options), DEVICE (default cuda), PYTHON (default python3).
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-distill_chaos01 distill_chaos03 distill_ircadb01 distill_ircadb07 distill_final}
if ! "$PYTHON" -c "import monai, nibabel, pydantic" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
# shellcheck disable=SC2086  # RUNS and EXTRA are word lists
"$PYTHON" pipelines/train_default_v2.py train --device "${DEVICE:-cuda}" --budget "${BUDGET:-330}" \
  --runs $RUNS --set train.iterations=30000 --set train.num_workers=2 ${EXTRA:-} 2>&1 | tee "$OUT/train.log"
trained=$?
# Whatever trained comes back, even after a failure (each run writes its bundle when it stops).
"$PYTHON" pipelines/train_default_v2.py quick-cv --device "${DEVICE:-cuda}" --approaches distill \
  2>&1 | tee "$OUT/quick_cv.log"
"$PYTHON" pipelines/train_default_v2.py collect --approach distill --out "$OUT" 2>&1 | tee "$OUT/collect.log"
exit "$trained"
