"""CUDA branches of the HF runtime, the bench (device_map, synchronize, peak GPU memory) and the compiled engine
(CUDA-graph decode, the int4/int8/W8A8 kernels on CUDA against their CPU builds).

Skipped where no CUDA device is visible (CI); on the lent GPU machine run (after carrying the wheels that
docs/benchmarks.md lists in .whl/):
    bash scripts/gpu_session.sh tests        # or: python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_results, tiny_recipe, write_recipe

from quantpipe import runtimes
from quantpipe.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_run_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["bench"]["device"] = "cuda"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    res = read_results(tmp_path / "run")
    assert res.hardware["cuda"] and res.hardware["gpu"]
    for v in res.variants:
        assert v.speed.device == "cuda"
        assert v.speed.per_batch["1"].decode_tok_s > 0
    base, int8 = res.variants
    assert base.quality.kld_mean == 0 and int8.quality.kld_mean > 0


def test_cuda_logits_match_cpu(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[{"name": "baseline", "method": "baseline"}])
    recipe["bench"]["enabled"] = False
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    art = tmp_path / "run" / "artifacts" / "baseline"
    ids = list(range(1, 65))
    cpu, gpu = runtimes.load(art, "cpu"), runtimes.load(art, "cuda")
    assert gpu.device == "cuda"
    assert torch.allclose(cpu.logits(ids), gpu.logits(ids), atol=1e-3, rtol=1e-3)
    x = torch.tensor([ids[:16]])
    assert gpu.generate(x, 5).shape == (1, 5)


def test_compiled_engine_on_cuda_follows_eager(tiny_model: Path, tmp_path: Path) -> None:
    """The CUDA-graph decode (static cache, torch.compile reduce-overhead) continues as transformers' eager
    generate does, and a second call with the same shapes replays the captured graphs."""
    from quantpipe.runtimes import compiled

    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[{"name": "baseline", "method": "baseline"}])
    recipe["bench"]["enabled"] = False
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    art = tmp_path / "run" / "artifacts" / "baseline"
    eager, fast = runtimes.load(art, "cuda", "natural"), compiled.CompiledRuntime(art, "cuda")
    assert fast.compiled and "CUDA graphs" in fast.engine
    x = torch.tensor([list(range(5, 37)), list(range(40, 72))])
    want = eager.generate(x, 12)
    got = fast.generate(x, 12)
    assert (got == want).float().mean() >= 0.9, (got, want)
    assert torch.equal(fast.generate(x, 12), got)


def test_int4_and_int8_kernels_cuda_match_cpu() -> None:
    from quantpipe.runtimes import kernels

    torch.manual_seed(0)
    n, k, g = 256, 384, 128  # K padded to 384 -> 384 (multiple of 128); N multiple of 8
    u = torch.randint(0, 16, (n, k))
    scale, zero = torch.rand(n, k // g) * 0.02 + 0.001, torch.randn(n, k // g) * 0.01
    x = torch.randn(3, k, dtype=torch.bfloat16)
    cpu = kernels.Int4Linear(u, scale, zero, g, None, torch.bfloat16)(x)
    gpu = kernels.Int4Linear(u.cuda(), scale.cuda(), zero.cuda(), g, None, torch.bfloat16)(x.cuda())
    assert torch.allclose(cpu.float(), gpu.float().cpu(), atol=0.05, rtol=0.02)
    q, s = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01
    cpu8 = kernels.Int8Linear(q, s, None, torch.bfloat16)(x)
    gpu8 = kernels.Int8Linear(q.cuda(), s.cuda(), None, torch.bfloat16)(x.cuda())
    assert torch.allclose(cpu8.float(), gpu8.float().cpu(), atol=0.05, rtol=0.02)
    dyn = kernels.Int8DynamicLinear(q.cuda(), s.cuda(), None)(x.cuda()).float().cpu()  # M = 3 < 17: padded
    ref = kernels.Int8DynamicLinear(q, s, None)(x).float()
    # activations are rounded to int8 on each device: a value at a rounding tie may land one step apart
    assert (dyn - ref).norm() / ref.norm() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores need compute capability 8.9+")
@pytest.mark.parametrize("static", [False, True])
def test_fp8_kernel_cuda_matches_the_dequantized_matmul(static: bool) -> None:
    """Fp8Linear on Hopper's FP8 tensor cores (`_scaled_mm`, row-wise scales) against the dequantized product
    computed in float32, at the decode and prefill row counts (torch 2.11's CPU `_scaled_mm` takes per-tensor
    scales only, so the CPU build is no reference there)."""
    from quantpipe.runtimes.kernels import FP8_MAX, Fp8Linear

    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    ws = w.abs().amax(1, keepdim=True) / FP8_MAX
    wq = (w / ws).to(torch.float8_e4m3fn)
    for m in (1, 8, 33, 512):
        x = torch.randn(m, 1024, dtype=torch.bfloat16)
        xs = (x.float().abs().amax() / FP8_MAX).reshape(1) if static else None
        sx = xs if static else x.float().abs().amax(-1, keepdim=True) / FP8_MAX
        xq = (x.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * sx
        want = xq @ (wq.float() * ws).t()
        gpu = Fp8Linear(wq.cuda(), ws.cuda(), None if xs is None else xs.cuda(), None, torch.bfloat16)(x.cuda())
        # relative error over the whole output: an activation whose FP8 rounding ties break the other way on the
        # GPU moves single outputs by a few bf16 steps (measured at M = 512: 1.97 of 143), never the whole
        rel = ((gpu.float().cpu() - want).norm() / want.norm()).item()
        assert rel < 5e-3, (m, rel)


# -- Marlin and the decoder (issue: GPU decode at the bandwidth limit) -------------------------------------------
def _marlin_or_skip() -> None:
    from quantpipe.runtimes import marlin

    why = marlin.unusable()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("bits,sym,groups", [(4, True, 4), (4, False, 4), (4, True, 1), (8, True, 1)])
@pytest.mark.parametrize("m", [1, 8, 32, 200, 1100])  # 1100 > marlin.PREFILL_ROWS (255): the dequantized path
def test_marlin_matches_the_dequantized_matmul(bits: int, sym: bool, groups: int, m: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Marlin (decode rows) and the dequantized dense path (m > PREFILL_ROWS) against the plain arithmetic;
    the weight read back from the Marlin layout (by both Triton kernels and by the compiled gather) equals the one
    it was built from."""
    _marlin_or_skip()
    from quantpipe.runtimes import marlin

    torch.manual_seed(bits + m)
    n, k = 384, 512
    u = torch.randint(0, 1 << bits, (n, k), device="cuda")
    scale = torch.rand(n, groups, device="cuda") * 0.01 + 0.001
    zero = None if sym else torch.randint(4, 12, (n, groups), device="cuda").float()
    lin = marlin.MarlinLinear(u, scale, zero, bits, None, torch.bfloat16)
    g = k // groups
    mid = 1 << (bits - 1)
    z = torch.full_like(scale, mid) if zero is None else zero
    w = (u.float() - z.repeat_interleave(g, 1)) * scale.to(torch.bfloat16).float().repeat_interleave(g, 1)
    assert marlin.triton_dequant() is not None
    assert torch.equal(lin.dequantized().float(), w.t().to(torch.bfloat16).float())
    assert marlin.fields_match(bits, u.device)  # the repack's tile order is TILE_FIELDS' permutation
    for mode in ("gather", "triton"):  # the default (`fields`) ran above
        with monkeypatch.context() as mp:
            mp.setenv("QUANTPIPE_MARLIN_DEQUANT", mode)
            assert torch.equal(lin.dequantized().float(), w.t().to(torch.bfloat16).float()), mode
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    y = lin(x).float()
    assert y.shape == (m, n)
    assert (y - ref).norm() / ref.norm() < 5e-3, (y - ref).norm() / ref.norm()
    lin.fp32_reduce = False  # split-K partial sums in bfloat16 (QUANTPIPE_MARLIN_FP32_REDUCE=0)
    y = lin(x).float()
    assert (y - ref).norm() / ref.norm() < 5e-3, (y - ref).norm() / ref.norm()


