"""Calibration ids: shape, determinism by seed, sources, and the too-short error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from quantpipe import calibration
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import CalibrationSpec


def test_bundled_build_is_deterministic(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = CalibrationSpec(n_samples=4, seq_len=64, seed=1)
    docs = calibration.documents(spec)
    assert len(docs) > 10
    a, b = calibration.build(spec, tok, docs), calibration.build(spec, tok, docs)
    assert a.shape == (4, 64) and a.equal(b)
    c = calibration.build(CalibrationSpec(n_samples=4, seq_len=64, seed=2), tok, docs)
    assert not a.equal(c)  # another seed, another document order


def test_files_source_txt_and_jsonl(tiny_model: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    (tmp_path / "a.txt").write_text("first paragraph here.\n\nsecond paragraph there.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "a row of text " * 20}) + "\n")
    spec = CalibrationSpec(source="files", files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
                           text_field="body", n_samples=1, seq_len=16)
    docs = calibration.documents(spec)
    assert docs[:2] == ["first paragraph here.", "second paragraph there."] and len(docs) == 3
    assert calibration.build(spec, tok, docs).shape == (1, 16)


def test_bad_jsonl_and_short_source(tiny_model: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    (tmp_path / "b.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(QuantpipeError, match="line 1 has no string field 'text'"):
        calibration.documents(CalibrationSpec(source="files", files=[str(tmp_path / "b.jsonl")]))
    with pytest.raises(QuantpipeError, match="lower calibration.n_samples or calibration.seq_len"):
        calibration.build(CalibrationSpec(n_samples=1000, seq_len=4096), tok, ["only a little text"])


def test_generated_source_samples_from_the_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    spec = CalibrationSpec(source="generated", n_samples=2, seq_len=64, seed=3)
    docs = calibration.documents(spec, model, tok)
    assert len(docs) == 1 and docs[0].startswith(calibration.GENERATION_PROMPTS[0])
    assert len(tok(docs[0]).input_ids) > 128  # the prompt plus up to 256 sampled tokens
    assert docs == calibration.documents(spec, model, tok)  # seeded
    assert calibration.build(spec, tok, docs).shape == (2, 64)


def test_conversations_render_with_and_without_chat_template(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "user", "content": "how do tides work?"}, {"role": "assistant", "content": "the moon pulls."}]
    assert calibration._render(conv, tok, chat=False) == "how do tides work?\n\nthe moon pulls."
    with pytest.raises(QuantpipeError, match="calibration.chat_template: the model's tokenizer has no chat"):
        calibration._render(conv, tok, chat=True)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    assert calibration._render(conv, tok, chat=True) == "<user>how do tides work?\n<assistant>the moon pulls.\n"
    assert calibration._render("plain", tok, chat=True) == "<user>plain\n"


def test_build_tokenizes_only_what_it_needs(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    seen: list[str] = []

    class CountingTokenizer:
        eos_token_id = tok.eos_token_id

        def __call__(self, text: str, **kw: object):
            seen.append(text)
            return tok(text, **kw)

    docs = [f"document number {i} has some words in it" for i in range(1000)]
    ids = calibration.build(CalibrationSpec(n_samples=2, seq_len=16), CountingTokenizer(), docs)
    assert ids.shape == (2, 16) and len(seen) < 50  # a large source is not tokenized in full
