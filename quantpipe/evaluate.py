"""Quality eval, defined once for every runtime: perplexity, KL divergence and top-1 agreement vs the reference.

Definition (docs/architecture.md repeats it): the eval text is tokenized once with the baseline tokenizer and
cut into `max_tokens // window` non-overlapping windows of `window` tokens. Each window is scored on its own,
from an empty context. Perplexity = exp(mean NLL of tokens 2..window of every window). KL(P_ref || Q) and
top-1 agreement are averaged over every position of every window. The reference's log-probabilities are
written once per window (float32 safetensors) and read back window by window, so memory stays bounded.

A runtime that returns only the top-k log-probs (a server's OpenAI API) gets the same perplexity and top-1
agreement (the scored token's log-prob and the most likely token are among what it returns) and an estimate of
the KL divergence, `kl_topk`: the KL of the two distributions coarsened to the variant's k most likely tokens
plus one bucket holding the rest of the mass. By the log-sum inequality the coarsened KL never exceeds the full
one: the estimator is biased low, by the divergence hidden inside the rest bucket, and the bias falls as k
grows (docs/benchmarks.md measures it on SmolLM2 for k = 5, 20, 100).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quantpipe.errors import QuantpipeError


def make_windows(ids: list[int], window: int, max_tokens: int) -> list[list[int]]:
    n = min(len(ids), max_tokens) // window
    if n == 0:
        raise QuantpipeError(f"eval: the text has {len(ids)} tokens, fewer than one window ({window}); "
                             "lower eval.window or use a longer eval.text")
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def token_nll(logprobs: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """NLL of each next token: logprobs [T, V] of positions 0..T-2 against ids 1..T-1 -> [T-1]."""
    target = torch.tensor(ids[1:], dtype=torch.long)
    return -logprobs[:-1].gather(1, target[:, None])[:, 0]


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) per position, in nats, from log-probabilities [T, V] -> [T]."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).clamp_min(0.0)


def kl_topk(ref_logprobs: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) per position estimated from Q's top k only: `ids` [T, k] are Q's k most likely tokens and
    `logprobs` [T, k] their log-probs; the reference is full ([T, V]). Both distributions are coarsened to those
    k tokens plus one bucket for the rest of the mass, and the KL of the coarsened pair is returned: never above
    the full KL (log-sum inequality), equal to it when the rest bucket holds no divergence."""
    p_lp = ref_logprobs.double().gather(1, ids)
    q_lp = logprobs.double()
    head = (p_lp.exp() * (p_lp - q_lp)).sum(-1)
    p_rest = (1 - p_lp.exp().sum(-1)).clamp_min(0.0)
    q_rest = (1 - q_lp.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()),
                       torch.zeros_like(p_rest))
    return (head + tail).clamp_min(0.0).float()


# Bumped when score()'s output changes, so cached eval stages are redone (2: block means; 3: the KL estimator).
OUTPUT_VERSION = 3
# Tokens per block of the block means: long enough that blocks are nearly independent samples of a metric
# (the tokens of one block are not), short enough that a few eval windows give a usable number of blocks.
BLOCK = 64


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def mean_se(x: torch.Tensor) -> tuple[float, float | None]:
    """Mean and its standard error (None for a single value)."""
    x = x.double()
    se = (x.std(unbiased=True) / math.sqrt(x.numel())).item() if x.numel() > 1 else None
    return x.mean().item(), se


# top-k runtimes are asked for this many log-probs per position (or their maximum, if lower)
TOPK = 20


