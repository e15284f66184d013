"""Stage cache: hits and misses by key, artifact digests, atomic directories, the run lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantpipe.cache import StageCache, atomic_dir, digest, run_lock
from quantpipe.errors import QuantpipeError


def test_hit_and_miss(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    k1, k2 = digest({"a": 1}), digest({"a": 2})
    assert k1 != k2 and digest({"a": 1}) == k1
    assert cache.get("s", k1) is None
    cache.put("s", k1, {"x": 5})
    assert cache.get("s", k1) == {"x": 5}
    assert cache.get("s", k2) is None  # changed inputs: miss


def test_artifact_digest_mismatch_is_a_miss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = StageCache(tmp_path)
    art = tmp_path / "artifacts" / "v"
    with atomic_dir(art) as tmp:
        (tmp / "w.bin").write_bytes(b"0123")
    cache.put("quantize:v", "k", {"ok": True}, artifact=art)
    assert cache.get("quantize:v", "k", artifact=art) == {"ok": True}
    (art / "w.bin").write_bytes(b"0124")  # corrupted after the fact
    assert cache.get("quantize:v", "k", artifact=art) is None
    assert "does not match its recorded sha256" in capsys.readouterr().out
    (art / "w.bin").unlink()
    assert cache.get("quantize:v", "k", artifact=art) is None


def test_atomic_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "artifacts" / "v"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert not final.exists()
    assert list((tmp_path / "artifacts").iterdir()) == []


def test_atomic_dir_replaces_old(tmp_path: Path) -> None:
    final = tmp_path / "v"
    for content in (b"old", b"new"):
        with atomic_dir(final) as tmp:
            (tmp / "f").write_bytes(content)
    assert (final / "f").read_bytes() == b"new"


def test_second_run_on_same_dir_refuses(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(QuantpipeError, match="in use by another quantpipe run"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released: usable again
        pass
