"""Calibration data: text from the recipe's source, tokenized once into [n_samples, seq_len] ids for every method.

Documents are shuffled with the recipe seed, joined with the EOS token, and cut into consecutive blocks of
`seq_len` tokens; a source too short for n_samples x seq_len is an error, never silently repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantpipe import data
from quantpipe.errors import QuantpipeError, first_line

GENERATION_PROMPTS = (
    "Write a short explanation of how a refrigerator works.",
    "Tell a short story about a lost key.",
    "Give three tips for learning a new language.",
    "Describe a busy railway station in the morning.",
    "Explain what a prime number is, with examples.",
    "Write a polite email asking to reschedule a meeting.",
    "Summarise the rules of chess for a beginner.",
    "Describe the water cycle.",
)


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Paragraphs of a .txt file, or the `text_field` of each row of a .jsonl file."""
    if path.suffix == ".txt":
        return split_paragraphs(path.read_text(encoding="utf-8"))
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantpipeError(f"calibration.files: {path} line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise QuantpipeError(f"calibration.text_field: {path} line {i} has no string field '{text_field}'")
        docs.append(row[text_field])
    return docs


def _hf_dataset(spec: Any) -> list[str | list[dict]]:
    try:
        import datasets
    except ImportError:
        raise QuantpipeError("calibration.source 'hf_dataset' needs the datasets package: "
                             "pip install datasets") from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
    except Exception as e:  # network or name problems, reported in one line
        raise QuantpipeError(f"calibration.dataset: could not load '{spec.dataset}': {first_line(e)}") from None
    if spec.text_field not in ds.column_names:
        raise QuantpipeError(f"calibration.text_field: '{spec.text_field}' not in columns {ds.column_names}")
    docs = []
    for t in ds[spec.text_field]:
        if isinstance(t, str) and t.strip():
            docs.append(t)
        elif isinstance(t, list) and t and all(isinstance(m, dict) and "content" in m for m in t):
            docs.append(t)  # a conversation, e.g. ultrachat's `messages`
        elif t:
            raise QuantpipeError(f"calibration.text_field: '{spec.text_field}' holds {type(t).__name__} values; "
                                 "it must hold text or conversations (lists of {role, content})")
    return docs


def _render(doc: str | list[dict], tok: Any, chat: bool) -> str:
    """A document as the text the model sees: with the chat template when asked (conversations keep their
    turns), else plain text (a conversation's turns joined by blank lines)."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise QuantpipeError("calibration.chat_template: the model's tokenizer has no chat template")
        messages = doc if isinstance(doc, list) else [{"role": "user", "content": doc}]
        return tok.apply_chat_template(messages, tokenize=False)
    return doc if isinstance(doc, str) else "\n\n".join(str(m["content"]) for m in doc)


def _generated(spec: Any, model: Any, tok: Any) -> list[str]:
    """Text sampled from the base model itself (data-free calibration), seeded."""
    torch.manual_seed(spec.seed)
    docs = []
    n_docs = max(1, -(-spec.n_samples * spec.seq_len // 200))
    for i in range(n_docs):
        prompt = GENERATION_PROMPTS[i % len(GENERATION_PROMPTS)]
        ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=256, do_sample=True,
                             top_p=0.95, temperature=1.0, pad_token_id=tok.pad_token_id)
        docs.append(tok.decode(out[0], skip_special_tokens=True))
    return docs


def documents(spec: Any, model: Any = None, tok: Any = None) -> list[str | list[dict]]:
    if spec.source == "bundled":
        return read_documents(data.calibration_text())
    if spec.source == "files":
        docs = []
        for f in spec.files:
            p = Path(f)
            if not p.is_file():
                raise QuantpipeError(f"calibration.files: '{f}' does not exist")
            docs += read_documents(p, spec.text_field)
        return docs
    if spec.source == "hf_dataset":
        return _hf_dataset(spec)
    return _generated(spec, model, tok)


def build(spec: Any, tok: Any, docs: list[str | list[dict]]) -> torch.Tensor:
    """Tokenize documents into a [n_samples, seq_len] LongTensor, deterministic for a given seed."""
    if not docs:
        raise QuantpipeError(f"calibration.source '{spec.source}' produced no text")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    need = spec.n_samples * spec.seq_len
    for i in order:
        stream += tok(_render(docs[i], tok, spec.chat_template), add_special_tokens=False).input_ids + sep
        if len(stream) >= need:  # a large dataset is only tokenized as far as needed
            break
    if len(stream) < need:
        raise QuantpipeError(
            f"calibration: n_samples x seq_len = {spec.n_samples} x {spec.seq_len} = {need} tokens, but the "
            f"'{spec.source}' source has only {len(stream)}; lower calibration.n_samples or calibration.seq_len, "
            "or add text")
    return torch.tensor(stream[:need], dtype=torch.long).view(spec.n_samples, spec.seq_len)
