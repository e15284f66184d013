#!/usr/bin/env bash
# FP8 and bitsandbytes on the lent GPU (docs/benchmarks.md): the CUDA tests of the FP8 kernel, then the Qwen2-7B
# random-weight formats recipe (bf16 vs FP8 dynamic / static on `_scaled_mm`, bitsandbytes NF4), each step's log
# and the run's results.json / matrix.md copied to runs/gpu-out/ (and $OUT).
# Needs, in .whl/, the wheels scripts/gpu_session.sh lists plus bitsandbytes 0.50.2 (43 MB).
# Usage: bash scripts/gpu_formats.sh [tests] [7b]   (default: both)
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
res=runs/gpu-out
mkdir -p "$res"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests 7b)
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%T)"
  t=$(date +%s)
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fp8 or int4" 2>&1 | tail -15 \
             | tee "$res/tests.log" ;;
    7b) python3 -m quantpipe run recipes/gpu-qwen2-7b-formats.yaml > "$res/7b.log" 2>&1
        for f in results.json matrix.md; do cp runs/gpu-qwen2-7b-formats/$f "$res/7b-$f" 2>/dev/null; done ;;
  esac
  echo "$step: wall $(( $(date +%s) - t )) s" | tee -a "$res/walls.txt"
  [ -n "${OUT:-}" ] && cp "$res"/* "$OUT"/ 2>/dev/null
done
echo "=== done $(date -u +%T)"
