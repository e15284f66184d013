"""The compiled runtime's own decoder (runtimes/decoder.py) against transformers on tiny random models of each
family it covers (Llama with GQA, Llama with tied embeddings and attention/MLP biases, Mistral with a sliding
window shorter than the sequence, Qwen2 with q/k/v biases and MHA), float32 on the CPU: logits of a whole
sequence, greedy continuations through the static cache, fused projections built from quantized checkpoints,
and the fallback to transformers' modeling code for other model types. Marlin's layout helpers are checked here;
the kernel itself needs a GPU (tests/test_gpu.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from quantpipe.runtimes import compiled, decoder, kernels, marlin
from quantpipe.runtimes.hf import HFRuntime

FAMILIES = {
    "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama-tied-bias": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True,
                                  "attention_bias": True, "mlp_bias": True,
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}}),
    "mistral-window": ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8}),
    "qwen2-mha": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 4}),
}


def build_family(out: Path, model_type: str, extra: dict, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False, **extra})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the init's, so that tokens are decided by clear margins
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    mt, extra = FAMILIES[request.param]
    return request.param, build_family(tmp_path_factory.mktemp(request.param) / "model", mt, extra)


def test_logits_equal_transformers(family: tuple[str, Path]) -> None:
    name, path = family
    own, ref = compiled.CompiledRuntime(path, "cpu"), HFRuntime(path, "cpu")
    assert own.own and "quantpipe decoder" in own.engine
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()  # > the window of 8
    got, want = own.logits(ids), ref.logits(ids)
    assert got.shape == want.shape == (40, 256)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (name, (got - want).abs().max())


def test_greedy_decode_equals_transformers(family: tuple[str, Path]) -> None:
    name, path = family
    own, ref = compiled.CompiledRuntime(path, "cpu"), HFRuntime(path, "cpu")
    x = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(5))
    got, want = own.generate(x, 16), ref.generate(x, 16)  # 11 + 16 > the window: the decode mask slides
    assert got.shape == (3, 16) and torch.equal(got, want), name
    assert torch.equal(own.generate(x[:1], 16), want[:1])  # another batch size, a reused cache of another shape
    assert torch.equal(own.generate(x, 16), want)  # the reused cache, not reset


@pytest.mark.parametrize("attn", decoder.ATTN_KINDS)
def test_decode_step_logits_follow_the_full_pass(family: tuple[str, Path], attn: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cached decode step's logits equal those of one full pass over the same tokens, with each decode
    attention (QUANTPIPE_DECODE_ATTN), the sliding window's mask included."""
    _, path = family
    monkeypatch.setenv("QUANTPIPE_DECODE_ATTN", attn)
    own = compiled.CompiledRuntime(path, "cpu")
    assert own.model.attn == attn
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():  # as the runtime runs it (FlexAttention has no backward on a CPU)
        full = own.model(ids, torch.arange(20), None)
        cache = own.model.new_cache(2, 64)
        steps = [own.model(ids[:, :12], torch.arange(12), cache, keep=1)]
        for p in range(12, 20):
            steps.append(own.model(ids[:, p:p + 1], torch.tensor([p]), cache, keep=1))
    got = torch.cat(steps[1:], 1)
    assert torch.allclose(steps[0][:, -1], full[:, 11], atol=1e-4)
    assert torch.allclose(got, full[:, 12:20], atol=1e-4)


def test_fused_projections_read_one_weight(tiny_model: Path) -> None:
    own = compiled.CompiledRuntime(tiny_model, "cpu")
    layer = own.model.layers[0]
    assert isinstance(layer.qkv, torch.nn.Linear) and layer.qkv.weight.shape == (128 + 2 * 64, 128)
    assert isinstance(layer.gate_up, torch.nn.Linear) and layer.gate_up.weight.shape == (2 * 256, 128)
    from transformers import AutoModelForCausalLM

    from quantpipe import memory

    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert own.decode_bytes() == memory.decode_bytes(hf)  # fusing moves bytes, it does not add any


