"""Memory arithmetic, below every other layer: how an artifact stores its weights (`Storage`, which each method
declares), the shapes of a decoder from its config, the bytes of its weights, KV cache and activations, and the
working set of calibrated quantization. `quantpipe plan` and the run's predictions are built from these; the
methods declare their storage with them; the runtimes count the bytes a decode step reads with them.

Definitions (docs/architecture.md has them too):
- weights: every tensor of the artifact, in the layout its method writes (`Storage`): embeddings, lm_head (once
  when tied), norms and biases stay float; each decoder Linear is quantized. Exact to the byte against the
  safetensors tensors the methods write.
- KV cache per token: 2 (K and V) × layers × kv_heads × head_dim × KV dtype bytes (grouped-query attention
  counts the kv heads, not the query heads).
- activations: the workspace of one forward over `tokens` tokens of `seqs` sequences: per token the widest
  live tensors (residual, normed input, q/k/v, attention output, gate/up/act of the MLP), the last position's
  float32 logits and their softmax per sequence, and the attention scores when the kernel materializes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from quantpipe.errors import QuantpipeError

GIB, MIB = 2**30, 2**20

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Storage:
    """How an artifact stores the weights: the inputs of `quantpipe plan`'s byte arithmetic."""

    float_bytes: int  # bytes per element of what stays float: embeddings, lm_head, norms, biases
    # bytes of one quantized decoder Linear's weight tensors (no bias) from its (out_features, in_features);
    # None: the Linears stay float too
    linear: Callable[[int, int], int] | None = None
    # transformers turns the weights back into float when it loads this format on a CPU
    decompressed_on_cpu: bool = False
    # what the arithmetic leaves out when this format runs on a CPU (shown beside the measured memory)
    cpu_note: str = ""
    # bytes of the token embedding (and of an untied lm_head) from (vocab, hidden); None: float_bytes each
    embedding: Callable[[int, int], int] | None = None
    # False where the backend picks some tensors' types itself (llama.cpp's k-quant mixes): nominal bytes
    exact: bool = True
    # non-empty where the quantization's float model is not all resident at once (why): the prediction's
    # `model` term is then an upper bound, and the measured peak may fall below the prediction
    quantize_upper_bound: str = ""
    # decoder Linears (names as plan.Shapes.linears gives them, matched as substrings) that stay float
    float_linears: tuple[str, ...] = ()
    # bytes of an untied lm_head, and of the one tensor a tied embedding and lm_head share, from (vocab, hidden);
    # None: as `embedding`
    lm_head: Callable[[int, int], int] | None = None
    tied_embedding: Callable[[int, int], int] | None = None
    # bytes per decoder layer beyond its Linears, biases and norms (an FP8 KV cache's k_scale and v_scale)
    layer_extra: int = 0
    # bytes per element of the KV cache the artifact asks for (an FP8 KV cache: 1); None: the compute dtype
    kv_bytes: int | None = None
    # why `exact` is False (shown by plan)
    inexact: str = ""
    # bytes of the tinygemm copy of a 4-bit Linear(out, in) that the compiled runtime keeps on a GPU for one-row
    # calls (runtimes.marlin.ONE_ROW_MAX_ELEMENTS: small weights only; plan.one_row_copies); None: no such copy
    one_row_copy: Callable[[int, int], int] | None = None
    # bytes of the zero points of a 4-bit Linear(out, in) with zero points (AWQ) that the compiled runtime keeps
    # in natural order beside Marlin's packed ones on a GPU, for the prompt's dequantization ([in / group, out]
    # uint8; plan.natural_zero_points); None: no zero points
    natural_zero_points: Callable[[int, int], int] | None = None


def float_storage(params: Any, dtype: str) -> Storage:
    """Default: every tensor in the recipe dtype (the baseline)."""
    return Storage(float_bytes=DTYPE_BYTES[dtype])



SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Shapes:
    """The numbers of a decoder-only transformer that memory depends on."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    max_positions: int

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, out_features, in_features, has bias) of one decoder layer's Linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [("q_proj", q, h, self.qkv_bias), ("k_proj", kv, h, self.qkv_bias), ("v_proj", kv, h, self.qkv_bias),
                ("o_proj", h, q, self.o_bias), ("gate_proj", i, h, self.mlp_bias), ("up_proj", i, h, self.mlp_bias),
                ("down_proj", h, i, self.mlp_bias)]

    def n_params(self) -> int:
        per_layer = sum(o * i + (o if b else 0) for _, o, i, b in self.linears()) + 2 * self.hidden
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


def shapes(config: Any) -> Shapes:
    """Shapes of a transformers config of a Llama-like decoder (llama, mistral, qwen2, qwen3)."""
    mt = getattr(config, "model_type", "?")
    if mt not in SUPPORTED:
        raise QuantpipeError(f"model: plan knows the layer shapes of {', '.join(SUPPORTED)} models, not "
                             f"model_type '{mt}'")
    heads = config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    return Shapes(
        model_type=mt, vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=mt == "qwen3",
        max_positions=getattr(config, "max_position_embeddings", 0) or 0)


def weight_bytes(s: Shapes, storage: Storage) -> dict[str, int]:
    """Bytes of every tensor of an artifact, by part; 'total' is their sum."""
    f = storage.float_bytes
    linear = storage.linear or (lambda out, inp: out * inp * f)
    per_layer_linear = sum(o * i * f if any(k in n for k in storage.float_linears) else linear(o, i)
                           for n, o, i, _ in s.linears())
    per_layer_bias = sum(o for _, o, _, b in s.linears() if b) * f
    norms = (2 * s.hidden + (2 * s.head_dim if s.qk_norm else 0)) * f
    embedding = storage.embedding or (lambda vocab, hidden: vocab * hidden * f)
    out = {
        "embeddings": (storage.tied_embedding or embedding)(s.vocab, s.hidden) if s.tied else
        embedding(s.vocab, s.hidden),
        "lm_head": 0 if s.tied else (storage.lm_head or embedding)(s.vocab, s.hidden),
        "linear": s.layers * per_layer_linear,
        "bias": s.layers * per_layer_bias,
        "norms": s.layers * norms + s.hidden * f,
        "other": s.layers * storage.layer_extra,
    }
    out["total"] = sum(out.values())
    return out


def natural_zero_points_bytes(group_size: int) -> Callable[[int, int], int]:
    """Bytes of a Linear(out, inp)'s zero points as runtimes.marlin.MarlinLinear keeps them for dequantizing:
    one uint8 per group of `group_size` inputs (per channel: one) and output."""
    return lambda out, inp: out * (inp // group_size if group_size > 0 else 1)


def tinygemm_bytes(group_size: int) -> Callable[[int, int], int]:
    """Bytes of a Linear(out, inp) on torch's int4 tinygemm (runtimes.kernels.Int4Linear): the packed weight,
    4 bits per value, and [K/group, N, 2] bfloat16 scales and zeros, K padded to whole tiles and N to 16; per
    channel runs as groups of 128. 0 where tinygemm takes no such group (no copy is made)."""

    def size(out: int, inp: int) -> int:
        g = group_size if group_size > 0 else 128 if inp % 128 == 0 else inp
        if g not in (32, 64, 128, 256) or inp % g:
            return 0
        tile = max(g, 128)
        kp, np_ = -(-inp // tile) * tile, -(-out // 16) * 16
        return np_ * kp // 2 + kp // g * np_ * 4

    return size


def kv_bytes_per_token(s: Shapes, kv_bytes: int) -> int:
    """K and V of every layer for one token: 2 × layers × kv_heads × head_dim × bytes."""
    return 2 * s.layers * s.kv_heads * s.head_dim * kv_bytes


def activation_bytes(s: Shapes, tokens: int, seqs: int, act_bytes: int, scores_len: int = 0) -> int:
    """Workspace of one forward over `tokens` tokens of `seqs` sequences (see the module docstring).
    `scores_len` > 0 adds the [seqs, heads, len, len] attention scores of a kernel that materializes them."""
    width = 4 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate
    logits = 2 * seqs * s.vocab * 4
    scores = seqs * s.heads * scores_len * scores_len * act_bytes
    return tokens * width * act_bytes + logits + scores


# -- calibration (GPTQ, AWQ): memory beyond the loaded float model --------------------------------------------
def gptq_calibration(s: Shapes, n_samples: int, seq_len: int, a: int) -> dict[str, int]:
    """GPTQ, layer by layer: the layer's inputs and outputs for every calibration sample, one float32 Hessian
    (in × in) per Linear of the layer, the largest Linear's float32 weight copy and two Hessian-sized buffers
    (damped inverse and Cholesky factor), and one sample's forward through the layer."""
    tokens = n_samples * seq_len
    lin = s.linears()
    return {
        "layer inputs+outputs": 2 * tokens * s.hidden * a,
        "hessians": sum(i * i * 4 for _, _, i, _ in lin),
        "solver": max(o * i * 4 + 2 * i * i * 4 for _, o, i, _ in lin),
        "forward": activation_bytes(s, seq_len, 1, a, scores_len=seq_len),
    }


def awq_calibration(s: Shapes, n_samples: int, seq_len: int, a: int) -> dict[str, int]:
    """AWQ, layer by layer: the layer's inputs and outputs for every sample, the cached inputs of each smoothed
    group (attention input, o_proj input, MLP input, down_proj input), float32 reference and candidate outputs
    of a group for the scale search, and float32 copies of the largest group's weights."""
    tokens = n_samples * seq_len
    q = s.heads * s.head_dim
    return {
        "layer inputs+outputs": 2 * tokens * s.hidden * a,
        "group inputs": tokens * (2 * s.hidden + q + s.intermediate) * a,
        "search outputs": 2 * tokens * s.hidden * 4,
        "weight copies": 2 * 2 * s.intermediate * s.hidden * 4,
        "forward": activation_bytes(s, seq_len, 1, a, scores_len=seq_len),
    }


# -- what a loaded model reads per decode step -----------------------------------------------------------------
def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer but the token embedding (a step
    gathers a few rows of it) — unless the lm_head is tied to it, then it is read whole, once. Modules marked
    `alternate` are left out: each is a second copy of a weight on another kernel for some row counts, and a step
    reads one of the two copies (marlin.MarlinLinear.use_one_row)."""
    emb = model.get_input_embeddings().weight
    seen = {t.data_ptr() for m in model.modules() if getattr(m, "alternate", False)
            for t in [*m.parameters(), *m.buffers()]}
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    out = model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is not None and out.weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes of one position of one sequence (keys and values of every layer)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()
