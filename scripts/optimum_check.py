"""Load ONNX artifacts with optimum's ORTModelForCausalLM and print its greedy continuation of a prompt.

optimum-onnx 0.1.0 needs transformers < 4.58, so this runs in an environment of its own (not quantpipe's):

    python3 -m venv /tmp/optvenv
    /tmp/optvenv/bin/pip install torch==2.13.0 optimum-onnx==0.1.0 onnxruntime==1.32.0
    /tmp/optvenv/bin/python scripts/optimum_check.py runs/smollm2-demo/artifacts/onnx-fp32 ...

Compare with quantpipe's ONNX Runtime runtime on the same prompt (in quantpipe's environment):

    .venv/bin/python scripts/optimum_check.py --quantpipe runs/smollm2-demo/artifacts/onnx-fp32 ...
"""

from __future__ import annotations

import sys

PROMPT = "The capital of France is"


def main(argv: list[str]) -> None:
    ours = argv[:1] == ["--quantpipe"]
    from transformers import PreTrainedTokenizerFast

    for path in argv[1:] if ours else argv:
        # tokenizer.json directly: transformers 4's AutoTokenizer does not know transformers 5's tokenizer class
        ids = PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json")(PROMPT, return_tensors="pt").input_ids
        if ours:
            from quantpipe import runtimes

            rt = runtimes.load(path, "cpu")
            print("quantpipe", path, rt.generate(ids, 12)[0].tolist())
            rt.close()
        else:
            import torch
            from optimum.onnxruntime import ORTModelForCausalLM

            model = ORTModelForCausalLM.from_pretrained(path, use_cache=True)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False)
            print("optimum", path, out[0, ids.shape[1]:].tolist())


if __name__ == "__main__":
    main(sys.argv[1:])