def test_other_model_types_keep_transformers_modeling(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=64, n_layer=1, n_head=2, n_positions=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    rt = compiled.CompiledRuntime(tmp_path / "gpt2", "cpu")
    assert not rt.own and "no quantpipe decoder: model type gpt2" in rt.engine
    x = torch.randint(0, 128, (1, 6))
    assert torch.equal(rt.generate(x, 5), HFRuntime(tmp_path / "gpt2", "cpu").generate(x, 5))


def test_concat_fuses_like_kinds_only() -> None:
    u = torch.randint(0, 16, (64, 128))
    a = kernels.Int4Weight(u, torch.rand(64, 1), None)
    b = kernels.Int4Weight(u[:32], torch.rand(32, 1), torch.randint(0, 16, (32, 1)).float())
    ab = kernels.concat([a, b])
    assert isinstance(ab, kernels.Int4Weight) and ab.u.shape == (96, 128)
    assert torch.equal(ab.zero_u[:64], torch.full((64, 1), 8.0))  # the symmetric one's midpoint
    assert kernels.concat([a, kernels.Int4Weight(u, torch.rand(64, 2), None)]) is None  # other group size
    assert kernels.concat([a, kernels.DenseWeight(torch.randn(8, 128))]) is None
    f = kernels.Fp8Weight(torch.zeros(16, 32, dtype=torch.float8_e4m3fn), torch.ones(16), torch.ones(1, 1))
    g = kernels.Fp8Weight(f.w, f.scale, torch.full((1, 1), 2.0))
    assert kernels.concat([f, f]) is not None and kernels.concat([f, g]) is None  # static scales must agree


def test_fused_int4_module_equals_its_parts() -> None:
    torch.manual_seed(0)
    parts = [kernels.Int4Weight(torch.randint(0, 16, (n, 256)), torch.rand(n, 2) * 0.01 + 0.001,
                                torch.randint(0, 16, (n, 2)).float()) for n in (128, 64, 64)]
    x = torch.randn(3, 256)
    fused = kernels.build(kernels.concat(parts), None, torch.float32)(x)
    each = torch.cat([kernels.build(p, None, torch.float32)(x) for p in parts], -1)
    assert torch.allclose(fused, each, atol=1e-5)
    assert "Marlin" not in kernels.kernel_name(kernels.build(parts[0], None, torch.float32))  # a CPU: not tried


# -- Marlin's layout helpers (the kernel runs on a GPU only) -------------------------------------------------
def test_marlin_is_unusable_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "NVIDIA GPU" in marlin.unusable()


def test_marlin_packing_and_permutations() -> None:
    u = torch.randint(0, 16, (64, 256))
    words = marlin.pack_along_k(u, 4)
    assert words.shape == (32, 64) and words.dtype == torch.int32
    assert torch.equal(kernels.unpack_int32(words, 4, 0), u.t())  # GPTQ's qweight layout, read by our unpacker
    u8 = torch.randint(0, 256, (64, 128))
    assert torch.equal(kernels.unpack_int32(marlin.pack_along_k(u8, 8), 8, 0), u8.t())
    s = torch.arange(2 * 128.0).reshape(2, 128)
    for channelwise in (False, True):
        p = marlin.permute_scales(s, channelwise)
        assert p.shape == s.shape and torch.equal(p.sort(-1).values, s)  # a permutation within each row
    z = torch.randint(0, 16, (2, 128))
    packed = marlin.pack_zero_points(z, 4)
    assert packed.shape == (2, 16) and torch.equal(kernels.unpack_int32(packed, 4, 1).sort(-1).values,
                                                    z.sort(-1).values)
    grouped, _ = marlin._scale_perms()  # read back in the kernel's order: interleave, then 8 x 8 blocks
    back = kernels.unpack_int32(packed, 4, 1).reshape(-1, 8)[:, torch.argsort(torch.tensor(marlin._interleave(4)))]
    assert torch.equal(back.reshape(-1, 64)[:, torch.argsort(torch.tensor(grouped))].reshape(2, 128), z.to(torch.int32))
    # the kernel library's ScalarType ids (C++ from_id): mantissa bits at 8, bias at 17, IEEE NaN flag at 50
    assert marlin.scalar_type_id(4, 8) == (1 << 50) + (8 << 17) + (4 << 8)
    assert marlin.scalar_type_id(8, 128) == (1 << 50) + (128 << 17) + (8 << 8)


def test_marlin_one_row_calls_go_to_the_tinygemm_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """MarlinLinear.use_one_row (QUANTPIPE_ONE_ROW_TINYGEMM): one-row calls run on the copy, more rows on Marlin's
    op (a stand-in here: Marlin needs a GPU), the kernel label says so, and a decode step's bytes count one copy.
    tests/test_gpu.py::test_marlin_one_row_tinygemm_copy builds it through kernels.build on a GPU."""
    from torch import nn

    from quantpipe import memory

    torch.manual_seed(0)
    n, k = 256, 512
    u, scale = torch.randint(0, 16, (n, k)), torch.rand(n, 4) * 0.01 + 0.001
    lin = marlin.MarlinLinear.__new__(marlin.MarlinLinear)  # the module without Marlin's repack (GPU only)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features, lin.out_dtype, lin.prefill_rows = k, n, torch.bfloat16, 1024
    for name, t in {"qweight": torch.zeros(k // 8, n, dtype=torch.int32), "scales": scale.t().contiguous(),
                    "workspace": torch.zeros(128, dtype=torch.int32)}.items():
        lin.register_buffer(name, t)
    lin.bias = lin.zeros = lin.one_row = None
    lin.type_id, lin.fp32_reduce, lin.label = 0, True, "Marlin W4A16 (gptq_marlin_gemm)"
    rows: list[int] = []
    monkeypatch.setitem(marlin._STATE, "op", lambda x, *a: rows.append(x.shape[0]) or x.new_zeros(x.shape[0], n))
    x = torch.randn(1, 1, k, dtype=torch.bfloat16)
    assert torch.equal(lin(x), torch.zeros(1, 1, n, dtype=torch.bfloat16)) and rows == [1]  # no copy: Marlin
    copy = kernels.int4_from_unsigned(u, scale, None, None, torch.bfloat16)
    lin.use_one_row(copy, kernels.KERNEL_NAMES[kernels.Int4Linear])
    assert lin.label == "Marlin W4A16 (gptq_marlin_gemm; one row: int4 tinygemm (_weight_int4pack_mm))"
    assert torch.equal(lin(x), copy(x)) and rows == [1]
    lin(torch.randn(2, 4, k, dtype=torch.bfloat16))
    assert rows == [1, 8]

    class Model(nn.Module):  # what decode_bytes reads: an embedding, an lm_head, the rest
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.lin, self.head = nn.Embedding(10, k), lin, nn.Linear(k, 10, bias=False)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    m = Model()
    marlin_bytes = sum(t.numel() * t.element_size() for t in (lin.qweight, lin.scales, lin.workspace))
    assert memory.decode_bytes(m) == marlin_bytes + m.head.weight.numel() * 4
    copy.alternate = False
    assert memory.decode_bytes(m) > marlin_bytes + m.head.weight.numel() * 4


@pytest.mark.parametrize("bits", [4, 8])
def test_unpacking_and_packing_in_chunks_equal_the_whole(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a large Linear unpacks and re-packs it in chunks of rows (a 152k-row lm_head whole took ~10 GiB of
    temporaries): with chunks of a few rows the result is the single-chunk one, in uint8."""
    torch.manual_seed(bits)
    u = torch.randint(0, 1 << bits, (70, 256))
    whole_words = marlin._pack_rows(u, bits)
    whole_k = kernels.unpack_int32(whole_words, bits, 1)
    whole_n = kernels.unpack_int32(marlin.pack_along_k(u, bits), bits, 0)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 3 * 256 * 24)  # 3 rows a chunk: 24 chunks, the last one short
    assert len(kernels.row_chunks(70, 256 * 24)) == 24
    assert torch.equal(marlin._pack_rows(u, bits), whole_words)
    for dim, whole in ((1, whole_k), (0, whole_n)):
        words = marlin._pack_rows(u, bits) if dim == 1 else marlin.pack_along_k(u, bits)
        got = kernels.unpack_int32(words, bits, dim)
        assert got.dtype == torch.uint8 and torch.equal(got, whole)
        assert torch.equal(got, u if dim == 1 else u.t())


def _marlin_words(u: torch.Tensor, order: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] values -> words in a Marlin-like layout whose tiles hold their values in `order` (slot -> k*64+n)."""
    n, k = u.shape
    tiles = u.t().reshape(k // 16, 16, n // 64, 64).permute(0, 2, 1, 3).reshape(k // 16, n // 64, 1024)
    return marlin._pack_rows(tiles[..., order].reshape(k // 16, -1), bits)


DEQUANT_CASES = [(4, 4, False), (4, 4, True), (8, 1, False)]


def _dequant_case(bits: int, groups: int, zp: bool, pow2: bool, fields: bool = False) -> tuple[torch.Tensor, ...]:
    """A synthetic Marlin-like weight of a random tile order (`fields`: Marlin's own, marlin.TILE_FIELDS), its
    scales, zero points and the expected W^T. `pow2`: scales that are powers of two, so every product is exact in
    bfloat16 whatever the rounding."""
    torch.manual_seed(bits)
    n, k = 128, 512
    order = torch.randperm(1024) if not fields else marlin.fields_order(bits)
    u = torch.randint(0, 1 << bits, (n, k))
    scale = (2.0 ** -torch.randint(4, 12, (groups, n)) if pow2 else torch.rand(groups, n) * 0.01 + 0.001)
    scale = scale.to(torch.bfloat16)  # [G, N]
    zero = torch.randint(4, 12, (groups, n)).to(torch.bfloat16) if zp else None
    z = torch.full_like(scale, 1 << (bits - 1)) if zero is None else zero
    g = k // groups
    want = ((u.t().float() - z.float().repeat_interleave(g, 0)) * scale.float().repeat_interleave(g, 0))
    return _marlin_words(u, order, bits), order, scale, zero, z, want.to(torch.bfloat16)


@pytest.mark.parametrize("bits,groups,zp", DEQUANT_CASES)
def test_marlin_gather_dequantizer_places_every_value(bits: int, groups: int, zp: bool) -> None:
    """The compiled gather (the dequantizer wherever Triton is missing) puts every value of a tile order back,
    scaled per group, rounded as the GPU test expects."""
    qm, order, scale, _, z, want = _dequant_case(bits, groups, zp, pow2=False)
    assert torch.equal(marlin.dequantize(qm, torch.argsort(order), scale, z, bits, 512, 128, 512 // groups), want)
    if zp:  # MarlinLinear hands its zero points over as uint8 (zeros_natural)
        zu = z.to(torch.uint8)
        assert torch.equal(marlin.dequantize(qm, torch.argsort(order), scale, zu, bits, 512, 128, 512 // groups), want)


def _as_stored(scale: torch.Tensor, zero: torch.Tensor | None, marlin_order: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The scales and zero points as a kernel is handed them: bfloat16 in natural order, or as MarlinLinear
    keeps them, the scales in Marlin's order with the order the Triton kernels read them through (what
    marlin._inverses gives MarlinLinear.dequantized) and the zero points as uint8 in natural order
    (MarlinLinear.zeros_natural)."""
    if not marlin_order:
        return scale, zero, None
    channelwise = scale.shape[0] == 1
    perm = marlin._scale_perms()[1 if channelwise else 0]
    return (marlin.permute_scales(scale, channelwise), None if zero is None else zero.to(torch.uint8),
            torch.argsort(torch.tensor(perm)).to(torch.int32))


@pytest.mark.parametrize("marlin_order", [False, True])
@pytest.mark.parametrize("bits,groups,zp", DEQUANT_CASES)
def test_marlin_triton_dequantizer_places_every_value(bits: int, groups: int, zp: bool, marlin_order: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernel in Triton's interpreter (skipped where Triton is not installed, as in CI's CPU torch;
    tests/test_gpu.py runs it on a GPU). The interpreter rounds float32 -> bfloat16 toward zero, a GPU to nearest:
    power-of-two scales make every product exact, so this checks where each value lands, its scale and zero;
    with the scales in natural order and in Marlin's (read through their permutation)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is decorated: import it afresh
    monkeypatch.delitem(sys.modules, "quantpipe.runtimes._marlin_triton", raising=False)
    _marlin_triton = importlib.import_module("quantpipe.runtimes._marlin_triton")
    qm, order, scale, zero, _, want = _dequant_case(bits, groups, zp, pow2=True)
    slots = torch.argsort(order).to(torch.int32)  # as marlin._inverses hands it over
    scale, zero, scale_order = _as_stored(scale, zero, marlin_order)
    got = _marlin_triton.dequantize(qm, slots, scale, zero, bits, 512, 128, 512 // groups, scale_order=scale_order)
    assert torch.equal(got, want)


@pytest.mark.parametrize("marlin_order", [False, True])
@pytest.mark.parametrize("bits,groups,zp", DEQUANT_CASES)
def test_marlin_fields_dequantizer_places_every_value(bits: int, groups: int, zp: bool, marlin_order: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The `fields` kernel (words loaded once, values placed by a permutation of the slot's bit fields) in
    Triton's interpreter, on weights laid out in Marlin's tile order; exact as in the test above."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "quantpipe.runtimes._marlin_triton", raising=False)
    _marlin_triton = importlib.import_module("quantpipe.runtimes._marlin_triton")
    qm, _, scale, zero, _, want = _dequant_case(bits, groups, zp, pow2=True, fields=True)
    scale, zero, scale_order = _as_stored(scale, zero, marlin_order)
    got = _marlin_triton.dequantize_fields(qm, scale, zero, bits, 512, 128, 512 // groups, scale_order=scale_order)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_marlin_tile_fields_follow_the_repack_kernels_indexing(bits: int) -> None:
    """marlin.TILE_FIELDS against gptq_marlin_repack's indexing written out (gptq_marlin_repack.cu: warp w of 4
    and thread t of 32 take rows 2 * (t % 4) + {0, 1, 8, 9} of columns 16 w + t // 4 and 8 more; the values go
    into words at t * 4 + w (4-bit) or t * 8 + 2 w + {0, 1} (8-bit) in the interleaved order). On a GPU the
    order read back from the kernel itself is compared too (marlin.fields_match, tests/test_gpu.py)."""
    per = 32 // bits
    order = torch.full((1024,), -1)
    for w in range(4):
        for t in range(32):
            rows = [2 * (t % 4) + o for o in (0, 1, 8, 9)]
            pos = [r * 64 + 16 * w + t // 4 for r in rows] + [r * 64 + 16 * w + t // 4 + 8 for r in rows]
            if bits == 4:
                for place, v in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
                    order[(t * 4 + w) * per + place] = pos[v]
            else:
                for half in (0, 1):
                    for place, v in enumerate((0, 2, 1, 3)):
                        order[(t * 8 + 2 * w + half) * per + place] = pos[4 * half + v]
    assert sorted(order.tolist()) == list(range(1024))
    assert torch.equal(marlin.fields_order(bits), order)


def test_w4_checkpoint_is_read_one_linear_at_a_time(tmp_path: Path) -> None:
    """A compressed-tensors W4 checkpoint with zero points (scripts/decode_probe.py writes the layout
    llm-compressor does): load_parts hands out readers of the packed tensors, the decoder unpacks and fuses one
    Linear at a time (the whole model unpacked is 8x its packed bytes: 28 GB for a 7B), and its logits follow
    transformers' own loading of the checkpoint."""
    import sys

    from quantpipe import artifact
    from quantpipe.artifact import ArtifactMeta

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import decode_probe

    src = build_family(tmp_path / "src", "qwen2", {"hidden_size": 256, "intermediate_size": 512,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2})
    artifact.write(src, ArtifactMeta(format="safetensors", weights="random", arch="tiny"))
    out = tmp_path / "w4"
    decode_probe.make_w4(src, out, asym=True, group=128)
    model, records, dtype = kernels.load_parts(out, "cpu")
    assert len(records) == 2 * 7 and all(callable(r) for r, _ in records.values())
    packed = records["model.layers.0.mlp.down_proj"][0].args[0]
    assert packed["weight_packed"].dtype == torch.int32 and "weight_zero_point" in packed  # not unpacked yet
    dec, line = decoder.build(model, records, dtype, "cpu")
    assert records == {} and "int4 tinygemm" in line
    assert isinstance(dec.layers[0].qkv, kernels.Int4Linear) and dec.layers[0].qkv.out_features == 256 + 2 * 128
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    got = compiled.CompiledRuntime(out, "cpu").logits(ids)
    want = HFRuntime(out, "cpu").logits(ids)  # compressed-tensors dequantizes the same values
    assert (got - want).norm() / want.norm() < 2e-3


def test_marlin_names_the_shapes_it_cannot_take() -> None:
    """What a row's kernel line says when a weight stays on torch's kernels on a GPU."""
    assert marlin.shape_problem(4608, 3584, 128, 4, torch.bfloat16) is None  # Qwen2-7B's fused q/k/v
    assert marlin.shape_problem(37888, 3584, 3584, 8, torch.bfloat16) is None  # per channel, 8-bit
    assert "64 x 128" in marlin.shape_problem(576, 1536 + 8, 64, 4, torch.bfloat16)
    assert "bfloat16" in marlin.shape_problem(4608, 3584, 128, 4, torch.float32)
    assert "groups are 32, 64, 128" in marlin.shape_problem(4608, 3584, 256, 4, torch.bfloat16)
    mod = kernels.build(kernels.Int8Weight(torch.zeros(64, 128, dtype=torch.int8), torch.ones(64), False), None,
                        torch.float32)
    mod.fallback = "Marlin is built here for bfloat16 models (this one is float32)"
    assert kernels.kernel_name(mod) == ("int8 weight-only (_weight_int8pack_mm); Marlin not used: Marlin is built "
                                        "here for bfloat16 models (this one is float32)")


def test_marlin_sources_are_generated_in_our_build_directory(tmp_path: Path) -> None:
    """The part of Marlin's build that needs no GPU: the shipped sources copied, the package's generator run on
    the copy (the installed package stays as it is), every kernel instance listed for the compiler."""
    root = marlin.sources_dir()
    if root is None:
        pytest.skip("gptqmodel is not installed")
    before = sorted(p.name for p in root.iterdir())
    files = marlin.prepare_sources(tmp_path)
    assert [Path(f).name for f in files[:4]] == ["marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu",
                                                 "gptq_marlin_repack.cu", "awq_marlin_repack.cu"]
    kernels_ = [Path(f).name for f in files[4:]]
    assert len(kernels_) >= 2 and all(n.startswith("kernel_bf16_") for n in kernels_)
    assert all(Path(f).is_file() and str(tmp_path) in f for f in files)
    assert sorted(p.name for p in root.iterdir()) == before


def test_comparison_switches_reject_bad_values(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantpipe.errors import QuantpipeError

    monkeypatch.setenv("QUANTPIPE_DECODE_ATTN", "flash")
    with pytest.raises(QuantpipeError, match="QUANTPIPE_DECODE_ATTN=flash: one of matmul, sdpa-gqa, sdpa-expand, flex"):
        compiled.CompiledRuntime(tiny_model, "cpu")
    monkeypatch.setenv("QUANTPIPE_MARLIN_PREFILL_ROWS", "lots")
    with pytest.raises(QuantpipeError, match="QUANTPIPE_MARLIN_PREFILL_ROWS=lots: a whole number"):
        marlin.prefill_rows()
    monkeypatch.setenv("QUANTPIPE_MARLIN_PREFILL_ROWS", "64")
    assert marlin.prefill_rows() == 64
    monkeypatch.delenv("QUANTPIPE_MARLIN_PREFILL_ROWS")
    assert marlin.prefill_rows() == marlin.PREFILL_ROWS == 255
    monkeypatch.setenv("QUANTPIPE_MARLIN_DEQUANT", "fast")
    with pytest.raises(QuantpipeError, match="QUANTPIPE_MARLIN_DEQUANT=fast: one of triton, fields, gather"):
        marlin.triton_dequant()
    monkeypatch.setenv("QUANTPIPE_MARLIN_DEQUANT", "gather")
    assert marlin.triton_dequant() is None
    monkeypatch.delenv("QUANTPIPE_MARLIN_DEQUANT")
    assert marlin.dequant_mode() == "fields"  # the defaults
    assert marlin.fp32_reduce() is True and marlin.one_row_tinygemm() is True
    monkeypatch.setenv("QUANTPIPE_MARLIN_FP32_REDUCE", "0")
    monkeypatch.setenv("QUANTPIPE_ONE_ROW_TINYGEMM", "0")
    assert marlin.fp32_reduce() is False and marlin.one_row_tinygemm() is False
    monkeypatch.setenv("QUANTPIPE_MARLIN_FP32_REDUCE", "yes")
    with pytest.raises(QuantpipeError, match=r"QUANTPIPE_MARLIN_FP32_REDUCE=yes: 1 \(float32 partial sums\) or 0"):
        marlin.fp32_reduce()
    monkeypatch.setenv("QUANTPIPE_ONE_ROW_TINYGEMM", "on")
    with pytest.raises(QuantpipeError,
                       match=r"QUANTPIPE_ONE_ROW_TINYGEMM=on: 1 \(a tinygemm copy for one row, the default\) or 0"):
        marlin.one_row_tinygemm()


def test_prompt_prefetch_switch_and_what_it_touches(monkeypatch: pytest.MonkeyPatch) -> None:
    """QUANTPIPE_PREFILL_PREFETCH parses like the other switches; a layer lists its four weight modules in call
    order (a Concat's parts in place); prefetch leaves modules that are not Marlin's alone (on a CPU, all)."""
    from quantpipe.errors import QuantpipeError

    assert marlin.prefill_prefetch() is False
    monkeypatch.setenv("QUANTPIPE_PREFILL_PREFETCH", "1")
    assert marlin.prefill_prefetch() is True
    monkeypatch.setenv("QUANTPIPE_PREFILL_PREFETCH", "yes")
    with pytest.raises(QuantpipeError, match="QUANTPIPE_PREFILL_PREFETCH=yes: 1 .* or 0"):
        marlin.prefill_prefetch()
    lin = [torch.nn.Linear(4, 4) for _ in range(5)]
    layer = decoder.Layer(decoder.Concat(lin[:2]), lin[2], lin[3], lin[4], torch.ones(4), torch.ones(4), 1e-6, None)
    assert layer.projections() == lin
    marlin.prefetch(layer.projections(), 10_000)
    assert all(not hasattr(m, "prefetched") for m in lin)


def test_many_runtimes_compile_their_step_in_one_process(tiny_model: Path) -> None:
    """Every CompiledRuntime compiles the same `_decode_one` code, one graph per batch size and cache length
    (dynamic=False); more than dynamo's default 8 graphs of it in one process (a bench or test session over
    many artifacts and batch sizes; at the default, fullgraph=True fails with FailOnRecompileLimitHit) must
    still compile. The eager backend stands in for Inductor to keep this fast."""
    import torch._dynamo.config as dc

    saved = dc.recompile_limit, dc.accumulated_recompile_limit  # (monkeypatch would delete config entries)
    try:
        dc.recompile_limit, dc.accumulated_recompile_limit = 8, 256  # dynamo's defaults
        compiled.set_inductor_flags()
        assert dc.recompile_limit >= compiled.RECOMPILE_LIMIT
        torch._dynamo.reset()
        x = torch.randint(0, 100, (1, 5))
        keep = []
        for i in range(12):
            rt = compiled.CompiledRuntime(tiny_model, "cpu", compile=False)
            rt._step = torch.compile(rt._decode_one, backend="eager", fullgraph=True, dynamic=False)
            keep.append(rt)
            assert rt.generate(x.repeat(1 + i, 1), 3).shape == (1 + i, 3)
    finally:
        dc.recompile_limit, dc.accumulated_recompile_limit = saved
        torch._dynamo.reset()


def test_prompt_graphs_capture_a_shape_the_second_time_and_keep_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt-graph policy, with stand-ins for the eager pass and the capture: a shape's first prompt runs
    eagerly, its second captures and replays, later ones replay; at most `keep` graphs stay (least recently used
    dropped); a capture that fails warns once and leaves every prompt eager. QUANTPIPE_PROMPT_GRAPH parses like
    the other switches; on a CPU the runtime has no prompt graphs."""
    from quantpipe.errors import QuantpipeError

    calls: list[tuple[str, int]] = []

    def eager(ids: torch.Tensor, cache: object) -> torch.Tensor:
        calls.append(("eager", ids.shape[1]))
        return ids[:, -1:] + 1

    def capture(ids: torch.Tensor, cache: object) -> compiled.Replay:
        calls.append(("capture", ids.shape[1]))
        return lambda x: (calls.append(("replay", x.shape[1])), x[:, -1:] + 1)[1]

    pg = compiled.PromptGraphs(eager, capture, keep=2)
    x = {t: torch.arange(t).unsqueeze(0) for t in (3, 4, 5)}
    for t in (3, 3, 3):
        assert pg((1, t, 0), x[t], None).tolist() == [[t]]
    assert calls == [("eager", 3), ("capture", 3), ("replay", 3), ("replay", 3)]
    calls.clear()
    for t in (4, 4, 5, 5, 3):  # 4 and 5 captured: 3, the least recently used, is dropped; seen, so captured again
        pg((1, t, 0), x[t], None)
    assert [c for c in calls if c[0] == "capture"] == [("capture", 4), ("capture", 5), ("capture", 3)]
    assert list(pg.graphs) == [(1, 5, 0), (1, 3, 0)] and pg.captures == 4
    assert pg((2, 3, 0), x[3].repeat(2, 1), None).shape == (2, 1)  # another batch size is another shape
    assert calls[-1] == ("eager", 3)

    def broken(ids: torch.Tensor, cache: object) -> compiled.Replay:
        raise RuntimeError("operation not permitted when stream is capturing")

    pg = compiled.PromptGraphs(eager, broken)
    calls.clear()
    pg((1, 3, 0), x[3], None)
    with pytest.warns(UserWarning, match="prompts stay eager: RuntimeError: operation not permitted"):
        assert pg((1, 3, 0), x[3], None).tolist() == [[3]]
    pg((1, 3, 0), x[3], None)
    assert calls == [("eager", 3)] * 3 and not pg.graphs and "not permitted" in pg.failed

    assert compiled.prompt_graphs() is True
    monkeypatch.setenv("QUANTPIPE_PROMPT_GRAPH", "0")
    assert compiled.prompt_graphs() is False
    monkeypatch.setenv("QUANTPIPE_PROMPT_GRAPH", "on")
    with pytest.raises(QuantpipeError, match=r"QUANTPIPE_PROMPT_GRAPH=on: 1 \(replay .*\) or 0"):
        compiled.prompt_graphs()


def test_generate_runs_its_prompt_through_the_prompt_graphs(tiny_model: Path) -> None:
    """generate's prompt goes through `PromptGraphs` keyed by (batch, length, cache): here with a stand-in capture
    that replays the eager pass, the tokens equal the runtime's without prompt graphs (on a CPU it has none)."""
    rt = compiled.CompiledRuntime(tiny_model, "cpu", compile=False)
    assert rt.prompts is None and "CUDA graph" not in rt.engine
    x = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    want = rt.generate(x, 4)
    keys = []

    def capture(ids: torch.Tensor, cache: object) -> compiled.Replay:
        keys.append((ids.shape, cache))
        return lambda y: rt._prompt_eager(y, cache)

    rt.prompts = compiled.PromptGraphs(rt._prompt_eager, capture)
    for _ in range(3):
        assert torch.equal(rt.generate(x, 4), want)
    assert len(keys) == 1 and keys[0][1] is rt._cache(2, rt.cache_length(7, 4))
    rt.close()
    assert not rt.prompts.graphs
