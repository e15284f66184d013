"""Serving: each variant in the engine people deploy (vLLM, llama.cpp's server), talked to only over HTTP.

engines.py: which engines exist, the environment of its own each lives in (`quantpipe setup-engine`), the command
that serves an artifact and what its log says (version, quantization, kernel, KV-cache capacity, why it refused).
server.py: one engine process: a free port, health, log tail, memory, a clean stop (never an orphan: guard.py
stops the engine's process group when quantpipe dies).
client.py: the OpenAI-compatible HTTP API: prompt log-probs as the runtime contract's top-k scores, greedy
completions, streamed chat. loadtest.py: GuideLLM against the endpoint (concurrency levels, latency percentiles).
measure.py: what the recipe's `serve:` stage records for one (variant, engine).
"""
