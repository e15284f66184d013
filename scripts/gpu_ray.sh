#!/usr/bin/env bash
# The Ray executor on the lent two-GPU machine (docs/benchmarks.md): the Qwen2-0.5B random recipe with the local
# executor on one GPU, then with `--executor ray` on both GPUs (a Ray instance started on the machine), each
# run's log, results.json and matrix.md copied to runs/gpu-out/ (and $OUT).
# Needs, in .whl/: ray 2.60.0 for Python 3.12 (its wheel, or its parts ray.part.* when it travelled in pieces)
# and the wheels scripts/gpu_session.sh lists, plus jsonschema, jsonschema-specifications, referencing, rpds-py.
# Usage: bash scripts/gpu_ray.sh [one] [ray]   (default: both)
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G "/tmp/ray.part.*" >/dev/null || compgen -G ".whl/ray.part.*" >/dev/null; then
  cat $(ls /tmp/ray.part.* .whl/ray.part.* 2>/dev/null | sort -t. -k3) > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0 PATH="/tmp/site/bin:$PATH"
res=runs/gpu-out
mkdir -p "$res"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(one ray)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%T)"
  t=$(date +%s)
  case $step in
    one) CUDA_VISIBLE_DEVICES=0 python3 -m quantpipe run recipes/gpu-qwen2-0.5b-random.yaml --out runs/one-gpu \
           > "$res/one.log" 2>&1; rc=$?; d=runs/one-gpu ;;
    ray) python3 -m quantpipe run recipes/gpu-qwen2-0.5b-random.yaml --executor ray --out runs/ray-gpus \
           > "$res/ray.log" 2>&1; rc=$?; d=runs/ray-gpus ;;
  esac
  echo "$step: exit $rc wall $(( $(date +%s) - t )) s" | tee -a "$res/walls.txt"
  for f in results.json matrix.md; do [ -f "$d/$f" ] && cp "$d/$f" "$res/$step-$f"; done
  [ -n "${OUT:-}" ] && cp "$res"/* "$OUT"/ 2>/dev/null
done
echo "=== done $(date -u +%T)"
