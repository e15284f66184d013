"""`quantpipe select` and the matrix's frontier: dominance beyond noise, fits, quality floors, the recommendation per
objective and GPU, its reasons, the CLI's errors; hand-built results with known answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from quantpipe import plan, report, select
from quantpipe.errors import QuantpipeError
from quantpipe.results import parse
from quantpipe.select import Noise, Point

MIB = 2**20
N_BLOCKS = 16


def blocks(mean: float, wiggle: float, phase: float = 0.0) -> list[float]:
    return [mean + wiggle * math.sin(1.3 * i + phase) for i in range(N_BLOCKS)]


A_BLOCKS = blocks(0.010, 0.004)
# b - a per block: mean 0.0002, spread 0.003: a paired t allowance of ~0.0009, so within noise
B_BLOCKS = [a + 0.0002 + 0.003 * math.cos(1.7 * i) for i, a in enumerate(A_BLOCKS)]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# name: (KLD blocks, weights MiB, decode tok/s)
FIGURES = {
    "baseline": ([0.0] * N_BLOCKS, 100, 10.0),
    "a": (A_BLOCKS, 40, 20.0),
    "b": (B_BLOCKS, 40, 20.0),  # a's twin within noise: neither dominates the other
    "c": (blocks(0.05, 0.004, 1.0), 40, 20.0),  # a's memory and speed, worse quality beyond noise: dominated by a
    "d": (blocks(0.05, 0.004, 2.0), 30, 20.0),  # the least memory: on the frontier
    "e": (blocks(0.02, 0.004, 3.0), 50, 30.0),  # the fastest beyond 5 %: on the frontier
    "f": (blocks(0.03, 0.004, 4.0), 50, 20.5),  # e is better on quality and speed at the same memory: dominated by e
}
FRONTIER = {"baseline", "a", "b", "d", "e"}


def points() -> list[Point]:
    return [Point(n, mean(b), None, b, w * MIB, t) for n, (b, w, t) in FIGURES.items()]


def test_frontier_known_dominance() -> None:
    front = select.frontier(points(), Noise())
    assert {n for n, d in front.items() if d is None} == FRONTIER
    assert front["c"] == ("a", ["quality"])
    assert front["f"] is not None and front["f"][0] == "e" and set(front["f"][1]) == {"quality", "speed"}


def test_within_noise_neither_dominates() -> None:
    a, b = (p for p in points() if p.name in "ab")
    d, allow, how = select.quality_diff(a, b, 0.95)
    assert 0 < d < allow and how == "paired t over 16 blocks"
    assert select.dominates(a, b, Noise(), ["quality", "memory", "speed"]) == []
    assert select.dominates(b, a, Noise(), ["quality", "memory", "speed"]) == []
    # the same twin 0.002 worse with a tight spread is beyond noise: a dominates
    worse = Point("b2", b.kld, None, [x + 0.002 for x in A_BLOCKS], b.memory, b.throughput)
    assert select.dominates(a, worse, Noise(), ["quality", "memory", "speed"]) == ["quality"]


def test_recommendation_per_objective_breaks_ties_within_noise() -> None:
    front = [p for p in points() if p.name in FRONTIER]
    chosen, why = select.recommend(front, "quality", Noise())
    assert chosen.name == "baseline" and why == "lowest KLD"
    chosen, why = select.recommend([p for p in front if p.name != "baseline"], "quality", Noise())
    assert chosen.name == "a" and "tied within noise: a, b" in why  # a, b tie; then memory ties; a's KLD lower
    assert select.recommend(front, "memory", Noise())[0].name == "d"
    assert select.recommend(front, "speed", Noise())[0].name == "e"
    # speed within 5 % of the best counts as a tie, broken on quality
    close = [Point("fast", 0.05, None, [], 40 * MIB, 30.0), Point("good", 0.01, None, [], 40 * MIB, 29.0)]
    chosen, why = select.recommend(close, "speed", Noise())
    assert chosen.name == "good" and "then lowest KLD" in why


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def results(**overrides: object) -> dict:
    variants = []
    for name, (b, w, t) in FIGURES.items():
        method = "baseline" if name == "baseline" else "int8"
        variants.append({
            "name": name, "method": method, "params": {} if method == "baseline" else {"scheme": "weight_only"},
            "artifact": {"path": f"artifacts/{name}", "size_bytes": w * MIB + 1000},
            "quality": {"perplexity": 20.0, "kld_mean": mean(b), "kld_se": 0.001, "top1_agreement": 0.9,
                        "blocks": {"kld": b}},
            "speed": {"device": "cpu", "per_batch": {"1": {"decode_tok_s": t / 2}, "8": {"decode_tok_s": t}}},
            "meta": {"dtype": "bfloat16"} if name == "baseline" else {},
            "prediction": {"measured_weights_bytes": w * MIB}})
    data = {"schema_version": 2, "recipe": {"name": "hand"}, "reference": "baseline", "model": "hand-built",
            "eval": {"n_windows": 2, "window": 512}, "hardware": {"cpu": "x", "cpu_count": 2},
            "bench": {"enabled": True, "batch_sizes": [1, 8]}, "variants": variants}
    data.update(overrides)
    return data


def needs(context: int, concurrency: int, weights_mib: int) -> int:
    """By hand: weights + KV (2 × 2 layers × 2 KV heads × 16 dims × 2 bytes per token) + plan's activations."""
    s = plan.shapes(config())
    kv = 2 * 2 * 2 * 16 * 2 * context * concurrency
    return weights_mib * MIB + kv + plan.activation_bytes(s, min(context, 8192), concurrency, 2)


