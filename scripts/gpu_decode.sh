#!/usr/bin/env bash
# GPU decode at the bandwidth limit (docs/benchmarks.md): on the lent H200, with the wheels of docs/benchmarks.md
# carried in .whl/ (gptqmodel's wheel brings Marlin's CUDA sources; nvcc compiles them on first use).
# Steps (any order, each logs to $OUT or runs/gpu-out):
#   build      compile Marlin (about 100 s; QUANTPIPE_MARLIN_SO=path skips it with a library built earlier)
#   data       random-weight Qwen2-7B checkpoints: bf16; W4 g128 compressed-tensors with lm_head 4-bit too (w4h);
#              W8 per channel (w8; DATA_W8=0 leaves it out)
#   bench      quantpipe bench of bf16 and w4h at batch 1, 8, 32 and of w8 at 1 and 8 (prompt 512 + 128, median of 3)
#   benchbf16  the same for bf16 alone
#   benchw4    the same for w4h alone
#   opts       Marlin's split-K sums in float32 vs bfloat16, tinygemm and bf16 cuBLAS per 7B projection (CUDA
#              graphs); later steps use bfloat16 sums where they are faster at every row count
#   attn       decode attention variants (ATTN_KINDS, default "matmul flex") at batch 1 on bf16; later steps use the fastest
#   crossover  Marlin vs dequantize + cuBLAS per row count (7B layer shapes), each dequantizer timed; later steps
#              use the fastest dequantizer that agrees and dequantize from the measured crossover (from CUDA
#              graphs, as prompts run; eager with QUANTPIPE_PROMPT_GRAPH=0) (QUANTPIPE_MARLIN_DEQUANT,
#              QUANTPIPE_MARLIN_PREFILL_ROWS)
#   nocopy     w4h with QUANTPIPE_ONE_ROW_TINYGEMM=0 (Marlin for one row too, the comparison for the default's
#              tinygemm copies of the small projections): profile at batch 1 and bench at 1
#   tune       bf16 at batch 1 and 8 and w4h at batch 1 profiled with QUANTPIPE_TUNE=1 (Inductor's
#              coordinate-descent tuning of its own kernels' tilings; TUNE_SET="w4h:1" picks)
#   prof8      bf16 profiled at batch 8 (the untuned reference for tune's)
#   link       use the recipe's artifacts (baseline, gptq-w4g128, gptq-w4g128-head) as bf16, w4, w4h
#   prefill    the prompt pass at batch 1, eager and replayed from its CUDA graph: bf16's; W4's (W4 = $PREFILL_W4,
#              default w4h) on Marlin throughout, dequantized to bf16 above the crossover, and that with the next
#              layer dequantized on a second stream (QUANTPIPE_PREFILL_PREFETCH=1, above $PREFETCH_ROWS rows)
#   profile    torch.profiler of the batch-1 decode step: decoder vs transformers' modeling, bf16 and W4
#   marlin     python -m pytest tests/test_gpu.py -k "marlin or decoder"
#   tests      python -m pytest tests/test_gpu.py
#   recipe     quantpipe run recipes/gpu-qwen2-7b-random.yaml, then quantpipe gate on it
#   small      quantpipe run recipes/gpu-qwen2-0.5b-random.yaml
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && touch /tmp/site/.installed || exit 1
  fi
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
res=${OUT:-runs/gpu-out}
A=${QP_ART:-/tmp/qp-art}
mkdir -p "$res" "$A"
bench() {  # artifact name, batch sizes...
  local a=$1; shift
  python3 -m quantpipe bench "$A/$a" --device cuda --prompt-len 512 --gen-len 128 --batch-sizes "$@" --repeats 3 \
    --out "$res/bench-$a.json" 2>&1 | tail -3
  python3 - "$res/bench-$a.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(d.get("engine"), "|", d.get("kernel"), "| peak GPU MiB", round(d.get("peak_gpu_mib", 0)))
for b, r in d.get("per_batch", {}).items():
    print(f"  b{b}: {r['decode_tok_s']:.1f} tok/s, limit {r['limit_tok_s']:.1f}, {100 * r['frac_of_limit']:.1f} %, "
          f"TTFT {1e3 * r['ttft_s']:.1f} ms")
EOF
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
for step in "$@"; do
  echo "=== $step $(date -u +%T)"
  case $step in
    build) python3 -c "
