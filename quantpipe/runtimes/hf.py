"""The Hugging Face transformers runtime: any artifact `AutoModelForCausalLM.from_pretrained` loads (CPU or CUDA)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantpipe.runtimes import RuntimeInfo, register


class HFRuntime:
    name = "hf"

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
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        x = ids.to(self.device)
        out = self.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out[:, x.shape[1]:].cpu()

    def close(self) -> None:
        del self.model


register(RuntimeInfo(name="hf", load=HFRuntime, requires=("transformers",)))
