"""`onnx`: an ONNX decoder with past key values for ONNX Runtime, optionally INT8 (dynamic or static/calibrated).

Export (`exporter`):
- `builder` (default): the ONNX Runtime GenAI model builder (`onnxruntime_genai.models.builder`), the ONNX Runtime
  team's LLM exporter. It writes the graph from the weights (no tracing: 9 s for SmolLM2 here) with ORT's fused
  CPU ops (GroupQueryAttention, SkipSimplifiedLayerNormalization), and knows the common decoder architectures.
- `torch`: `torch.onnx.export(dynamo=True)` of the HF model wrapped so the KV cache is flat tensors: standard ONNX
  ops, any architecture torch.export can trace; slower to export (about 2 min for SmolLM2) and to run.
Both write optimum's I/O names (`input_ids`, `attention_mask`, [`position_ids`], `past_key_values.N.key/value` ->
`logits`, `present.N.key/value`) and keep the weights in `model.onnx.data` (external data: no 2 GB limit).

Quantization (`quantize`) is onnxruntime.quantization's: `dynamic` (int8 weights, activations quantized per call
by DynamicQuantizeLinear) or `static` (QDQ, activation ranges calibrated on the run's calibration ids, the same
rows GPTQ/AWQ/SmoothQuant see). Only MatMuls are quantized; `keep_float` leaves some in float. Weights are 7-bit
by default (`reduce_range`): ORT's x86 u8s8 kernel saturates int16 sums on CPUs without VNNI (docs/benchmarks.md
measured what full 8-bit per-channel weights do there).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from quantpipe.backends.onnx import describe_io, matmul_nodes
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.memory import Storage
from quantpipe.methods import TOKENIZER_FILES, Method, MethodParams, QuantizeJob, register
from quantpipe.sysinfo import versions

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
CONFIG_FILES = ("config.json", "generation_config.json")


class ONNXParams(MethodParams):
    quantize: Literal["none", "dynamic", "static"] = "none"
    exporter: Literal["builder", "torch"] = "builder"
    per_channel: bool = True  # one weight scale per output column (else one per tensor)
    reduce_range: bool = True  # 7-bit weights: no u8s8 saturation on CPUs without VNNI
    keep_float: list[str] = []  # MatMuls whose node name contains one of these stay float (e.g. down_proj)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # static only

    @model_validator(mode="after")
    def _combos(self) -> ONNXParams:
        # checked by value, not by which keys were given: results.json re-validates the full dumped params
        if self.quantize == "none" and self.keep_float:
            raise ValueError("keep_float: only applies with quantize: dynamic or static; remove it or set quantize")
        if self.quantize != "static" and self.calibrate_method != "minmax":
            raise ValueError(f"calibrate_method: {self.quantize} quantization does not calibrate; "
                             "use quantize: static")
        return self


def _version(dist: str) -> str:
    return versions([dist])[dist]


def quantize(job: QuantizeJob) -> dict[str, Any]:
    p: ONNXParams = job.params
    assert job.base_dir is not None
    export_dir = job.out_dir if p.quantize == "none" else job.out_dir / ".export"
    export_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    exported = export_builder(job.base_dir, export_dir) if p.exporter == "builder" else \
        export_torch(job.base_dir, export_dir)
    detail = "ONNX, past key values" + ("" if p.quantize == "none" else f", INT8 {p.quantize}")
    meta: dict[str, Any] = {"format_detail": detail, "file": MODEL_FILE, "dtype": "float32", "exporter": exported,
                            "export_s": time.perf_counter() - t, "onnxruntime": _version("onnxruntime"),
                            "onnx": _version("onnx")}
    if p.quantize != "none":
        t = time.perf_counter()
        meta["quantization"] = quantize_onnx(export_dir / MODEL_FILE, job.out_dir / MODEL_FILE, p, job.calibration,
                                             job.base_dir)
        meta["quantize_onnx_s"] = time.perf_counter() - t
        if (export_dir / "genai_config.json").is_file():  # onnxruntime-genai runs the quantized graph too
            shutil.copy2(export_dir / "genai_config.json", job.out_dir / "genai_config.json")
        shutil.rmtree(export_dir)
    for f in job.out_dir.iterdir():  # the builder's own tokenizer copy and extras go; the baseline's are copied
        if f.name not in (MODEL_FILE, DATA_FILE, "genai_config.json") and f.is_file():
            f.unlink()
    for name in (*TOKENIZER_FILES, *CONFIG_FILES):
        if (job.base_dir / name).is_file():
            shutil.copy2(job.base_dir / name, job.out_dir / name)
    meta["io"] = describe_io(job.out_dir / MODEL_FILE)
    meta["needs"] = f"pip install onnxruntime=={_version('onnxruntime')}" + (
        f" onnxruntime-genai=={_version('onnxruntime-genai')}  # its GenAI API; plain onnxruntime runs the file"
        if p.exporter == "builder" else "")
    plain = ("# plain onnxruntime: inputs " + ", ".join(meta["io"]["inputs"][:3]) + ", past_key_values.N.key/value "
             "(zero-length to start); outputs logits, present.N.key/value\n"
             "import onnxruntime as ort\n"
             "sess = ort.InferenceSession(\"PATH/model.onnx\")")
    genai = ("# ONNX Runtime GenAI (pip install onnxruntime-genai): greedy generation with its KV cache\n"
             "import onnxruntime_genai as og\n"
             "model = og.Model(\"PATH\"); tok = og.Tokenizer(model)\n"
             "params = og.GeneratorParams(model); params.set_search_options(max_length=256)\n"
             "gen = og.Generator(model, params); gen.append_tokens(tok.encode(\"The capital of France is\"))\n"
             "while not gen.is_done(): gen.generate_next_token()\n"
             "print(tok.decode(gen.get_sequence(0)))\n\n")
    meta["usage"] = (genai if (job.out_dir / "genai_config.json").is_file() else "") + plain
    return meta


def export_builder(base: Path, out: Path) -> dict[str, Any]:
    """ONNX Runtime GenAI's model builder, fp32 for the CPU execution provider."""
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as e:
        raise QuantpipeError(f"exporter: the ONNX Runtime GenAI builder is not importable ({e}): "
                             "pip install 'quantpipe[onnx]'") from None
    cache = out / ".builder-cache"
    src = str(base)
    options = parse_extra_options(src, src, str(out), "fp32", "cpu", str(cache), [])
    try:
        create_model(src, src, str(out), "fp32", "cpu", str(cache), **options)
    except NotImplementedError as e:
        raise QuantpipeError(f"exporter: the ONNX Runtime GenAI builder does not support this model ({e}); "
                             "use exporter: torch") from None
    shutil.rmtree(cache, ignore_errors=True)
    return {"name": "onnxruntime-genai model builder", "version": _version("onnxruntime-genai"),
            "precision": "fp32", "execution_provider": "cpu"}


