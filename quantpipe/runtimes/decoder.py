"""The compiled runtime's own decoder forward for the Llama family (model types llama, mistral, qwen2): the
transformer written out like gpt-fast instead of transformers' modeling code, so that one decode step is only
the work the weights need:
- q/k/v are one fused projection and gate/up another (one read of the input, one kernel call each), built from the
  checkpoint's weights by kernels.concat/build (dense, Marlin, tinygemm, int8 or FP8);
- a static KV cache owned here ([batch, kv heads, length, head dim] per layer), written in place at the step's
  position, attention by SDPA with GQA over it (causal SDPA over the prompt itself at prefill);
- no per-step mask building, cache-object bookkeeping or output dataclasses, so the compiled step is one graph;
- with QUANTPIPE_PREFILL_PREFETCH=1 a prompt on Marlin weights dequantizes layer i + 1 on a second stream while
  layer i computes (marlin.prefetch).
Embeddings, norms' weights, rotary embedding (rope scaling included) and lm_head are the transformers model's
own modules, so the arithmetic is transformers' (tests compare logits and greedy tokens on tiny models of each
family). Other model types raise `NotSupported` and the runtime keeps transformers' modeling code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantpipe.errors import QuantpipeError
from quantpipe.runtimes import kernels, marlin

FAMILIES = ("llama", "mistral", "qwen2")


class NotSupported(Exception):
    """This model's architecture has no decoder here (transformers' modeling code runs it)."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 statistics, the weight applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' rotate_half convention; x [B, T, H, D], cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos.unsqueeze(2) + rot * sin.unsqueeze(2)


