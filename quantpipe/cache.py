"""Stage cache keyed by content hashes, atomic artifact directories, file digests and the run-dir lock.

A stage's key hashes its recipe slice, the keys of the stages it depends on and the library versions it uses.
Its record (key + result + sha256 of the files it wrote) is written only after the stage finished, so a killed
run redoes an unfinished stage and a re-run skips a finished one. Artifact directories are built under a
temporary name and renamed into place; a cached artifact whose files no longer match their digests is rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StageCache:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / ".quantpipe" / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage.replace(':', '--')}.json"

    def get(self, stage: str, key: str, artifact: Path | None = None) -> dict[str, Any] | None:
        """The cached result of `stage` if its key matches and its artifact files are intact; else None."""
        p = self._path(stage)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        if rec.get("key") != key:
            return None
        if artifact is not None:
            if not artifact.is_dir() or dir_digests(artifact) != rec.get("files"):
                print(f"warning: {artifact} does not match its recorded sha256 digests; rebuilding it")
                return None
        return rec["result"]

    def put(self, stage: str, key: str, result: dict[str, Any], artifact: Path | None = None) -> None:
        rec = {"stage": stage, "key": key, "result": result}
        if artifact is not None:
            rec["files"] = dir_digests(artifact)
        write_json(self._path(stage), rec)

    def files(self, stage: str) -> dict[str, str]:
        p = self._path(stage)
        return json.loads(p.read_text()).get("files", {}) if p.is_file() else {}


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `final`; on success it replaces `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(root: Path) -> None:
    """Remove temp dirs left behind by a killed run (never trusted, never reused)."""
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `quantpipe run` per run dir: a second one refuses with a clear message instead of interleaving."""
    lock_dir = run_dir / ".quantpipe"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise QuantpipeError(f"{run_dir} is in use by another quantpipe run ({holder}); wait for it to "
                                 "finish or choose another output.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def explain_os_error(e: OSError, what: str) -> QuantpipeError:
    if e.errno == errno.ENOSPC:
        return QuantpipeError(f"no space left on the device while {what}; free space and re-run "
                              "(finished stages are kept and will not be redone)")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return QuantpipeError(f"permission denied while {what} ({e.filename}); choose a writable output.dir")
    return QuantpipeError(f"{what} failed: {e.strerror or e} ({e.filename})")
