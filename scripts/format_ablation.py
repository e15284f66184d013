"""Why GPTQ's two writers differ: re-quantize the baseline of a finished run with one detail switched, and score
it on that run's eval windows against its reference (docs/benchmarks.md, "Both formats of one method").

    python scripts/format_ablation.py RUN_DIR VARIANT   # VARIANT: gptqmodel-no-gar | llmc-no-actorder |
                                                        #          rtn-g64 | rtn-channel

RUN_DIR is a finished run of recipes/smollm2-formats.yaml (its calibration ids and reference log-probs are reused).
Not part of the pipeline: these configurations are not offered as recipe params.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoTokenizer

from quantpipe import data, evaluate, results
from quantpipe.methods import QuantizeJob, _gptqmodel, _llmcompressor
from quantpipe.recipe import ModelSpec
from quantpipe.runtimes.hf import HFRuntime


def main(run_dir: Path, which: str) -> dict:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    res = results.load(run_dir, "format_ablation")
    base = run_dir / "artifacts" / res.reference
    ids = load_file(str(run_dir / ".quantpipe" / "calibration" / "ids.safetensors"))["input_ids"].clone()
    tok = AutoTokenizer.from_pretrained(base)
    text = data.eval_text().read_text()
    ev = res.eval
    windows = evaluate.make_windows(tok(text, add_special_tokens=False).input_ids, ev["window"], ev["max_tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        job = QuantizeJob(variant=which, params=None, out_dir=Path(tmp), base_dir=base,
                          model=ModelSpec(path=str(base), dtype="float32"), calibration=ids)
        if which == "gptqmodel-no-gar":
            _gptqmodel.quantize(job, "gptq", bits=4, group_size=64, desc_act=False, sym=True, damp_percent=0.01,
                                act_group_aware=False)
        elif which == "llmc-no-actorder":
            w = _llmcompressor.weight_args(4, 64, True)
            _llmcompressor.oneshot(job, [GPTQModifier(config_groups=_llmcompressor.config_groups(w),
                                                      ignore=["lm_head"], dampening_frac=0.01, actorder=None)])
        elif which in ("rtn-g64", "rtn-channel"):
            w = _llmcompressor.weight_args(4, 64 if which == "rtn-g64" else -1, True)
            _llmcompressor.oneshot(job, [QuantizationModifier(config_groups=_llmcompressor.config_groups(w),
                                                              ignore=["lm_head"])])
        else:
            raise SystemExit(f"unknown variant {which}")
        rt = HFRuntime(Path(tmp), "cpu")
        return evaluate.score(rt, windows, run_dir / ".quantpipe" / "reference", write_reference=False)


if __name__ == "__main__":
    q = main(Path(sys.argv[1]), sys.argv[2])
    print(sys.argv[2], json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}))
