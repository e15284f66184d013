"""Eval math: perplexity, KL divergence, top-1 agreement and windowing, on hand-checkable cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantpipe import evaluate
from quantpipe.errors import QuantpipeError


class FixedRuntime:
    """A runtime whose logits are given: lets the scoring code be checked against exact answers."""

    name = "fixed"
    device = "cpu"

    def __init__(self, fn):
        self.fn = fn

    def logits(self, ids):
        return self.fn(ids)


def test_uniform_model_perplexity_is_vocab_size(tmp_path: Path) -> None:
    vocab = 97
    rt = FixedRuntime(lambda ids: torch.zeros(len(ids), vocab))
    windows = evaluate.make_windows(list(range(50)) * 4, window=64, max_tokens=192)
    q = evaluate.score(rt, windows, tmp_path / "ref", write_reference=True)
    assert q["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert q["n_tokens_scored"] == 3 * 63
    assert q["kld_mean"] == 0.0 and q["top1_agreement"] == 1.0


def test_kld_identical_is_zero_and_known_value() -> None:
    lp = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.equal(evaluate.kl_divergence(lp, lp), torch.zeros(5))
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert evaluate.kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)


def test_score_against_reference(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    ref_logits = {}

    def ref_fn(ids):
        return ref_logits.setdefault(tuple(ids), torch.randn(len(ids), 13))

    windows = [[t % 13 for t in range(i, i + 16)] for i in (0, 16)]
    ref = evaluate.score(FixedRuntime(ref_fn), windows, tmp_path / "ref", write_reference=True)
    same = evaluate.score(FixedRuntime(ref_fn), windows, tmp_path / "ref", write_reference=False)
    assert same["kld_mean"] == 0.0 and same["perplexity"] == ref["perplexity"]
    noisy = evaluate.score(FixedRuntime(lambda ids: ref_fn(ids) + 0.5 * torch.randn(len(ids), 13)),
                           windows, tmp_path / "ref", write_reference=False)
    assert noisy["kld_mean"] > 0 and noisy["kld_p99"] >= noisy["kld_mean"]
    assert 0 <= noisy["top1_agreement"] < 1
    # NLL of the reference, by hand
    nll = []
    for w in windows:
        lp = torch.log_softmax(ref_fn(w), -1)
        nll += [-lp[i, w[i + 1]].item() for i in range(len(w) - 1)]
    assert ref["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    # block means (the gate's noise estimate): blocks of 8 tokens within each window, in order
    monkeypatch.setattr(evaluate, "BLOCK", 8)
    blocks = evaluate.score(FixedRuntime(ref_fn), windows, tmp_path / "ref", write_reference=False)["blocks"]
    assert blocks["nll"] == pytest.approx([sum(nll[a:b]) / (b - a) for a, b in ((0, 8), (8, 15), (15, 23), (23, 30))])
    assert len(blocks["kld"]) == len(blocks["top1"]) == 4 and blocks["kld"] == [0.0] * 4


def test_vocab_mismatch_is_an_error(tmp_path: Path) -> None:
    windows = [list(range(8))]
    evaluate.score(FixedRuntime(lambda ids: torch.zeros(len(ids), 10)), windows, tmp_path, write_reference=True)
    with pytest.raises(QuantpipeError, match="vocabulary mismatch"):
        evaluate.score(FixedRuntime(lambda ids: torch.zeros(len(ids), 12)), windows, tmp_path, write_reference=False)


def test_token_outside_vocab_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(QuantpipeError, match="token id 9 is outside"):
        evaluate.score(FixedRuntime(lambda ids: torch.zeros(len(ids), 5)), [[1, 9, 2]], tmp_path, write_reference=True)


def test_non_finite_logits_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(QuantpipeError, match="non-finite"):
        evaluate.score(FixedRuntime(lambda ids: torch.full((len(ids), 10), float("nan"))), [list(range(8))],
                       tmp_path, write_reference=True)


def test_windows() -> None:
    assert evaluate.make_windows(list(range(10)), 4, 100) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert evaluate.make_windows(list(range(10)), 4, 5) == [[0, 1, 2, 3]]
    with pytest.raises(QuantpipeError, match="fewer than one window"):
        evaluate.make_windows([1, 2], 4, 100)