class _FlatCache(torch.nn.Module):
    """The HF model with its KV cache as flat tensors (past_key_values.N.key/value in, present.N.* out), the
    layout ONNX decoders with past use. Only the wrapper is ours; torch.onnx traces and writes the graph."""

    def __init__(self, model: torch.nn.Module, n_layers: int) -> None:
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def export_torch(base: Path, out: Path) -> dict[str, Any]:
    """torch.onnx's dynamo exporter (torch.export + onnxscript), dynamic batch and sequence lengths."""
    from torch.export import Dim
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cfg = model.config
    n = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b, s, past_len = 2, 3, 2  # example shapes only; every axis below is dynamic
    args = (torch.zeros(b, s, dtype=torch.long), torch.ones(b, past_len + s, dtype=torch.long),
            torch.arange(past_len, past_len + s).expand(b, -1).contiguous(),
            *[torch.zeros(b, cfg.num_key_value_heads, past_len, head_dim) for _ in range(2 * n)])
    kv = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    past, total = Dim("past_sequence_length", min=0), Dim("total_sequence_length")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in kv)}
    with torch.no_grad():
        torch.onnx.export(_FlatCache(model, n), args, str(out / MODEL_FILE), dynamo=True, optimize=True,
                          external_data=True, dynamic_shapes=shapes,
                          input_names=["input_ids", "attention_mask", "position_ids",
                                       *[f"past_key_values.{x}" for x in kv]],
                          output_names=["logits", *[f"present.{x}" for x in kv]])
    data = [f for f in out.iterdir() if f.name.startswith(MODEL_FILE) and f.name != MODEL_FILE]
    if data and data[0].name != DATA_FILE:  # one weights file, one name, whatever torch calls it
        import onnx

        m = onnx.load(str(out / MODEL_FILE))
        for f in data:
            f.unlink()
        onnx.save_model(m, str(out / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return {"name": "torch.onnx (dynamo)", "version": torch.__version__, "onnxscript": _version("onnxscript"),
            "precision": "fp32"}


def calibration_feeds(model_path: Path, config_dir: Path, calib: torch.Tensor) -> list[dict[str, Any]]:
    """One feed per calibration row: the row's ids, full attention mask, positions, empty past."""
    import numpy as np
    import onnx

    from quantpipe.backends.onnx import past_inputs

    m = onnx.load(str(model_path), load_external_data=False)
    names = {i.name for i in m.graph.input}
    shapes = [(i.name, [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in i.type.tensor_type.shape.dim], "tensor(float)") for i in m.graph.input]
    pasts = past_inputs(shapes, config_dir)
    feeds = []
    for row in calib:
        ids = row.numpy().astype(np.int64)[None]
        f: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in names:
            f["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        for name, (heads, size, dtype) in pasts.items():
            f[name] = np.zeros((1, heads, 0, size), dtype=dtype)
        feeds.append(f)
    return feeds


def quantize_onnx(src: Path, dst: Path, p: ONNXParams, calib: torch.Tensor | None, config_dir: Path
                  ) -> dict[str, Any]:
    """onnxruntime.quantization over the MatMuls of `src` (minus `keep_float`), written to `dst` + external data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    matmuls = matmul_nodes(src)
    keep = [n for n in matmuls if any(k in n for k in p.keep_float)]
    unused = [k for k in p.keep_float if not any(k in n for n in matmuls)]
    if unused:
        raise QuantpipeError(f"keep_float: no MatMul node name contains {unused[0]!r}; names look like "
                             f"{matmuls[0]!r}")
    common = dict(op_types_to_quantize=["MatMul"], per_channel=p.per_channel, reduce_range=p.reduce_range,
                  weight_type=QuantType.QInt8, nodes_to_exclude=keep, use_external_data_format=True)
    info: dict[str, Any] = {"mode": p.quantize, "weights": "int8 (7-bit range)" if p.reduce_range else "int8",
                            "per_channel": p.per_channel, "matmuls_quantized": len(matmuls) - len(keep),
                            "matmuls_float": len(keep),
                            "library": f"onnxruntime.quantization {_version('onnxruntime')}"}
    if p.quantize == "dynamic":
        quantize_dynamic(str(src), str(dst), **common)
        info["activations"] = "uint8, per tensor, quantized per call (DynamicQuantizeLinear)"
    else:
        if calib is None:
            raise QuantpipeError("quantize: static quantization needs the run's calibration ids")
        feeds = calibration_feeds(src, config_dir, calib)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[p.calibrate_method]
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        calibrate_method=method, **common)
        info["activations"] = (f"uint8, per tensor, ranges from {len(feeds)} calibration rows "
                               f"({p.calibrate_method}), QDQ")
    for f in dst.parent.iterdir():  # the calibrator's augmented model and scratch files
        if f.suffix == ".onnx" and f.name != MODEL_FILE or f.name.endswith("-augmented.onnx.data"):
            f.unlink()
    return info


# Measured on the SmolLM2 demo (docs/benchmarks.md): bench RSS over its base 821 MiB against 560 predicted (fp32),
# 606 against 252 (static INT8).
ORT_NOTE = ("onnxruntime's session holds buffers its graph optimizations create at load (e.g. a transposed copy of "
            "the builder's tied embedding, prepacked weights) and its memory arena beside the weights: not in the "
            "prediction")


def storage(p: ONNXParams, dtype: str) -> Storage:
    """Nominal bytes (exporters add small constant tensors such as rotary tables). fp32: every weight 4 bytes, a
    tied embedding once (the builder's embedding is its lm_head transposed). INT8: the quantized MatMuls (lm_head
    included) int8 with a float32 scale and an int8 zero point per column (per tensor: one each); the embedding
    stays float, except a tied one under static (QDQ) quantization, served from the int8 lm_head. Dynamic
    quantization of a tied model keeps the float embedding and adds an int8 lm_head, not counted here."""
    if p.quantize == "none":
        return Storage(float_bytes=4, exact=False, cpu_note=ORT_NOTE)
    extra = (lambda out: 5 * out) if p.per_channel else (lambda out: 5)

    def int8(out: int, inp: int) -> int:
        return out * inp + extra(out)

    lm_head = None if any(k in "lm_head" for k in p.keep_float) else (lambda vocab, hidden: int8(vocab, hidden))
    return Storage(float_bytes=4, linear=int8, lm_head=lm_head,
                   tied_embedding=lm_head if p.quantize == "static" else None,
                   float_linears=tuple(p.keep_float), exact=False, cpu_note=ORT_NOTE)


# the exporter decides the libraries: the GenAI builder, or torch.onnx's dynamo exporter (onnxscript)
EXPORTERS = {
    "builder": Requirements(("onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir"), "onnx",
                            ("onnx", "onnxruntime", "onnxruntime-genai", "transformers")),
    "torch": Requirements(("onnx", "onnxruntime", "onnxscript"), "onnx",
                          ("onnx", "onnxruntime", "onnxscript", "torch", "transformers")),
}


class ONNX(Method):
    name = "onnx"
    summary = "ONNX decoder with KV cache for ONNX Runtime (GenAI builder or torch.onnx), INT8 dynamic or static"
    Params = ONNXParams

    def requirements(self, p: ONNXParams) -> Requirements:
        return EXPORTERS[p.exporter]

    def format(self, p: ONNXParams) -> str:
        return "onnx"

    def calibrates(self, p: ONNXParams) -> bool:
        return p.quantize == "static"

    def storage(self, p: ONNXParams, dtype: str) -> Storage:
        return storage(p, dtype)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        return quantize(job)


register(ONNX())
