"""Check `quantpipe plan`'s bench-memory arithmetic on a GPU at full model size, with random weights.

Builds a random-weight model of a shipped architecture (quantpipe/archs.py) in the given dtype, saves it as a
baseline artifact, runs `quantpipe bench` on it in its own process and prints predicted vs measured memory
(peak CUDA memory allocated) as JSON. Random weights have exactly the memory of the real ones.

    python scripts/plan_vs_measured.py --arch qwen2.5-7b --dtype bfloat16 --batch-sizes 1 8 --out /tmp/arch
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from quantpipe import archs, artifact, bench, plan
from quantpipe.methods import get_method


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="/tmp/quantpipe-arch")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    config = archs.config(a.arch)
    out = Path(a.out)
    if not (out / "quantpipe.json").is_file():
        torch.manual_seed(0)
        with torch.device(a.device if a.device == "cuda" else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a.dtype))
        model.save_pretrained(out, safe_serialization=True)
        del model
        artifact.write(out, artifact.ArtifactMeta(variant="random-" + a.arch, method="baseline",
                                                  format="safetensors", weights="random", arch=a.arch))
    cfg = {"device": a.device, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "batch_sizes": a.batch_sizes,
           "warmup": 1, "repeats": 1, "threads": None}
    prompt = torch.randint(100, config.vocab_size - 1, (a.prompt_len + max(a.batch_sizes),)).tolist()
    rows = []
    for b in a.batch_sizes:  # one process per batch size: each peak is that batch's own
        measured = bench.bench_in_subprocess(out, {**cfg, "batch_sizes": [b]}, prompt, out / ".bench")
        s = plan.shapes(config)
        storage = get_method("baseline").storage(None, a.dtype)
        pred = plan.bench_memory(s, storage, a.dtype, a.device, {**cfg, "batch_sizes": [b]})
        meas = measured.get("peak_gpu_mib") if a.device == "cuda" else \
            measured["peak_rss_mib"] - measured["base_rss_mib"]
        rows.append({"batch": b, "predicted_mib": {k: v / 2**20 for k, v in pred.items()}, "measured_mib": meas,
                     "diff_pct": 100 * (pred["total"] / 2**20 / meas - 1),
                     "weights_in_artifact_bytes": plan.tensor_bytes(out),
                     "weights_predicted_bytes": pred["weights"],
                     "decode_tok_s": measured["per_batch"][str(b)]["decode_tok_s"]})
    print(json.dumps({"arch": a.arch, "dtype": a.dtype, "device": a.device, "prompt_len": a.prompt_len,
                      "gen_len": a.gen_len, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
