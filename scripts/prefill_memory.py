"""The memory one prompt pass of quantpipe's decoder holds beyond its weights and KV cache, measured on the CPU
and set beside `memory.activation_bytes`, the model `quantpipe plan` predicts bench memory with
(docs/benchmarks.md, "Fourth session"):

  python3 scripts/prefill_memory.py --arch qwen2-7b --layers 2 --batch 1 --tokens 512

A random model of the shipped shape `--arch` with `--layers` decoder layers (the peak is one layer's work, so a
few layers measure what the whole model holds) runs one prompt pass through the decoder the compiled runtime
uses (eager, as prefill runs on a GPU too). The measure is the resident high-water mark after
`isolate.start_memory_pass` (every block of 128 KiB or more mapped on its own and returned when freed), minus the
resident memory before the pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantpipe import archs, isolate, memory  # noqa: E402
from quantpipe.runtimes import decoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    cfg = archs.config(a.arch)
    cfg.num_hidden_layers = a.layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:a.layers]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    for p in model.parameters():  # values do not matter for memory; finite ones keep the arithmetic ordinary
        p.data.normal_(0, 0.02)
    model.model.rotary_emb.__init__(cfg)  # its inv_freq buffer, lost to to_empty
    dec, _ = decoder.build(model, {}, dtype, "cpu")
    cache = dec.new_cache(a.batch, a.tokens + 128)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(a.tokens)
    with torch.inference_mode():
        dec(x, pos, cache, keep=1)  # warm: one-time allocations are not the pass's
        isolate.start_memory_pass()
        before = isolate.rss_mib()
        t = time.perf_counter()
        dec(x, pos, cache, keep=1)
        secs = time.perf_counter() - t
        held = isolate.peak_rss_mib() - before
    s = memory.shapes(cfg)
    a_bytes = torch.empty((), dtype=dtype).element_size()
    model_mib = memory.activation_bytes(s, a.batch * a.tokens, a.batch, a_bytes) / 2**20
    width = 4 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate
    res = {"arch": a.arch, "layers": a.layers, "batch": a.batch, "tokens": a.tokens, "dtype": a.dtype,
           "measured_mib": round(held, 1), "activation_bytes_mib": round(model_mib, 1),
           "ratio": round(held / model_mib, 2), "model_width_values_per_token": width,
           "measured_bytes_per_token": round(held * 2**20 / (a.batch * a.tokens)),
           "model_bytes_per_token": width * a_bytes, "pass_s": round(secs, 1)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
