"""quantpipe's runtimes as an lm-evaluation-harness model: `RuntimeLM` implements lm-eval's `loglikelihood`,
`loglikelihood_rolling` and `generate_until` over the runtime contract, tokenized with the baseline's tokenizer,
so every format answers the same requests on the same token ids. This module imports lm-eval; lmeval.py (the
stage around it) imports it only when tasks run.

- loglikelihood: requests are grouped by context; one-token continuations are read off one forward of the
  context; a question's choices are scored in one batched call (`runtimes.logits_batch`). A runtime that returns
  only top-k log-probs scores each continuation from the scored tokens' own log-probs.
- loglikelihood_rolling: lm-eval's disjoint rolling windows.
- generate_until: greedy generation in chunks of 8, 16, 32 ... tokens until a stop string, EOS or max_gen_toks.
Responses are cached (ResponseCache: JSON in SQLite, keyed by the request), so a re-run only computes new ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from quantpipe import runtimes
from quantpipe.lm_responses import ADAPTER_VERSION, ResponseCache
from quantpipe.runtimes import BaseRuntime

# Greedy generation runs in chunks of this many tokens (doubling) until a stop string, EOS or max_gen_toks.
FIRST_CHUNK = 8


class RuntimeLM(TemplateLM):
    backend = "causal"

    def __init__(self, runtime: BaseRuntime, tokenizer: Any, max_length: int, max_gen_toks: int | None = None,
                 cache: ResponseCache | None = None) -> None:
        super().__init__()
        self.runtime, self.tokenizer, self.max_length = runtime, tokenizer, max_length
        self.topk_only = runtimes.capabilities(runtime).scores == "topk"
        self.max_gen_toks_cap = max_gen_toks
        self.cache = cache or ResponseCache(None)
        self.sampled_requests = 0  # generate_until requests that asked to sample (scored greedily)
        self.forwards = 0

    # -- tokenization: the baseline's tokenizer, no special tokens (the eval's convention) --------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # the run prints one line per stage

    # -- scoring --------------------------------------------------------------------------------------
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        self.forwards += 1
        return torch.log_softmax(self.runtime.logits(ids).float(), dim=-1)

    def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-probability of each `cont` after its `ctx` and whether it is the greedy continuation, in one
        batched call (`runtimes.logits_batch`); the oldest context tokens are dropped to fit max_length. A
        top-k runtime answers from the scored tokens' log-probs and its most likely token at each position."""
        wholes = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        self.forwards += len(pairs)
        if self.topk_only:
            return [self._topk_score(whole, cont) for whole, (_, cont) in zip(wholes, pairs, strict=True)]
        out = []
        for (_, cont), logits in zip(pairs, runtimes.logits_batch(self.runtime, [w[:-1] for w in wholes]),
                                     strict=True):
            lp = torch.log_softmax(logits.float(), dim=-1)[-len(cont):]
            target = torch.tensor(cont, dtype=torch.long)
            out.append((float(lp.gather(1, target[:, None]).sum().item()), bool((lp.argmax(-1) == target).all())))
        return out

    def _topk_score(self, whole: list[int], cont: list[int]) -> tuple[float, bool]:
        top = self.runtime.topk(whole, 1)
        n = len(cont)
        greedy = top.ids[-n - 1:-1, 0].tolist() == cont
        return float(top.target[-n:].sum().item()), bool(greedy)

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        return self._scores([(ctx, cont)])[0]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        todo: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context -> request indices
        for i, (_, ctx, cont) in enumerate(requests):
            hit = self.cache.get(self.cache.key("ll", ADAPTER_VERSION, ctx, cont))
            if hit is not None:
                out[i] = (float(hit[0]), bool(hit[1]))
            else:
                todo[tuple(ctx)].append(i)
        for ctx_t, idx in todo.items():
            ctx = list(ctx_t)
            conts = [requests[i][2] for i in idx]
            if all(len(c) == 1 for c in conts) and len(ctx) <= self.max_length and not self.topk_only:
                # one forward of the context scores every one-token continuation (causal: the last
                # position's distribution does not depend on what follows)
                last = self._logprobs(ctx)[-1]
                best = int(last.argmax())
                res = [(float(last[c[0]]), c[0] == best) for c in conts]
            else:  # the choices of one question in one batched call
                res = self._scores([(ctx, c) for c in conts])
            for i, r in zip(idx, res, strict=True):
                out[i] = r
                self.cache.put(self.cache.key("ll", ADAPTER_VERSION, ctx, requests[i][2]), list(r))
        self.cache.commit()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args[:1]
            tokens = self.tok_encode(text)
            key = self.cache.key("rolling", ADAPTER_VERSION, self.max_length, tokens)
            hit = self.cache.get(key)
            if hit is None:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1))
                hit = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
                self.cache.put(key, hit)
            out.append(float(hit))
        self.cache.commit()
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks") or 256)
            if self.max_gen_toks_cap:
                limit = min(limit, self.max_gen_toks_cap)
            if kwargs.get("do_sample"):
                self.sampled_requests += 1
            ids = self.tok_encode(context)[-max(1, self.max_length - limit):]
            key = self.cache.key("gen", ADAPTER_VERSION, ids, until, limit)
            hit = self.cache.get(key)
            if hit is None:
                hit = self._generate(ids, until, limit)
                self.cache.put(key, hit)
            out.append(hit)
        self.cache.commit()
        return out

    def _generate(self, ids: list[int], until: list[str], limit: int) -> str:
        eos = self.eot_token_id
        new: list[int] = []
        chunk = FIRST_CHUNK
        while len(new) < limit:
            n = min(chunk, limit - len(new))
            step = self.runtime.generate(torch.tensor([ids + new], dtype=torch.long), n)[0].tolist()
            stop_at = next((k for k, t in enumerate(step) if t == eos), None)
            new += step if stop_at is None else step[:stop_at]
            text = self.tok_decode(new)
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            if cut >= 0:
                return text[:cut]
            if stop_at is not None:
                return text
            chunk *= 2
        return self.tok_decode(new)
