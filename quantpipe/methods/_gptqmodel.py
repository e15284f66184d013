"""Shared by the methods that GPTQModel runs in the classic formats (`format: gptq` and `format: awq`): the
checkpoints AutoGPTQ / AutoAWQ users, TGI and vLLM load (`quant_method: gptq` / `awq`). transformers reloads
them with `gptqmodel` (and `optimum`) installed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from quantpipe.deps import Requirements
from quantpipe.methods import QuantizeJob, copy_tokenizer
from quantpipe.sources import DTYPE

REQUIREMENTS = Requirements(("gptqmodel", "optimum"), "gptqmodel", ("gptqmodel", "optimum", "transformers"))


# Measured on the SmolLM2 demo artifact (docs/benchmarks.md): the bench's RSS over its base was 545 MiB after the
# first forward, 264 MiB after malloc_trim(0), against 211 MiB predicted.
CPU_NOTE = ("GPTQModel's CPU kernel repacks the weights on the first forward; its transient buffers, freed but "
            "kept by the C allocator, are in the measured peak and not in the prediction")

# GPTQModel (offload_to_disk, its default) loads the float model lazily and moves finished layers to disk, so
# the whole float model is never resident: measured 505-647 MiB against 743 MiB predicted for the demo's
# gptq-format row, depending on when the kernel drops file pages.
OFFLOAD_NOTE = ("GPTQModel loads the float model layer by layer and offloads finished layers to disk, so the "
                "quantize prediction (whole float model resident) is an upper bound")


def gptq_bytes(bits: int, group_size: int) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in the gptq format: `qweight` int32 [inp·bits/32, out], `qzeros` int32
    [groups, out·bits/32] (stored even when symmetric), `scales` float16 [groups, out], `g_idx` int32 [inp]."""

    def size(out: int, inp: int) -> int:
        groups = inp // group_size if group_size > 0 else 1
        return -(-inp * bits // 32) * out * 4 + groups * -(-out * bits // 32) * 4 + groups * out * 2 + inp * 4

    return size


def awq_bytes(bits: int, group_size: int) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in the AWQ GEMM format: `qweight` int32 [inp, out·bits/32], `qzeros` int32
    [groups, out·bits/32], `scales` float16 [groups, out]."""

    def size(out: int, inp: int) -> int:
        groups = inp // group_size
        return inp * -(-out * bits // 32) * 4 + groups * -(-out * bits // 32) * 4 + groups * out * 2

    return size


def quantize(job: QuantizeJob, kind: str, **config: Any) -> dict[str, Any]:
    """Quantize the base dir with GPTQModel (`kind` is 'gptq' or 'awq') on the job's calibration ids."""
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # else it compiles a CPU packing extension (~6 min)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig, GPTQConfig

    ids = job.calibration
    assert ids is not None, "GPTQModel methods calibrate"
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # GPTQ keeps the recipe dtype (embeddings, norms, lm_head included). The classic AWQ GEMM layout is float16
    # (AutoAWQ's scales; GPTQModel's AWQ kernels run in 16-bit only), so an AWQ-format checkpoint is float16.
    dtype = DTYPE[job.model.dtype] if kind == "gptq" else torch.float16
    base, out, cwd = job.base_dir.resolve(), job.out_dir.resolve(), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="quantpipe-gptqmodel-") as scratch:
        os.chdir(scratch)  # GPTQModel writes logs/ into the working directory; keep them out of the user's
        try:
            cls = GPTQConfig if kind == "gptq" else AWQConfig
            qcfg = cls(**config, offload_to_disk_path=os.path.join(scratch, "offload"))
            model = GPTQModel.load(str(base), qcfg, device=device, dtype=dtype)
            backend = {} if kind == "gptq" or device == "cuda" else {"backend": BACKEND.AWQ_TORCH}
            # calibration_sort=None keeps the rows in the order every other method sees them
            model.quantize(calib, batch_size=1, calibration_sort=None, **backend)
            model.save(str(out))
        finally:
            os.chdir(cwd)
    copy_tokenizer(base, out)
    version = gptqmodel.__version__ if hasattr(gptqmodel, "__version__") else "?"
    return {
        "format_detail": "gptq" if kind == "gptq" else "awq (gemm)",
        "library": f"GPTQModel {version}",
        "needs": f"pip install gptqmodel=={version} optimum",
        "serve": "vllm serve PATH  # vLLM picks its Marlin kernel for this format on GPUs that have it",
        "quantize_device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
