"""The GPU path's CPU-testable parts: the compiled engine's kernels and static-cache decode (CPU builds of torch's
low-bit kernels, no compiling), the bench's bandwidth-limit figures, and random-weight models of shipped shapes
(`model: {arch, weights: random}`), which refuse quality evaluation. The CUDA branches: tests/test_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_results, write_recipe

from quantpipe import archs, artifact, bench, memory, runtimes
from quantpipe.cli import main
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import parse_recipe
from quantpipe.results import Results
from quantpipe.runtimes import compiled, kernels

TINY_ARCH = {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 1024, "tie_word_embeddings": False}


# -- kernels ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_unpack_reads_compressed_tensors_packing(bits: int, dim: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = torch.randint(lo, hi + 1, (64, 96), dtype=torch.int8)
    u = kernels.unpack_int32(pack_to_int32(v, bits, packed_dim=dim), bits, dim)
    assert torch.equal(u[:64, :96], v.to(torch.int32) + (1 << (bits - 1)))


@pytest.mark.parametrize("n,k,group", [(256, 256, 128), (20, 192, 64), (72, 576, 32)])
def test_int4_linear_is_the_grouped_dequantized_matmul(n: int, k: int, group: int) -> None:
    """tinygemm's arithmetic, sizes that need padding (K not a multiple of 128, N not of 8) included."""
    torch.manual_seed(0)
    u = torch.randint(0, 16, (n, k))
    scale, zero_u = torch.rand(n, k // group) * 0.02 + 0.002, torch.randint(0, 16, (n, k // group))
    lin = kernels.int4_from_unsigned(u, scale, zero_u, None, torch.float32)
    w = (u.float() - zero_u.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    x = torch.randn(5, k)
    y = lin(x)
    assert y.shape == (5, n) and y.dtype == torch.float32
    ref = x @ w.t()
    assert (y - ref).norm() / ref.norm() < 0.01  # bfloat16 activations and scales


def test_int8_linears_match_float_arithmetic() -> None:
    torch.manual_seed(0)
    q, s = torch.randint(-127, 128, (48, 128), dtype=torch.int8), torch.rand(48) * 0.01
    x = torch.randn(2, 3, 128)
    ref = x @ (q.float() * s[:, None]).t()
    wo = kernels.Int8Linear(q, s.view(-1, 1), torch.ones(48), torch.float32)(x)
    assert wo.shape == (2, 3, 48) and torch.allclose(wo, ref + 1, atol=1e-3, rtol=1e-3)
    dyn = kernels.Int8DynamicLinear(q, s, None)(x)
    assert (dyn - ref).norm() / ref.norm() < 0.02  # activations rounded to int8 per token


@pytest.mark.parametrize("vocab", [100, 152_064, 49_152 + 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_is_argmax_first_of_ties(vocab: int, dtype: torch.dtype) -> None:
    """The two-stage pick equals argmax, ties (inside a slice, across slices, at the padded end) included."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g).to(dtype)
    x[1, vocab // 3] = x[1, vocab // 2] = x[1].max() + 1  # the same maximum in two slices
    x[2, 5] = x[2, 6] = x[2].max() + 1  # twice inside one slice
    x[3, -1] = x[3].max() + 1  # the last position (next to the padding)
    x[4] = 0.5  # all equal: the first
    x[5, 0] = -float("inf")
    got = compiled.greedy(x)
    assert got.shape == (6, 1) and got.dtype == torch.int64
    assert torch.equal(got, x.argmax(-1, keepdim=True))
    assert got[1, 0] == vocab // 3 and got[2, 0] == 5 and got[3, 0] == vocab - 1 and got[4, 0] == 0


def test_greedy_pick_compiles_to_argmax() -> None:
    """Under torch.compile (Inductor's CPU code here; CUDA graphs on a GPU) the pick is still argmax."""
    x = torch.randn(3, 152_064, generator=torch.Generator().manual_seed(0))
    x[0, 70_000] = x[0, 90_000] = 99.0
    fn = torch.compile(compiled.greedy, fullgraph=True, dynamic=False)
    assert torch.equal(fn(x), x.argmax(-1, keepdim=True))


def test_decode_limit_and_bytes(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    total = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # rotary inv_freq too
    emb = m.get_input_embeddings().weight
    assert memory.decode_bytes(m) == total - emb.numel() * emb.element_size()  # untied: the gather is free
    cfg = m.config
    assert memory.kv_bytes_per_position(cfg, torch.bfloat16) == 2 * cfg.num_hidden_layers * 2 * 32 * 2
    # 1 GB/s, 1 MB of weights, no KV: 1000 tokens/s per sequence, shared by the batch's one weight read
    assert bench.decode_limit(10**6, 0, 100, 1, 1e9) == pytest.approx(1000)
    assert bench.decode_limit(10**6, 1000, 100, 4, 1e9) == pytest.approx(4 * 1e9 / (10**6 + 4 * 10**5))
    assert bench.decode_limit(None, 0, 100, 1, 1e9) is None
    assert bench.copy_bandwidth("cpu", mib=8, repeats=2) > 1e8


# -- the engine on a transformers artifact ------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    """A random-weight model of a small shape (a config.json), quantized three ways, benchmarked by the
    compiled engine; eval off, speed and size gates on."""
    tmp = tmp_path_factory.mktemp("random")
    (tmp / "arch.json").write_text(json.dumps(TINY_ARCH))
    recipe = {
        "name": "random-tiny",
        "model": {"arch": str(tmp / "arch.json"), "weights": "random", "dtype": "bfloat16", "seed": 3},
        "calibration": {"n_samples": 4, "seq_len": 64},
        "variants": [{"name": "baseline", "method": "baseline"},
                     {"name": "int8", "method": "int8"},
                     {"name": "int8-dyn", "method": "int8", "scheme": "dynamic"},
                     {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 128}],
        "eval": {"enabled": False},
        "bench": {"device": "cpu", "runtimes": ["compiled"], "prompt_len": 32, "gen_len": 16, "batch_sizes": [1, 2],
                  "repeats": 2},
        "gates": {"all": {"max_size_ratio": 0.7}},
        "output": {"dir": str(tmp / "run")},
    }
    assert main(["run", str(write_recipe(tmp / "r.yaml", recipe)), "--gate"]) == 0
    return tmp / "run", read_results(tmp / "run")


def test_random_weights_are_marked_everywhere(random_run: tuple[Path, Results]) -> None:
    run_dir, res = random_run
    assert res.weights == "random" and res.eval["random_ids"]
    for v in res.variants:
        assert v.weights == "random" and v.quality is None and v.lm_eval is None
        meta = artifact.read(run_dir / "artifacts" / v.name)
        assert meta.weights == "random" and meta.arch.endswith("arch.json") and meta.seed == 3
    assert "**random weights**" in (run_dir / "matrix.md").read_text()
    assert "random weights" in (run_dir / "matrix.html").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["recipe_content"]["model"]["weights"] == "random"
    assert not (run_dir / "artifacts" / "baseline" / "tokenizer.json").exists()


def test_random_model_has_the_shape_and_seed(random_run: tuple[Path, Results]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    run_dir, _ = random_run
    cfg = AutoConfig.from_pretrained(run_dir / "artifacts" / "baseline")
    for k, v in TINY_ARCH.items():
        assert getattr(cfg, k) == v, k
    w = load_file(str(run_dir / "artifacts" / "baseline" / "model.safetensors"))
    assert w["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    again = archs.random_model(str(run_dir.parent / "arch.json"), torch.bfloat16, seed=3).state_dict()
    assert torch.equal(again["model.layers.1.self_attn.q_proj.weight"], w["model.layers.1.self_attn.q_proj.weight"])
    assert 0.01 < w["model.layers.1.self_attn.q_proj.weight"].float().std() < 0.05  # initializer_range 0.02


def test_compiled_engine_bench_rows(random_run: tuple[Path, Results]) -> None:
    run_dir, res = random_run
    kernels = {"baseline": "dense", "int8": "int8 weight-only", "int8-dyn": "_int_mm", "gptq": "int4 tinygemm"}
    for v in res.variants:
        s = v.speed
        assert s.engine == "quantpipe decoder (fused q/k/v and gate/up), eager, static KV cache", s
        assert kernels[v.name] in s.kernel, s
        assert s.copy_bandwidth_gbs > 0.1 and s.weight_bytes_per_step > 0
        for row in s.per_batch.values():
            assert row.decode_tok_s > 0 and row.limit_tok_s > 0
            assert 0 < row.frac_of_limit == pytest.approx(row.decode_tok_s / row.limit_tok_s)
            assert row.kv_positions_read == 64  # the static cache: 32 + 16 rounded up to 64
    by = {v.name: v.speed.weight_bytes_per_step for v in res.variants}
    assert by["gptq"] < by["int8"] < by["baseline"]
    md = (run_dir / "matrix.md").read_text()
    assert "% of limit" in md and "int4 tinygemm" in md


def test_static_cache_decode_continues_like_transformers(tiny_model: Path) -> None:
    """Greedy decode with the static cache (reused, reset between calls) gives transformers' own continuation
    (float32 tiny model: a bfloat16 random model's near-uniform logits flip on rounding; the quantized
    formats' continuations are compared in test_quant_methods)."""
    from quantpipe.runtimes.hf import HFRuntime

    fast, ref = compiled.CompiledRuntime(tiny_model, "cpu"), HFRuntime(tiny_model, "cpu")
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    got, want = fast.generate(x, 12), ref.generate(x, 12)
    assert got.shape == (2, 12) and torch.equal(got, want)
    assert torch.equal(fast.generate(x, 12), got)  # the reused cache was reset
    assert torch.equal(fast.generate(x[:1, :7], 3), ref.generate(x[:1, :7], 3))  # another shape, another cache


def test_random_weights_refuse_quality(random_run: tuple[Path, Results], tmp_path: Path, capsys) -> None:
    run_dir, _ = random_run
    art = str(run_dir / "artifacts" / "gptq")
    assert main(["lm-eval", art, "--tasks", "qp_arith"]) == 2
    assert "no quality to evaluate" in capsys.readouterr().err
    assert main(["gate", str(run_dir), "--baseline", str(run_dir)]) == 2
    assert "random weights" in capsys.readouterr().err
    out = tmp_path / "b.json"
    assert main(["bench", art, "--device", "cpu", "--prompt-len", "16", "--gen-len", "32", "--batch-sizes", "1",
                 "--repeats", "3", "--engine", "compiled", "--out", str(out)]) == 0  # random prompt ids
    assert json.loads(out.read_text())["per_batch"]["1"]["decode_tok_s"] > 0


def test_bench_falls_back_to_eager_without_a_kernel(random_run: tuple[Path, Results], monkeypatch) -> None:
    """`auto` picks the compiled engine where it serves the format (on a GPU); an artifact without a kernel falls
    back to the format's own runtime and says why. Named explicitly, the compiled runtime refuses it instead."""
    run_dir, _ = random_run
    monkeypatch.setattr(kernels, "LAYOUTS", {})
    with pytest.raises(runtimes.Unavailable, match="no low-bit kernel"):
        runtimes.load(run_dir / "artifacts" / "gptq", "cpu", "compiled")
    real = runtimes.resolve  # `auto` as on a GPU: the compiled engine first
    monkeypatch.setattr(runtimes, "resolve", lambda name, fmt, device: real(
        "compiled" if name == "auto" else name, fmt, device))
    rt = runtimes.load(run_dir / "artifacts" / "gptq", "cpu", "auto")
    label, why = rt.engine, rt.fallback_note
    assert label.startswith("transformers generate") and "no low-bit kernel" in why
    rt.close()
    monkeypatch.setattr(runtimes, "resolve", real)
    rt = runtimes.load(run_dir / "artifacts" / "baseline", "cpu", "auto")
    label, why = rt.engine, rt.fallback_note
    assert label.startswith("transformers generate") and why is None  # auto on a CPU: eager
    rt.close()


# -- recipe checks ----------------------------------------------------------------------------------------
def _recipe(**model: object) -> dict:
    return {"name": "r", "model": {"arch": "qwen2-7b", "weights": "random", **model},
            "variants": [{"name": "baseline", "method": "baseline"}], "eval": {"enabled": False}}


@pytest.mark.parametrize("change,field", [
    ({"model": {"arch": "qwen2-7b"}}, "add `weights: random`"),
    ({"model": {"path": ".", "weights": "random"}}, "model.weights: random needs model.arch"),
    ({"model": {"arch": "qwen9-1t", "weights": "random"}}, "model.arch: unknown architecture 'qwen9-1t'"),
    ({"model": {"arch": "/nope/config.json", "weights": "random"}}, "model.arch: '/nope/config.json' does not"),
    ({"eval": {}}, "eval.enabled: a random-weight model"),
    ({"eval": {"enabled": False, "lm_eval": {"tasks": ["qp_arith"]}}}, "eval.lm_eval: a random-weight model"),
    ({"gates": {"all": {"max_kld": 0.1}}}, "gates.all.max_kld: a random-weight model"),
    ({"gates": {"variants": {"baseline": {"min_top1": 0.9}}}}, "gates.variants.baseline.min_top1"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "g", "method": "gguf"}]},
     "variants[1](g).method: 'gguf' converts the tokenizer"),
])
def test_random_weight_recipes_name_the_field(change: dict, field: str) -> None:
    data = {**_recipe(), **change}
    with pytest.raises(QuantpipeError, match=None) as e:
        parse_recipe(data)
    assert field in str(e.value), str(e.value)


def test_shipped_shapes_match_their_published_sizes() -> None:
    from transformers import AutoModelForCausalLM

    # parameter counts of the published models (embeddings and lm_head included)
    published = {"qwen2-7b": 7.62e9, "qwen2-0.5b": 0.494e9, "qwen2-1.5b": 1.54e9, "llama-3-8b": 8.03e9,
                 "llama3-8b": 8.03e9, "llama-3.1-8b": 8.03e9, "llama-2-7b": 6.74e9, "mistral-7b": 7.24e9,
                 "smollm2-135m": 0.135e9}
    for name, n in published.items():
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(archs.config(name))
        assert abs(sum(p.numel() for p in m.parameters()) / n - 1) < 0.01, name
    parse_recipe(_recipe())  # the issue's own spelling validates
