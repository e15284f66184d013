"""`autoround`: Intel's AutoRound (sign-gradient descent on the rounding offsets and weight clipping ranges,
block by block, against the float block's outputs on the calibration set), run through llm-compressor's
AutoRoundModifier on the recipe's calibration ids and written as compressed-tensors `pack-quantized` integer
weights — the layout of llm-compressor's GPTQ and AWQ, so vLLM and transformers load it the same way and the
three compare on the same calibration ids. `iters` optimizer steps per block (0: AutoRound's RTN with its
optimized rounding), `lr` (None: AutoRound's default, 1/iters), `batch_size` samples per step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Shapes, Storage, activation_bytes
from quantpipe.methods import GroupSize, Method, MethodParams, QuantizeJob, _llmcompressor, check_group_size, register

REQUIREMENTS = Requirements(("llmcompressor", "compressed_tensors", "auto_round"), "autoround",
                            ("llmcompressor", "compressed-tensors", "auto-round", "transformers"))


class AutoRoundParams(MethodParams):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 128
    sym: bool = True
    iters: int = Field(200, ge=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)


class AutoRound(Method):
    name = "autoround"
    summary = "AutoRound sign-gradient rounding, integer weights (llm-compressor + auto-round -> compressed-tensors)"
    Params = AutoRoundParams

    def requirements(self, p: AutoRoundParams) -> Requirements:
        return REQUIREMENTS

    def format(self, p: AutoRoundParams) -> str:
        return _llmcompressor.FORMAT

    def calibrates(self, p: AutoRoundParams) -> bool:
        return True

    def storage(self, p: AutoRoundParams, dtype: str) -> Storage:
        return Storage(float_bytes=DTYPE_BYTES[dtype], decompressed_on_cpu=True,
                       linear=_llmcompressor.packed_bytes(p.bits, p.group_size, not p.sym, DTYPE_BYTES[dtype]))

    def calibration_memory(self, p: AutoRoundParams, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int]:
        """Block by block: the block's inputs and its float outputs for every sample, float32 copies of the
        block's weights with a rounding offset and its optimizer state per weight, one batch's forward and
        backward through the block."""
        tokens = n_samples * seq_len
        block = sum(o * i for _, o, i, _ in shapes.linears())
        return {"layer inputs+outputs": 2 * tokens * shapes.hidden * a,
                "tuning state": 3 * block * 4,
                "forward+backward": 2 * activation_bytes(shapes, min(p.batch_size, n_samples) * seq_len,
                                                         min(p.batch_size, n_samples), 4, scores_len=seq_len)}

    def check_model(self, p: AutoRoundParams, config: Any) -> list[str]:
        return check_group_size(p.group_size, config)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        import auto_round
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        p: AutoRoundParams = job.params
        weights = _llmcompressor.weight_args(p.bits, p.group_size, symmetric=p.sym)
        mod = AutoRoundModifier(config_groups=_llmcompressor.config_groups(weights), ignore=["lm_head"],
                                iters=p.iters, lr=p.lr, batch_size=p.batch_size, enable_torch_compile=False)
        meta = _llmcompressor.oneshot(job, [mod])
        meta["library"] += f", auto-round {auto_round.__version__}"
        return {**meta, "bits": p.bits, "group_size": p.group_size, "iters": p.iters}


register(AutoRound())
