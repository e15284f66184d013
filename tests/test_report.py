"""Matrix rendering from a results dict: Markdown table, HTML with the embedded plot, PNG."""

from __future__ import annotations

import copy
from pathlib import Path

from quantpipe import report

VARIANT = {
    "name": "baseline", "method": "baseline", "artifact": {"size_bytes": 100 * 2**20},
    "quality": {"perplexity": 20.0, "kld_mean": 0.0, "top1_agreement": 1.0},
    "speed": {"per_batch": {"1": {"prefill_tok_s": 500.0, "decode_tok_s": 30.0, "ttft_s": 0.2},
                            "4": {"prefill_tok_s": 900.0, "decode_tok_s": 80.0, "ttft_s": 0.5}}},
    "memory": {"peak_rss_mib": 900.0}, "timings": {"quantize_s": 12.0},
}


def results() -> dict:
    q = copy.deepcopy(VARIANT)
    q.update(name="int8", method="int8", artifact={"size_bytes": 40 * 2**20})
    q["quality"] = {"perplexity": 21.0, "kld_mean": 0.0123, "top1_agreement": 0.95}
    return {"schema_version": 1, "recipe": {"name": "demo"}, "reference": "baseline",
            "eval": {"n_windows": 2, "window": 512}, "hardware": {"cpu": "x", "cpu_count": 2},
            "bench": {"enabled": True, "device": "cpu", "prompt_len": 128, "gen_len": 32, "repeats": 3,
                      "batch_sizes": [1, 4]},
            "variants": [copy.deepcopy(VARIANT), q]}


def test_markdown_rows() -> None:
    md = report.markdown(results())
    lines = [line for line in md.splitlines() if line.startswith("| int8")]
    assert lines == ["| int8 | int8 | 21.000 | +5.00 | 0.01230 | 95.0 | 500.0 | 30.0 | 80.0 | 200.0 | 40.0 | 0.40 | "
                     "900 | 12.0 | yes |"]
    assert "decode tok/s b4" in md


def test_missing_speed_renders_dash() -> None:
    r = results()
    r["variants"][1]["speed"] = None
    row = next(line for line in report.markdown(r).splitlines() if line.startswith("| int8"))
    assert "| – |" in row


def test_write_all_outputs(tmp_path: Path) -> None:
    report.write(tmp_path, results())
    png = (tmp_path / "matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "matrix.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "<td>int8</td>" in html
    assert (tmp_path / "matrix.md").read_text().startswith("# quantpipe matrix: demo")