ATTN_KINDS = ("matmul", "sdpa-gqa", "sdpa-expand", "flex")
# measured on the H200, Qwen2-7B shape, bf16 batch-1 step: matmul 4.62 ms, sdpa-gqa 4.95, sdpa-expand 4.96
# (docs/benchmarks.md); QUANTPIPE_DECODE_ATTN picks another, for comparisons
DECODE_ATTN = "matmul"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     kind: str) -> torch.Tensor:
    """One query position per sequence (q [B, H, 1, D]) over the cache (k, v [B, KV, L, D]), `mask` [1, L] of
    the positions it may read. sdpa-gqa: the query heads of a KV head become that head's rows (no copy of the
    cache); sdpa-expand: the cache expanded to every query head (what transformers does); matmul: scores, softmax
    and the weighted sum written out, for the compiler to fuse; flex: PyTorch's FlexAttention, which torch.compile
    turns into one decoding kernel for short queries (its flex-decoding Triton template) instead of three; a GPU's:
    on a CPU it runs eagerly (torch 2.13's CPU lowering has no template for it)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    if kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        def readable(score: torch.Tensor, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
            return torch.where(mask[0, kv_idx], score, float("-inf"))

        return flex_attention(q, k, v, score_mod=readable, scale=scale, enable_gqa=kv != h)
    if kind == "sdpa-expand":
        rep = h // kv
        ke = k[:, :, None].expand(b, kv, rep, *k.shape[2:]).reshape(b, h, *k.shape[2:])
        ve = v[:, :, None].expand(b, kv, rep, *v.shape[2:]).reshape(b, h, *v.shape[2:])
        return F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask, scale=scale)
    qg = q.reshape(b, kv, h // kv, d)
    if kind == "sdpa-gqa":
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).reshape(b, h, 1, d)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, KV, G, L]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(v.dtype)
    return torch.matmul(p, v).reshape(b, h, 1, d)


class Layer(nn.Module):
    def __init__(self, qkv: nn.Module, o: nn.Module, gate_up: nn.Module, down: nn.Module, ln1: torch.Tensor,
                 ln2: torch.Tensor, eps: float, window: int | None) -> None:
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.ln1, self.ln2 = nn.Parameter(ln1, requires_grad=False), nn.Parameter(ln2, requires_grad=False)
        self.eps, self.window = eps, window

    def projections(self) -> list[nn.Module]:
        """The layer's four weight modules (a Concat's parts), in the order a forward pass calls them."""
        mods = [self.qkv, self.o, self.gate_up, self.down]
        return [p for m in mods for p in (m.mods if isinstance(m, Concat) else [m])]


class Decoder(nn.Module):
    """The model: `forward(ids, pos, cache)` -> logits of the last `keep` positions (all when keep is None)."""

    def __init__(self, hf: nn.Module, layers: list[Layer], act: Any) -> None:
        super().__init__()
        cfg = hf.config
        self.config, self.act = cfg, act
        self.embed = hf.get_input_embeddings()
        self.norm = hf.model.norm
        self.rotary = hf.model.rotary_emb
        self.lm_head = hf.get_output_embeddings()
        self.layers = nn.ModuleList(layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.attn = os.environ.get("QUANTPIPE_DECODE_ATTN", DECODE_ATTN)
        if self.attn not in ATTN_KINDS:
            raise QuantpipeError(f"QUANTPIPE_DECODE_ATTN={self.attn}: one of {', '.join(ATTN_KINDS)}")

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.kv_heads, length, self.head_dim)
        dev = self.embed.weight.device
        cache = [(torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev))
                 for _ in self.layers]
        for k, v in cache:  # fixed addresses: a CUDA graph of the step reads and writes them in place
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
        return cache

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]] | None,
                keep: int | None = None) -> torch.Tensor:
        """ids [B, T] at positions `pos` [T]; with `cache`, keys and values are written at `pos` and attention
        reads the whole cache (masked to positions <= the query's); without, causal attention over `ids`.
        A multi-token call with a cache must start at position 0 (a prompt)."""
        b, t = ids.shape
        x = self.embed(ids)
        cos, sin = self.rotary(x, pos.unsqueeze(0).expand(b, t))
        nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        groups = self.heads // self.kv_heads
        decode = cache is not None and t == 1
        ahead = (not decode and x.is_cuda and not torch.compiler.is_compiling() and marlin.prefill_prefetch())
        if ahead:  # dequantize layer i + 1's weights beside layer i's arithmetic (marlin.prefetch)
            marlin.prefetch(self.layers[0].projections(), b * t)
        if decode:
            kpos = torch.arange(cache[0][0].shape[2], device=ids.device)
            causal = kpos.unsqueeze(0) <= pos.unsqueeze(1)  # [1, L]
        for i, layer in enumerate(self.layers):
            if ahead and i + 1 < len(self.layers):
                marlin.prefetch(self.layers[i + 1].projections(), b * t)
            h = rms_norm(x, layer.ln1, layer.eps)
            q, k, v = layer.qkv(h).split((nq, nkv, nkv), -1)
            q = rotate(q.view(b, t, self.heads, self.head_dim), cos, sin).transpose(1, 2)
            k = rotate(k.view(b, t, self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            if cache is not None:
                cache[i][0].index_copy_(2, pos, k)
                cache[i][1].index_copy_(2, pos, v)
            if decode:  # one new token over the whole cache
                m = causal
                if layer.window is not None:
                    m = m & (kpos.unsqueeze(0) > pos.unsqueeze(1) - layer.window)
                a = decode_attention(q, cache[i][0], cache[i][1], m, self.scaling, self.attn)
            else:  # a prompt (or a cache-less pass): causal over its own keys
                m = None
                if layer.window is not None and t > layer.window:
                    r = torch.arange(t, device=ids.device)
                    m = (r.unsqueeze(0) <= r.unsqueeze(1)) & (r.unsqueeze(0) > r.unsqueeze(1) - layer.window)
                if groups > 1:
                    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None, scale=self.scaling)
            x = x + layer.o(a.transpose(1, 2).reshape(b, t, nq))
            h = rms_norm(x, layer.ln2, layer.eps)
            g, u = layer.gate_up(h).chunk(2, -1)
            x = x + layer.down(self.act(g) * u)
        x = self.norm(x if keep is None else x[:, -keep:])
        return self.lm_head(x)


Records = dict[str, tuple[kernels.Reader, Any]]


def _weight(records: Records, model: nn.Module, name: str) -> tuple[kernels.QWeight, torch.Tensor | None]:
    """The weight of one Linear: read (and unpacked) now from a quantized checkpoint's tensors, which are dropped
    from `records`; a float Linear's own weight."""
    if name in records:
        reader, bias = records.pop(name)
        return reader(), bias
    lin = model.get_submodule(name)
    return kernels.DenseWeight(lin.weight.data), None if lin.bias is None else lin.bias.data


def _fused(records: Records, model: nn.Module, names: list[str], dtype: torch.dtype) -> tuple[nn.Module, bool]:
    """One module computing the outputs of all `names` (concatenated), and whether it is one kernel call."""
    parts = [_weight(records, model, n) for n in names]
    rec = kernels.concat([p[0] for p in parts])
    biases = [p[1] for p in parts]
    bias = None
    if any(x is not None for x in biases):
        bias = torch.cat([torch.zeros(kernels.out_features(p[0]), dtype=dtype, device=kernels.device_of(p[0]))
                          if x is None else x.to(dtype) for p, x in zip(parts, biases, strict=True)])
    if rec is not None:
        return kernels.build(rec, bias, dtype), True
    return Concat([kernels.build(r, b, dtype) for r, b in parts]), False


class Concat(nn.Module):
    """Projections that cannot share one call (different kernels), run one after the other."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.mods], -1)


def supported(config: Any) -> str | None:
    """Why this config has no decoder here (None: it has)."""
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        return f"model type {mt} (the decoder covers {', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") not in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        return f"hidden_act {config.hidden_act}"
    return None


def _window(config: Any, i: int) -> int | None:
    w = getattr(config, "sliding_window", None)
    if not w:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(w) if types[i] == "sliding_attention" else None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(w)


def build(model: nn.Module, records: Records, dtype: torch.dtype, device: str) -> tuple[Decoder, str]:
    """The decoder over a kernels.load_parts model (its layers' modules are dropped as they are taken over), and
    a line naming the kernels."""
    from transformers.activations import ACT2FN

    cfg = model.config
    why = supported(cfg)
    if why:
        raise NotSupported(why)
    fused_all = True
    layers = []
    names: set[str] = set()
    for i, hl in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        at, mlp = f"{pre}.self_attn", f"{pre}.mlp"
        qkv, f1 = _fused(records, model, [f"{at}.q_proj", f"{at}.k_proj", f"{at}.v_proj"], dtype)
        gu, f2 = _fused(records, model, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], dtype)
        o, d = (kernels.build(*_weight(records, model, n), dtype) for n in (f"{at}.o_proj", f"{mlp}.down_proj"))
        fused_all &= f1 and f2
        for m in (qkv, gu, o, d):
            names |= {kernels.kernel_name(x) for x in (m.mods if isinstance(m, Concat) else [m])}
        layers.append(Layer(qkv, o, gu, d, hl.input_layernorm.weight.data, hl.post_attention_layernorm.weight.data,
                            hl.input_layernorm.variance_epsilon, _window(cfg, i)))
        model.model.layers[i] = nn.Identity()  # its weights now live in the fused modules
    head = "lm_head"
    quantized_head = head in records
    if quantized_head:
        model.lm_head = kernels.build(*_weight(records, model, head), dtype)
        names.add(kernels.kernel_name(model.lm_head))
    dec = Decoder(model, layers, ACT2FN[cfg.hidden_act]).to(device).eval()
    if cfg.tie_word_embeddings and not quantized_head:
        dec.lm_head.weight = dec.embed.weight
    line = "; ".join(sorted(names)) + ("" if fused_all else "; q/k/v or gate/up not fused (mixed kernels)")
    return dec, line


def load(artifact_dir: Path, device: str) -> tuple[Decoder, str]:
    """The artifact as a Decoder on `device` (NotSupported for other model types), and its kernels line."""
    from transformers import AutoConfig

    why = supported(AutoConfig.from_pretrained(artifact_dir))
    if why:
        raise NotSupported(why)
    model, records, dtype = kernels.load_parts(artifact_dir, device)
    return build(model, records, dtype, device)