import time; t = time.time()
from quantpipe.runtimes import marlin
print('marlin:', marlin.unusable() or 'ready', round(time.time() - t, 1), 's')" 2>&1 | tail -5 ;;
    data) python3 scripts/decode_probe.py random "$A/bf16" --arch qwen2-7b &&
          python3 scripts/decode_probe.py w4 --head "$A/bf16" "$A/w4h" &&
          { [ "${DATA_W8:-1}" = 0 ] || python3 scripts/decode_probe.py w4 --bits 8 "$A/bf16" "$A/w8"; }; ls "$A" ;;
    bench) bench bf16 1 8 32; bench w4h 1 8 32; bench w8 1 8 ;;
    benchbf16) bench bf16 1 8 32 ;;
    benchw4) bench w4h 1 8 32 ;;
    opts) python3 scripts/decode_probe.py marlin-opts --json "$res/marlin-opts.json" 2>&1 | tail -12
          if python3 -c "import json, sys; sys.exit(0 if json.load(open('$res/marlin-opts.json'))['bf16_reduce_faster'] else 1)"; then
            export QUANTPIPE_MARLIN_FP32_REDUCE=0; echo "  using bfloat16 split-K sums"
          fi ;;
    attn) best=; bestms=1e9
          for k in ${ATTN_KINDS:-matmul flex}; do  # sdpa-gqa and sdpa-expand: 4.95 and 4.96 ms (2026-12-01)
            QUANTPIPE_DECODE_ATTN=$k python3 scripts/decode_probe.py profile "$A/bf16" --batch 1 \
              --json "$res/attn-$k.json" > /dev/null 2>"$res/attn-$k.err"
            ms=$(python3 -c "import json; print(json.load(open('$res/attn-$k.json'))['step_ms'])" 2>/dev/null || echo 1e9)
            echo "  $k: step $ms ms"
            if python3 -c "import sys; sys.exit(0 if $ms < $bestms else 1)"; then best=$k; bestms=$ms; fi
          done
          export QUANTPIPE_DECODE_ATTN=$best; echo "  using $best" ;;
    crossover) python3 scripts/decode_probe.py crossover --json "$res/crossover.json" 2>&1 | tail -22
               key=dequant_wins_from_rows$([ "${QUANTPIPE_PROMPT_GRAPH:-1}" = 1 ] && echo _graph)
               from=$(python3 -c "import json; print(json.load(open('$res/crossover.json'))['$key'] or 0)")
               export QUANTPIPE_MARLIN_PREFILL_ROWS=$([ "$from" -gt 0 ] && echo $((from - 1)) || echo 1000000)
               export QUANTPIPE_MARLIN_DEQUANT=$(python3 -c "import json; print(json.load(open('$res/crossover.json'))['dequant_faster'])")
               echo "  dequantization: $QUANTPIPE_MARLIN_DEQUANT"
               echo "  prefill dequantizes above $QUANTPIPE_MARLIN_PREFILL_ROWS rows" ;;
    link) mkdir -p "$A" && ln -sfn "$PWD/runs/gpu-qwen2-7b-random/artifacts/baseline" "$A/bf16" &&
          ln -sfn "$PWD/runs/gpu-qwen2-7b-random/artifacts/gptq-w4g128" "$A/w4" &&
          ln -sfn "$PWD/runs/gpu-qwen2-7b-random/artifacts/gptq-w4g128-head" "$A/w4h"; ls -l "$A" ;;
    prefill) rows=${QUANTPIPE_MARLIN_PREFILL_ROWS:-$(python3 -c "from quantpipe.runtimes import marlin; print(marlin.PREFILL_ROWS)")}
             python3 scripts/decode_probe.py profile "$A/bf16" --prefill --json "$res/prefill-bf16.json" 2>/dev/null | head -10
             for r in 1000000 "$rows"; do
               QUANTPIPE_MARLIN_PREFILL_ROWS=$r python3 scripts/decode_probe.py profile "$A/${PREFILL_W4:-w4h}" --prefill \
                 --json "$res/prefill-w4-rows$r.json" 2>/dev/null | head -12
             done
             QUANTPIPE_MARLIN_PREFILL_ROWS=${PREFETCH_ROWS:-$rows} QUANTPIPE_PREFILL_PREFETCH=1 python3 scripts/decode_probe.py \
               profile "$A/${PREFILL_W4:-w4h}" --prefill --json "$res/prefill-w4-prefetch.json" 2>/dev/null | head -12 ;;
    nocopy) QUANTPIPE_ONE_ROW_TINYGEMM=0 python3 scripts/decode_probe.py profile "$A/w4h" --batch 1 \
              --json "$res/prof-w4h-b1-nocopy.json" | head -12
            ln -sfn "$A/w4h" "$A/w4h-nocopy" && QUANTPIPE_ONE_ROW_TINYGEMM=0 bench w4h-nocopy 1 ;;
    tune) for ab in ${TUNE_SET:-bf16:1 bf16:8 w4h:1}; do
            a=${ab%:*} b=${ab#*:}
            QUANTPIPE_TUNE=1 python3 scripts/decode_probe.py profile "$A/$a" --batch "$b" \
              --json "$res/prof-$a-b$b-tune.json" | head -12
          done ;;
    prof8) python3 scripts/decode_probe.py profile "$A/bf16" --batch 8 --json "$res/prof-bf16-b8.json" | head -12 ;;
    marlin) python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py -k "marlin or decoder" 2>&1 |
              grep -v "Warning\|warn" | tail -60 ;;
    profile) for a in bf16 w4 w4h w8; do
               [ -e "$A/$a" ] || continue
               python3 scripts/decode_probe.py profile "$A/$a" --batch 1 --json "$res/prof-$a-b1.json" | head -30
               [ "${PROFILE_HF:-0}" = 1 ] || continue  # transformers' modeling + tinygemm: the "before" profile
               QUANTPIPE_MARLIN=0 python3 scripts/decode_probe.py profile "$A/$a" --batch 1 --hf --json "$res/prof-$a-b1-hf.json" | head -30
             done ;;
    tests) python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py 2>&1 | grep -v "Warning\|warn" | tail -60 ;;
    recipe) python3 -m quantpipe run recipes/gpu-qwen2-7b-random.yaml 2>&1 | tail -30
            python3 -m quantpipe gate runs/gpu-qwen2-7b-random 2>&1 | tail -30
            cp runs/gpu-qwen2-7b-random/results.json "$res/7b-results.json" ;;
    small) python3 -m quantpipe run recipes/gpu-qwen2-0.5b-random.yaml 2>&1 | tail -20
           cp runs/gpu-qwen2-0.5b-random/results.json "$res/small-results.json" ;;
  esac
done
echo "=== done $(date -u +%T)"