def score(runtime: Any, windows: list[list[int]], ref_dir: Path, write_reference: bool) -> dict[str, Any]:
    """Score one runtime on the windows. The reference run writes ref_dir; every other run compares with it.
    A runtime with full logits gets the exact KL divergence; a top-k runtime the `kl_topk` estimate."""
    from quantpipe import runtimes

    caps = runtimes.capabilities(runtime)
    k = min(TOPK, caps.max_topk or TOPK) if caps.scores == "topk" else None
    if write_reference and k is not None:
        raise QuantpipeError(f"runtime '{runtime.name}' returns top-k log-probs only: the reference needs full logits")
    ref_dir.mkdir(parents=True, exist_ok=True)
    nlls, klds, agree = [], [], []
    for i, ids in enumerate(tqdm(windows, desc="  eval windows", unit="win", leave=False)):
        path = ref_dir / f"window-{i:04d}.safetensors"
        if k is None:
            lp = _full_logprobs(runtime, ids, i)
            nlls.append(token_nll(lp, ids))
            if write_reference:
                save_file({"logprobs": lp.contiguous()}, str(path))
            ref = _reference(path, lp.shape)
            klds.append(kl_divergence(ref, lp))
            agree.append((ref.argmax(-1) == lp.argmax(-1)).float())
        else:
            top = runtime.topk(ids, k)
            if top.ids.shape[0] != len(ids) or top.target.shape[0] != len(ids) - 1:
                raise QuantpipeError(f"runtime '{runtime.name}' returned top-k scores of {top.ids.shape[0]} "
                                     f"positions for {len(ids)} ids")
            nlls.append(-top.target.float())
            ref = _reference(path, None)
            klds.append(kl_topk(ref, top.ids, top.logprobs))
            agree.append((ref.argmax(-1) == top.ids[:, 0]).float())
    nll, kld, top1 = torch.cat(nlls), torch.cat(klds), torch.cat(agree)
    if not torch.isfinite(nll).all():
        raise QuantpipeError(f"runtime '{runtime.name}' produced non-finite log-probabilities")
    nll_mean, nll_se = mean_se(nll)
    kld_mean, kld_se = mean_se(kld)
    return {
        "perplexity": perplexity(nll),
        "nll_mean": nll_mean,
        "nll_se": nll_se,
        "kld_mean": kld_mean,
        "kld_se": kld_se,
        "kld_p99": torch.quantile(kld.double(), 0.99).item(),
        "top1_agreement": top1.mean().item(),
        "n_windows": len(windows),
        "n_tokens_scored": int(nll.numel()),
        "kld_estimator": "full vocabulary" if k is None else f"top-{k} + rest bucket (a lower bound)",
        # means of consecutive blocks of BLOCK tokens of each window, in order: `quantpipe gate --baseline` pairs
        # them across runs (batch means) to estimate the noise of a change
        "block_tokens": BLOCK,
        "blocks": {"nll": block_means(nlls), "kld": block_means(klds), "top1": block_means(agree)},
    }


def _full_logprobs(runtime: Any, ids: list[int], i: int) -> torch.Tensor:
    logits = runtime.logits(ids)
    if logits.shape[0] != len(ids):
        raise QuantpipeError(f"runtime '{runtime.name}' returned {logits.shape[0]} positions for {len(ids)} ids")
    top_id = max(ids)
    if top_id >= logits.shape[1]:
        raise QuantpipeError(f"token id {top_id} is outside runtime '{runtime.name}''s vocabulary "
                             f"({logits.shape[1]}); the artifact's tokenizer does not match the baseline's")
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not torch.isfinite(lp).all():
        raise QuantpipeError(f"runtime '{runtime.name}' produced non-finite logits (window {i})")
    return lp


def _reference(path: Path, shape: Any) -> torch.Tensor:
    if not path.is_file():
        raise QuantpipeError(f"the reference log-probs {path} are missing; re-run the reference's eval (--force)")
    ref = load_file(str(path))["logprobs"]
    if shape is not None and ref.shape != shape:
        raise QuantpipeError(f"vocabulary mismatch: reference logits {tuple(ref.shape)} vs {tuple(shape)}")
    return ref


def reference_logprobs(ref_dir: Path, window: int) -> torch.Tensor:
    """The reference's log-probs of one eval window, [T, V] (written by the reference row's eval)."""
    return _reference(ref_dir / f"window-{window:04d}.safetensors", None)


def block_means(series: list[torch.Tensor], block: int = 0) -> list[float]:
    """Means of consecutive blocks of `block` (default BLOCK) values of each window's series; a window's last
    block may be shorter."""
    return [c.double().mean().item() for x in series for c in torch.split(x, block or BLOCK)]
