"""An ONNX decoder graph as quantpipe's `onnx` method writes it and the ONNX Runtime runtime reads it: its past
key-value inputs (heads and head size, from the graph or the model's config), its MatMul nodes, its inputs,
outputs and operator counts, and the bytes of its tensors (read from the graph, without the external data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import QuantpipeError

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def past_inputs(inputs: list[tuple[str, list[Any], str]], config_dir: Path) -> dict[str, tuple[int, int, Any]]:
    """{past input name: (kv heads, head size, numpy dtype)} from the inputs' (name, shape, type); axes the graph
    leaves symbolic (the GenAI builder's `kv_cache_dim`) come from the model's config.json."""
    out, cfg = {}, None
    for name, shape, typ in inputs:
        if not name.startswith("past_key_values."):
            continue
        heads, size = shape[1], shape[3]
        if not isinstance(heads, int) or not isinstance(size, int) or not heads or not size:
            if cfg is None:
                try:
                    cfg = json.loads((config_dir / "config.json").read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise QuantpipeError(f"{config_dir}: input {name} has symbolic axes {shape} and config.json "
                                         f"cannot tell them ({e})") from None
            heads = heads if isinstance(heads, int) and heads else cfg.get("num_key_value_heads",
                                                                             cfg["num_attention_heads"])
            size = size if isinstance(size, int) and size else (
                cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        out[name] = (int(heads), int(size), NP_TYPES.get(typ, np.float32))
    return out


def matmul_nodes(model_path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return [node.name for node in m.graph.node if node.op_type == "MatMul"]


def describe_io(model_path: Path) -> dict[str, Any]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {"inputs": [i.name for i in m.graph.input], "outputs": [o.name for o in m.graph.output],
            "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def tensor_bytes(path: Any) -> int:
    """Bytes of an ONNX model's initializers and Constant tensors (inline or external data), from the graph
    without loading the external data."""
    import numpy as np
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in [*m.graph.initializer, *consts]:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total