@pytest.mark.parametrize("sym", [True, False])
def test_marlin_one_row_tinygemm_copy(sym: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default kernels.build gives a small 4-bit weight a tinygemm copy for one-row calls (both kernels'
    results against the plain arithmetic); a weight over ONE_ROW_MAX_ELEMENTS gets none, nor does any with
    QUANTPIPE_ONE_ROW_TINYGEMM=0."""
    _marlin_or_skip()
    from quantpipe.runtimes import kernels, marlin

    monkeypatch.delenv("QUANTPIPE_ONE_ROW_TINYGEMM", raising=False)
    torch.manual_seed(0)
    n, k = 384, 512
    u = torch.randint(0, 16, (n, k), device="cuda")
    scale = torch.rand(n, 4, device="cuda") * 0.01 + 0.001
    zero = None if sym else torch.randint(4, 12, (n, 4), device="cuda").float()
    lin = kernels.build(kernels.Int4Weight(u, scale, zero), None, torch.bfloat16)
    assert isinstance(lin, marlin.MarlinLinear) and isinstance(lin.one_row, kernels.Int4Linear)
    assert "one row: int4 tinygemm" in kernels.kernel_name(lin)
    z = torch.full_like(scale, 8) if zero is None else zero
    w = (u.float() - z.repeat_interleave(128, 1)) * scale.to(torch.bfloat16).float().repeat_interleave(128, 1)
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        y = lin(x).float()
        assert (y - ref).norm() / ref.norm() < 1e-2, (m, (y - ref).norm() / ref.norm())
    monkeypatch.setattr(marlin, "ONE_ROW_MAX_ELEMENTS", n * k - 1)
    assert kernels.build(kernels.Int4Weight(u, scale, zero), None, torch.bfloat16).one_row is None
    monkeypatch.setattr(marlin, "ONE_ROW_MAX_ELEMENTS", n * k)
    monkeypatch.setenv("QUANTPIPE_ONE_ROW_TINYGEMM", "0")
    assert kernels.build(kernels.Int4Weight(u, scale, zero), None, torch.bfloat16).one_row is None


def test_marlin_load_memory_is_bounded() -> None:
    """Reading and repacking a large packed Linear (an lm_head's shape) takes its uint8 values, the repacked words
    and kernels.CHUNK_BYTES of temporaries, not the int32/int64 copies of the whole that once cost ~10 GiB."""
    _marlin_or_skip()
    from quantpipe.runtimes import kernels, marlin

    n, k, group = 65536, 3584, 128
    words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")  # compressed-tensors
    scale = torch.rand(n, k // group, device="cuda") * 0.01
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    u = kernels.unpack_int32(words, 4, 1)
    lin = marlin.MarlinLinear(u, scale, None, 4, None, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    packed = words.numel() * 4
    assert u.dtype == torch.uint8 and lin.qweight.numel() * 4 == packed
    # u (2x packed), the GPTQ-layout words and the repacked ones (1x each), the chunks' temporaries
    assert extra <= 4 * packed + 4 * kernels.CHUNK_BYTES, (extra / 2**20, packed / 2**20)


@pytest.mark.parametrize("attn", ["matmul", "flex"])
def test_decoder_on_cuda_equals_transformers(tmp_path: Path, attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's logits in bfloat16 on the GPU against transformers' own (bf16 tolerance), and the
    CUDA-graph decode's greedy tokens against transformers' greedy generate; with the default decode attention
    and with FlexAttention's decoding kernel."""
    from test_decoder import FAMILIES, build_family
    from transformers import AutoModelForCausalLM

    from quantpipe.runtimes import compiled

    monkeypatch.setenv("QUANTPIPE_DECODE_ATTN", attn)

    for name, (mt, extra) in FAMILIES.items():
        path = build_family(tmp_path / name, mt, extra)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        m.save_pretrained(tmp_path / f"{name}-bf16")
        bf = tmp_path / f"{name}-bf16"
        fast = compiled.CompiledRuntime(bf, "cuda")
        ref = AutoModelForCausalLM.from_pretrained(bf, device_map="cuda")
        ids = list(range(3, 43))
        got = fast.logits(ids)
        want = ref(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        assert (got - want).norm() / want.norm() < 2e-2, name
        # greedy tokens against transformers' own greedy generate (the eager decoder rounds differently from the
        # compiled step: on mistral-window it flips a one-bf16-step tie, 1.898 vs 1.891, that the graph does not)
        x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        want = ref.generate(x.cuda(), max_new_tokens=10, do_sample=False)[:, 12:].cpu()
        assert (fast.generate(x, 10) == want).float().mean() >= 0.9, name


def test_marlin_prompt_prefetch_gives_the_same_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUANTPIPE_PREFILL_PREFETCH=1: a prompt dequantizes each next layer on a second stream; its logits equal
    the same prompt dequantized layer by layer on one stream (the same kernels, so bit for bit), and no
    prefetched weight is left behind."""
    _marlin_or_skip()
    import sys

    from test_decoder import build_family

    from quantpipe import artifact
    from quantpipe.artifact import ArtifactMeta
    from quantpipe.runtimes import compiled, marlin

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import decode_probe

    src = build_family(tmp_path / "src", "llama", {"hidden_size": 256, "intermediate_size": 512,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2})
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    artifact.write(tmp_path / "bf16", ArtifactMeta(format="safetensors", weights="random", arch="tiny"))
    decode_probe.make_w4(tmp_path / "bf16", tmp_path / "w4", True, 128)
    monkeypatch.setenv("QUANTPIPE_MARLIN_PREFILL_ROWS", "16")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    rt = compiled.CompiledRuntime(tmp_path / "w4", "cuda", compile=False)
    want = rt.logits(ids)
    monkeypatch.setenv("QUANTPIPE_PREFILL_PREFETCH", "1")
    got = rt.logits(ids)
    assert torch.equal(got, want)
    mods = [m for m in rt.model.modules() if isinstance(m, marlin.MarlinLinear)]
    assert mods and all(m.prefetched is None for m in mods)


@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_marlin_prompt_graph_replays_the_eager_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               prefetch: str) -> None:
    """A W4 prompt (dequantized above 16 rows, with and without the next layer prefetched on a second stream)
    replayed from its CUDA graph writes the cache and picks the token the eager pass does, bit for bit (the same
    kernels); the capture holds about two layers' dequantized weights at a time, not every layer's (8 layers of
    ~14 MB here); generate's tokens are those of a runtime without prompt graphs."""
    _marlin_or_skip()
    import sys

    from test_decoder import build_family
    from transformers import AutoModelForCausalLM

    from quantpipe import artifact
    from quantpipe.artifact import ArtifactMeta
    from quantpipe.runtimes import compiled

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import decode_probe

    src = build_family(tmp_path / "src", "qwen2", {"hidden_size": 512, "intermediate_size": 4096,
                                                   "num_hidden_layers": 8, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "max_position_embeddings": 1024})
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    artifact.write(tmp_path / "bf16", ArtifactMeta(format="safetensors", weights="random", arch="tiny"))
    decode_probe.make_w4(tmp_path / "bf16", tmp_path / "w4", False, 128)
    monkeypatch.setenv("QUANTPIPE_MARLIN_PREFILL_ROWS", "16")
    monkeypatch.setenv("QUANTPIPE_PREFILL_PREFETCH", prefetch)
    rt = compiled.CompiledRuntime(tmp_path / "w4", "cuda")
    assert rt.prompts is not None and "prompts of a shape seen before replayed" in rt.engine
    x = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(4)).cuda()
    cache = rt._cache(2, rt.cache_length(200, 8))
    with torch.inference_mode():
        want = rt._prompt(x, cache)  # first sight: eager
        keys = [k[:, :, :200].clone() for k, _ in cache]
        for k, v in cache:
            k.zero_(), v.zero_()
        warm, a = torch.cuda.CUDAGraph(), torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
        with torch.cuda.graph(warm):  # cuBLAS's workspace for the capture stream (32 MiB on sm90): made once
            a @ a
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = rt._prompt(x, cache)  # second: captured, then replayed
        held = torch.cuda.max_memory_allocated() - base
        assert rt.prompts.captures == 1 and torch.equal(got, want)
        assert all(torch.equal(k[:, :, :200], w) for (k, _), w in zip(cache, keys, strict=True))
        layer = sum(m.dequantized().numel() * 2 for m in rt.model.layers[0].projections())
        assert held < 4 * layer, (held / 2**20, layer / 2**20)
        assert torch.equal(rt._prompt(x, cache), want) and rt.prompts.captures == 1
    tokens = rt.generate(x.cpu(), 8)
    assert torch.equal(rt.generate(x.cpu(), 8), tokens)
    monkeypatch.setenv("QUANTPIPE_PROMPT_GRAPH", "0")
    plain = compiled.CompiledRuntime(tmp_path / "w4", "cuda")
    assert plain.prompts is None
    assert torch.equal(plain.generate(x.cpu(), 8), tokens)


def test_marlin_runs_a_w4_checkpoint_in_the_compiled_engine(tmp_path: Path) -> None:
    """A compressed-tensors W4 checkpoint (symmetric and with zero points) on Marlin through the CUDA-graph
    decode, against the same checkpoint on tinygemm (the kernel the engine used before)."""
    _marlin_or_skip()
    import sys

    from test_decoder import build_family
    from transformers import AutoModelForCausalLM

    from quantpipe import artifact
    from quantpipe.artifact import ArtifactMeta
    from quantpipe.runtimes import compiled, marlin

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import decode_probe

    src = build_family(tmp_path / "src", "qwen2", {"hidden_size": 256, "intermediate_size": 512,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "max_position_embeddings": 1024})
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    artifact.write(tmp_path / "bf16", ArtifactMeta(format="safetensors", weights="random", arch="tiny"))
    for asym in (False, True):
        out = tmp_path / f"w4-{asym}"
        decode_probe.make_w4(tmp_path / "bf16", out, asym, 128)
        fast = compiled.CompiledRuntime(out, "cuda")
        assert "Marlin" in fast.kernels and "not used" not in fast.kernels, fast.kernels
        x = torch.randint(0, 256, (2, 600), generator=torch.Generator().manual_seed(2))  # > PREFILL_ROWS rows
        got = fast.generate(x, 8)
        state = dict(marlin._STATE)
        marlin._STATE["reason"] = "off for the comparison"
        try:
            slow = compiled.CompiledRuntime(out, "cuda", compile=False)
        finally:
            marlin._STATE.clear()
            marlin._STATE.update(state)
        assert "tinygemm" in slow.kernels
        agree = (got == slow.generate(x, 8)).float().mean()
        assert agree >= 0.8, (asym, agree, got.tolist())
        ids = x[0].tolist()
        a, b = fast.logits(ids), slow.logits(ids)
        assert (a - b).norm() / b.norm() < 2e-2, (asym, (a - b).norm() / b.norm())