def test_select_fit_floor_and_reasons() -> None:
    res = parse(results())
    # usable memory between c's need (40 MiB) and e's (50 MiB): baseline, e and f do not fit
    gpu = int((needs(1024, 8, 45)) / 0.9)
    out = select.select(res, config(), [("small", gpu)], 1024, 8, objective="quality", max_kld=0.04)
    rows = {r["variant"]: r for r in out["gpus"][0]["variants"]}
    assert rows["a"]["need"] == needs(1024, 8, 40) and rows["a"]["weights"] == 40 * MIB
    assert [n for n, r in rows.items() if not r["fits"]] == ["baseline", "e", "f"]
    assert rows["baseline"]["reason"].startswith("does not fit: needs 0.1")
    assert rows["c"]["reason"].startswith("below the quality floor: KLD 0.05") and rows["c"]["status"] == "excluded"
    assert rows["d"]["reason"].startswith("below the quality floor")
    assert out["gpus"][0]["recommended"] == "a" and rows["a"]["status"] == "recommended"
    assert rows["b"]["status"] == "frontier" and "within noise" in rows["b"]["reason"]
    assert out["throughput"].startswith("bench decode tok/s at batch 8")  # the largest batch up to concurrency 8
    # nothing fits: the answer says what would (the best quality among the most concurrent)
    usable = needs(1024, 8, 30) - 4 * 256 * 1024 + 1000  # d's weights, activations and 4 sequences' KV
    tiny = select.select(res, config(), [("tiny", -(-usable * 10 // 9))], 1024, 8)["gpus"][0]
    assert tiny["recommended"] is None
    assert tiny["hint"].startswith("at 1024 tokens, d fits 4 concurrent sequences (--concurrency)")
    # a generous GPU: everything fits; the memory objective without a floor takes d, speed takes e
    big = [("H100-80GB", plan.GPUS["H100-80GB"])]
    assert select.select(res, config(), big, 1024, 8, objective="memory")["gpus"][0]["recommended"] == "d"
    out = select.select(res, config(), big, 1024, 8, objective="speed")
    rows = {r["variant"]: r for r in out["gpus"][0]["variants"]}
    assert out["gpus"][0]["recommended"] == "e"
    assert rows["f"]["status"] == "dominated" and rows["f"]["reason"].startswith("dominated by e: KLD")
    assert rows["c"]["reason"].startswith("dominated by a")


def test_select_lm_eval_floor_and_max_concurrency() -> None:
    data = results()
    for v in data["variants"][1:]:
        v["lm_eval"] = {"t": {"metric": "acc", "value": 0.5, "recovery": 0.99 if v["name"] == "a" else 0.9}}
    res = parse(data)
    big = [("L4-24GB", plan.GPUS["L4-24GB"])]
    out = select.select(res, config(), big, 4096, 1, min_recovery=0.97)
    rows = {r["variant"]: r for r in out["gpus"][0]["variants"]}
    assert rows["baseline"]["recovery"] == 1.0 and rows["b"]["reason"].startswith("below the quality floor: lm-eval")
    f = plan.fit("a", "int8", 40 * MIB, plan.shapes(config()), 2, 2, plan.GPUS["L4-24GB"], 4096, [1])
    assert rows["a"]["max_concurrency"] == f.max_concurrency > 1000


def test_served_figures_are_preferred_and_unserved_variants_say_why() -> None:
    data = results()
    data["serve"] = {"concurrency": [1, 4]}
    data["served"] = [
        {"variant": "baseline", "engine": "vllm", "loads": True,
         "levels": [{"concurrency": 1, "output_tok_s": 5.0}, {"concurrency": 4, "output_tok_s": 12.0}]},
        {"variant": "a", "engine": "vllm", "loads": True,
         "levels": [{"concurrency": 1, "output_tok_s": 6.0}, {"concurrency": 4, "output_tok_s": 15.0}]},
        {"variant": "a", "engine": "llama.cpp", "loads": False, "tried": False, "reason": "GGUF only"},
        {"variant": "b", "engine": "vllm", "loads": False, "reason": "ValueError: no kernel\nmore"},
    ]
    res = parse(data)
    out = select.select(res, config(), [("H200-141GB", plan.GPUS["H200-141GB"])], 2048, 16, objective="speed")
    rows = {r["variant"]: r for r in out["gpus"][0]["variants"]}
    assert out["throughput"].startswith("served output tok/s at concurrency 4")
    assert rows["a"]["throughput"] == 15.0 and rows["a"]["status"] == "recommended"
    assert rows["b"]["reason"] == "no engine served it at concurrency 4 (vllm: does not load: ValueError: no kernel)"
    assert rows["c"]["reason"].startswith("no engine served it at concurrency 4 (not in the serve block")
    bench = select.select(res, config(), [("H200", plan.GPUS["H200-141GB"])], 2048, 16, objective="speed",
                          speed="bench")
    assert bench["gpus"][0]["recommended"] == "e"


def test_errors_random_weights_no_eval_unknown_gpu() -> None:
    with pytest.raises(QuantpipeError, match="select needs a quality eval: this run has random weights"):
        select.require_quality(parse(results(weights="random")))
    data = results()
    for v in data["variants"]:
        v["quality"] = None
    with pytest.raises(QuantpipeError, match="select needs a quality eval: this run recorded no KL divergence"):
        select.require_quality(parse(data))
    with pytest.raises(QuantpipeError, match="unknown GPU 'B300'; known: T4-16GB, L4-24GB"):
        select.gpu_list("L4,B300", None)
    assert select.gpu_list("l4,H100-80GB", "24GiB") == [("L4-24GB", plan.GPUS["L4-24GB"]),
                                                        ("H100-80GB", plan.GPUS["H100-80GB"]), ("24GiB", 24 * 2**30)]
    with pytest.raises(QuantpipeError, match="--context: 8192 tokens is more than the model's 4096 positions"):
        select.select(parse(results()), config(), [("x", 2**34)], 8192, 1)


def run_dir(tmp_path: Path, data: dict) -> Path:
    d = tmp_path / "run"
    (d / "artifacts" / "baseline").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(data))
    config().save_pretrained(d / "artifacts" / "baseline")
    return d


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_select_cli_two_gpus_json_and_errors(tmp_path: Path) -> None:
    d = run_dir(tmp_path, results())
    p = cli("select", "run", "--gpu", "L4-24GB,H100-80GB", "--context", "2048", "--concurrency", "16",
            "--json", "sel.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "## L4-24GB: 22.49 GiB, 20.24 GiB usable" in p.stdout and "## H100-80GB" in p.stdout
    assert "Per GPU: L4-24GB → baseline; H100-80GB → baseline" in p.stdout
    assert "- c: dominated by a: KLD" in p.stdout
    out = json.loads((tmp_path / "sel.json").read_text())
    assert [g["gpu"] for g in out["gpus"]] == ["L4-24GB", "H100-80GB"] and out["context"] == 2048
    p = cli("select", "run", "--gpu", "B300", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("quantpipe: error: --gpu: unknown GPU 'B300'; known:")
    (d / "results.json").write_text(json.dumps(results(weights="random")))
    p = cli("select", "run", "--gpu", "L4", cwd=tmp_path)
    assert p.returncode == 2 and "select needs a quality eval" in p.stderr and "Traceback" not in p.stderr
    p = cli("select", "nowhere", "--gpu", "L4", cwd=tmp_path)
    assert p.returncode == 2 and "select: 'nowhere' does not exist" in p.stderr


# -- the matrix's frontier --------------------------------------------------------------------------------------------
def test_matrix_frontier_column_and_note() -> None:
    res = parse(results())
    md = report.markdown(res)
    status = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[-1] for line in md.splitlines()
              if line.startswith("| ") and not line.startswith("| variant") and "Pareto" not in line}
    assert {n for n in FIGURES if status[n] == "yes"} == FRONTIER
    assert status["c"] == "dominated by a" and status["f"] == "dominated by e"
    assert "Pareto frontier: baseline, a, b, d, e: over KL divergence" in md


def test_columns_of_stages_that_did_not_run_are_left_out() -> None:
    data = results(bench={"enabled": False})
    for v in data["variants"]:
        v["speed"] = None
    head, body = report.rows(parse(data))
    assert not any("tok/s" in h or "TTFT" in h for h in head), head
    assert "KLD" in head and "quantize s" not in head  # no quantize times recorded either
    html = report.html_page(parse(data), b"png")
    assert '<tr class="groups"><th colspan="2"></th><th colspan="4">quality</th><th colspan="2">memory</th>' in html
    assert "position:sticky" in html and "white-space:nowrap" in html
    random = results(weights="random")
    for v in random["variants"]:
        v["quality"] = None
    head, _ = report.rows(parse(random))
    assert "KLD" not in head and "PPL" not in head and "Pareto frontier" not in head


def test_plot_labels_never_overlap() -> None:
    """Crowded points (two at the same place, several close): every label's box is clear of every other."""
    data = results()
    data["variants"][1]["prediction"]["measured_weights_bytes"] = 100 * MIB  # a on top of the baseline's spot
    data["variants"][1]["quality"]["blocks"]["kld"] = [0.0001] * N_BLOCKS
    data["variants"][1]["quality"]["kld_mean"] = 0.0001
    import matplotlib.pyplot as plt

    fig = report.plot_figure(parse(data))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    assert sorted(n for n, _ in boxes) == sorted(FIGURES)
    for i, (n1, b1) in enumerate(boxes):
        for n2, b2 in boxes[i + 1:]:
            assert not b1.overlaps(b2), (n1, n2)
    plt.close(fig)
