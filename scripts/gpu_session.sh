#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md, on the lent H100 machine (torch with CUDA, transformers 5.17).
# Installs the wheels carried in .whl/ (pydantic, llm-compressor, compressed-tensors, datasets, torchao, ...:
# docs/benchmarks.md lists them), then runs, each step's log and results copied to runs/gpu-out/ (and $OUT):
#   tests   python -m pytest tests/test_gpu.py             (the CUDA-only branches)
#   small   quantpipe run recipes/gpu-qwen2-0.5b-random.yaml
#   7b      quantpipe run recipes/gpu-qwen2-7b-random.yaml, then quantpipe gate on it
# Usage: bash scripts/gpu_session.sh [tests] [small] [7b]   (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
res=runs/gpu-out
mkdir -p "$res"
keep() {  # copy a run's outputs next to the logs (and to $OUT where the device tool collects files)
  for f in results.json matrix.md; do [ -f "runs/$1/$f" ] && cp "runs/$1/$f" "$res/$1-$f"; done
  [ -n "${OUT:-}" ] && cp "$res"/* "$OUT"/ 2>/dev/null
  return 0
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests small 7b)
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%T)"
  case $step in
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$res/tests.log" ;;
    small) python3 -m quantpipe run recipes/gpu-qwen2-0.5b-random.yaml 2>&1 | tee "$res/small.log"
           keep gpu-qwen2-0.5b-random ;;
    7b) python3 -m quantpipe run recipes/gpu-qwen2-7b-random.yaml 2>&1 | tee "$res/7b.log"
        python3 -m quantpipe gate runs/gpu-qwen2-7b-random 2>&1 | tee -a "$res/7b.log"
        keep gpu-qwen2-7b-random ;;
  esac
done
echo "=== done $(date -u +%T)"
