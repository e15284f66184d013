"""Quality eval, defined once for every runtime: perplexity, KL divergence and top-1 agreement vs the reference.

Definition (docs/architecture.md repeats it): the eval text is tokenized once with the baseline tokenizer and
cut into `max_tokens // window` non-overlapping windows of `window` tokens. Each window is scored on its own,
from an empty context. Perplexity = exp(mean NLL of tokens 2..window of every window). KL(P_ref || Q) and
top-1 agreement are averaged over every position of every window. The reference's log-probabilities are
written once per window (float32 safetensors) and read back window by window, so memory stays bounded.
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


# Bumped when score()'s output changes, so cached eval stages are redone (2: block means).
OUTPUT_VERSION = 2
# Tokens per block of the block means: long enough that blocks are nearly independent samples of a metric
# (the tokens of one block are not), short enough that a few eval windows give a usable number of blocks.
BLOCK = 64


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    se = (x.std(unbiased=True) / math.sqrt(x.numel())).item() if x.numel() > 1 else float("nan")
    return x.mean().item(), se


def score(runtime: Any, windows: list[list[int]], ref_dir: Path, write_reference: bool) -> dict[str, Any]:
    """Score one runtime on the windows. The reference run writes ref_dir; every other run compares with it."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    nlls, klds, agree = [], [], []
    for i, ids in enumerate(tqdm(windows, desc="  eval windows", unit="win", leave=False)):
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
        nlls.append(token_nll(lp, ids))
        path = ref_dir / f"window-{i:04d}.safetensors"
        if write_reference:
            save_file({"logprobs": lp.contiguous()}, str(path))
        ref = load_file(str(path))["logprobs"]
        if ref.shape != lp.shape:
            raise QuantpipeError(f"vocabulary mismatch: reference logits {tuple(ref.shape)} vs {tuple(lp.shape)}")
        klds.append(kl_divergence(ref, lp))
        agree.append((ref.argmax(-1) == lp.argmax(-1)).float())
    nll, kld, top1 = torch.cat(nlls), torch.cat(klds), torch.cat(agree)
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
        # means of consecutive blocks of BLOCK tokens of each window, in order: `quantpipe gate --baseline` pairs
        # them across runs (batch means) to estimate the noise of a change
        "block_tokens": BLOCK,
        "blocks": {"nll": block_means(nlls), "kld": block_means(klds), "top1": block_means(agree)},
    }


def block_means(series: list[torch.Tensor], block: int = 0) -> list[float]:
    """Means of consecutive blocks of `block` (default BLOCK) values of each window's series; a window's last
    block may be shorter."""
    return [c.double().mean().item() for x in series for c in torch.split(x, block or BLOCK)]
