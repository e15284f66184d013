"""The OpenAI-compatible HTTP API of a served engine: prompt log-probs, greedy completions, a streamed chat.

Prompt log-probs come back in two shapes. vLLM takes the prompt as token ids and returns, for every position,
the prompt token's log-prob and the k most likely tokens by id (`prompt_logprobs`), and the last position's top k
with the generated token (`logprobs`). llama.cpp's server (llama-cpp-python) takes text (tokenized by the
baseline's tokenizer, so the ids are the same), and with `echo` returns the top k *by text* per position; each
dict sits at the position after the one whose distribution it is, and holds one extra entry, the position's own
token scored under that distribution (llama-cpp-python 0.3.36 pairs token i with the logits after token i), so
the scored token's own log-prob is not returned at all and position 0's distribution is dropped. `topk_text`
maps the texts back to ids with the baseline tokenizer and keeps what is sound: positions 1..T-1, their top k.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from quantpipe.errors import QuantpipeError


@dataclass
class Scores:
    """Top-k scores of one sequence of T ids at `positions` (the distribution after token t predicts t + 1):
    `ids` [n, k] most likely first, `logprobs` [n, k]; `target` [n]: the next id's log-prob at each position,
    None when the engine does not return it; `unmapped`: positions dropped because a text had no single id."""

    positions: list[int]
    ids: list[list[int]]
    logprobs: list[list[float]]
    target: list[float] | None
    unmapped: int = 0


class Client:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url, self.model = url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self.http.post(path, json={"model": self.model, **body})
        except httpx.HTTPError as e:
            raise QuantpipeError(f"{self.url}{path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise QuantpipeError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    # -- scores ---------------------------------------------------------------------------------------------
    def topk_ids(self, ids: list[int], k: int) -> Scores:
        """vLLM: every position's top k by id and the next token's log-prob (prompt_logprobs)."""
        out = self.post("/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k,
                                            "logprobs": k, "return_tokens_as_token_ids": True})
        choice = out["choices"][0]
        plp = choice.get("prompt_logprobs")
        if not plp or len(plp) != len(ids):
            raise QuantpipeError(f"{self.url}: prompt_logprobs of {len(plp or [])} positions for {len(ids)} ids")
        top_ids, top_lps, target = [], [], []
        for t in range(1, len(ids)):
            entries = {int(i): e for i, e in plp[t].items()}
            target.append(float(entries[ids[t]]["logprob"]))
            best = sorted(entries.items(), key=lambda x: x[1]["rank"])[:k]
            top_ids.append([i for i, _ in best])
            top_lps.append([float(e["logprob"]) for _, e in best])
        last = choice["logprobs"]["top_logprobs"][0]
        best_last = sorted(((int(s.split(":", 1)[1]), float(v)) for s, v in last.items()), key=lambda x: -x[1])[:k]
        top_ids.append([i for i, _ in best_last])
        top_lps.append([v for _, v in best_last])
        return Scores(list(range(len(ids))), top_ids, top_lps, target)

    def topk_text(self, ids: list[int], k: int, tokenizer: Any, vocab: dict[str, list[int]]) -> Scores:
        """llama.cpp's server: the top k of positions 1..T-1 by text, mapped back to ids (see the module doc).
        `vocab` maps each token's text to its ids (text_vocab)."""
        text = tokenizer.decode(ids)
        out = self.post("/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
                                            "logprobs": k + 1})
        lp = out["choices"][0]["logprobs"]
        tokens, tops = lp["tokens"], lp["top_logprobs"]
        if len(tokens) != len(ids):
            raise QuantpipeError(f"{self.url}: the server tokenized the window into {len(tokens)} tokens, not "
                                 f"{len(ids)}: its tokenizer is not the baseline's")
        positions, top_ids, top_lps, unmapped = [], [], [], 0
        for t in range(1, len(ids)):
            entries = {s: v for s, v in (tops[t] or {}).items() if s != tokens[t]}  # drop the misplaced entry
            best = sorted(entries.items(), key=lambda x: -x[1])[:k]
            mapped = [vocab.get(s, []) for s, _ in best]
            if len(best) < k or any(len(m) != 1 for m in mapped):
                unmapped += 1
                continue
            positions.append(t)
            top_ids.append([m[0] for m in mapped])
            top_lps.append([float(v) for _, v in best])
        return Scores(positions, top_ids, top_lps, None, unmapped)

    # -- generation ------------------------------------------------------------------------------------------
    def greedy(self, ids: list[int], n: int, by_text: Any = None) -> list[int]:
        """Greedy continuation of `ids`: `n` tokens (vLLM ignores end of sequence; llama.cpp's server may stop
        there). `by_text`: a tokenizer, for a server that takes text (the completion's text is tokenized back)."""
        body: dict[str, Any] = {"max_tokens": n, "temperature": 0}
        if by_text is None:
            out = self.post("/v1/completions", {**body, "prompt": ids, "logprobs": 0, "ignore_eos": True,
                                                "return_tokens_as_token_ids": True})
            toks = out["choices"][0]["logprobs"]["tokens"]
            return [int(s.split(":", 1)[1]) for s in toks]
        # llama-cpp-python's completions apply a repeat penalty of 1.1 unless told otherwise: greedy means none
        out = self.post("/v1/completions", {**body, "prompt": by_text.decode(ids), "repeat_penalty": 1.0})
        return list(by_text(out["choices"][0]["text"], add_special_tokens=False).input_ids)

    def chat_stream(self, message: str, max_tokens: int = 16) -> dict[str, Any]:
        """One streamed chat completion (SSE): the text, the number of chunks, time to the first content."""
        t = time.perf_counter()
        text, chunks, ttft = "", 0, None
        body = {"model": self.model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise QuantpipeError(f"{self.url}/v1/chat/completions: HTTP {r.status_code}: "
                                         f"{r.read()[:300]!r}")
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    delta = json.loads(line[5:])["choices"][0].get("delta", {}).get("content") or ""
                    if delta and ttft is None:
                        ttft = time.perf_counter() - t
                    text += delta
                    chunks += 1
        except httpx.HTTPError as e:
            raise QuantpipeError(f"{self.url}/v1/chat/completions: {type(e).__name__}: {e}") from None
        return {"text": text, "chunks": chunks, "ttft_s": ttft, "total_s": time.perf_counter() - t}

    def close(self) -> None:
        self.http.close()


def text_vocab(tokenizer: Any) -> dict[str, list[int]]:
    """Each token's text as a lone token (how llama-cpp-python keys its top log-probs) -> the ids with it."""
    out: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        out.setdefault(tokenizer.decode([i]), []).append(i)
    return out
