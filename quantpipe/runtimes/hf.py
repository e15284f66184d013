"""The Hugging Face transformers runtime: any artifact `AutoModelForCausalLM.from_pretrained` loads (CPU or CUDA):
plain safetensors, compressed-tensors, GPTQ and AWQ checkpoints (through GPTQModel), torchao, bitsandbytes."""

from __future__ import annotations

from pathlib import Path

import torch

from quantpipe import memory
from quantpipe.artifact import TRANSFORMERS_FORMATS, ArtifactMeta
from quantpipe.deps import Requirements
from quantpipe.runtimes import BaseRuntime, Capabilities, RuntimeSpec, register


class HFRuntime(BaseRuntime):
    name = "hf"
    engine = "transformers generate, dynamic KV cache (eager)"

    def __init__(self, artifact_dir: Path, device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(artifact_dir, device_map=device)
        self.model.eval()
        cfg = self.model.generation_config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        return out.logits[0].float().cpu()

    @torch.inference_mode()
    def logits_batch(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """One forward of the sequences padded on the right (causal: real positions never see the padding)."""
        n = max(len(s) for s in seqs)
        x = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(seqs):
            x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        logits = out.logits.float().cpu()
        return [logits[i, :len(s)] for i, s in enumerate(seqs)]

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        x = ids.to(self.device)
        out = self.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out[:, x.shape[1]:].cpu()

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads (the bench's bandwidth limit)."""
        return memory.decode_bytes(self.model)

    def kv_bytes_per_position(self) -> int:
        return memory.kv_bytes_per_position(self.model.config, self.model.dtype)


    def kernel(self) -> str:
        """What computes the quantized matmuls (call after a forward: some formats decompress on the first)."""
        return describe_linear(self.model)

    def close(self) -> None:
        del self.model


def describe_linear(model: torch.nn.Module) -> str:
    """One line on how the first attention projection computes: module class, weight type, and for
    compressed-tensors whether the weights stay packed and whether activations are quantized."""
    for name, m in model.named_modules():
        if not name.endswith(("q_proj", "qkv_proj", "query_key_value", "c_attn")):
            continue
        cls = type(m)
        out = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            kind = type(w).__name__
            out += f" weight {w.dtype}".replace("torch.", "") + ("" if kind in ("Parameter", "Tensor") else f" {kind}")
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None:
            packed = isinstance(w, torch.Tensor) and not w.dtype.is_floating_point
            out += " (compressed-tensors: " + ("weights packed" if packed else "weights decompressed to float")
            if scheme.input_activations is not None:
                act = scheme.input_activations
                out += f", activations fake-quantized to {'fp' if act.type == 'float' else 'int'}{act.num_bits}"
            out += ")"
        return out
    return "unknown"


# quantization_config.quant_method -> the modules transformers imports to load that format
QUANT_LIBRARIES = {"compressed-tensors": ("compressed_tensors",), "gptq": ("gptqmodel", "optimum"),
                   "awq": ("gptqmodel", "optimum"), "torchao": ("torchao",),
                   "bitsandbytes": ("bitsandbytes",)}


def preload(artifact_dir: Path, meta: ArtifactMeta | None = None) -> None:
    """Import the model class and the quantization library of the artifact's format."""
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(artifact_dir)
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
    method = (getattr(config, "quantization_config", None) or {})
    method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", None)
    for name in QUANT_LIBRARIES.get(str(method), ()):
        importlib.import_module(name)


register(RuntimeSpec(
    name="hf",
    summary="transformers AutoModelForCausalLM (eval's reference runtime; generate with a dynamic KV cache)",
    formats=frozenset(TRANSFORMERS_FORMATS),
    natural_for=frozenset(TRANSFORMERS_FORMATS),
    load=lambda path, device, meta: HFRuntime(path, device),
    capabilities=Capabilities(scores="full", batched_scoring=True, decode_bytes=True, devices=("cpu", "cuda")),
    requirements=Requirements(("transformers",)),
    preload=preload,
))
