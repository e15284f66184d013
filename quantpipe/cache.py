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


def user_cache_root() -> Path:
    """Where quantpipe keeps what it fetches or builds once per machine (llama.cpp's converter, the engines'
    environments): $QUANTPIPE_CACHE, else $XDG_CACHE_HOME/quantpipe, else ~/.cache/quantpipe."""
    if os.environ.get("QUANTPIPE_CACHE"):
        return Path(os.environ["QUANTPIPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantpipe"


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


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: a temp file beside it, then a rename over it. A reader sees the old file or the
    new one, never half of one; a symlink at `path` is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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
    """One `quantpipe run` per run dir: a second one refuses with a clear message instead of interleaving. The
    lock file is opened without following a symlink (a planted link is refused, never truncated)."""
    lock_dir = run_dir / ".quantpipe"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QuantpipeError(f"{lock_dir / 'lock'} is a symbolic link; quantpipe does not write through "
                                 "links: remove it") from None
        raise explain_os_error(e, f"creating the run directory's state folder {lock_dir}") from None
    with os.fdopen(fd, "r+") as f:
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


OUTPUTS = ("results.json", "manifest.json", "matrix.md", "matrix.html", "matrix.png")


def check_run_dir(run_dir: Path, variants: list[str], adopt: bool = False) -> None:
    """A run directory is new, empty, or quantpipe's own (it holds .quantpipe/): quantpipe replaces files there.
    Another non-empty directory is refused, unless `adopt` (--adopt), and then only if none of the paths quantpipe
    would write exists: quantpipe never replaces or removes a file it did not write."""
    if not run_dir.is_dir() or (run_dir / ".quantpipe").is_dir():
        return
    try:
        entries = sorted(p.name for p in run_dir.iterdir())
    except OSError as e:
        raise explain_os_error(e, f"reading the run directory {run_dir}") from None
    if not entries:
        return
    if not adopt:
        raise QuantpipeError(f"output.dir: {run_dir} is not empty ({', '.join(entries[:3])}"
                             + (", ..." if len(entries) > 3 else "") + ") and is not a quantpipe run directory (no "
                             ".quantpipe/ in it); choose a new or empty directory, or pass --adopt to write into it "
                             "(quantpipe never replaces files it did not write)")
    ours = [run_dir / n for n in OUTPUTS] + [run_dir / "artifacts" / v for v in variants]
    clash = [p for p in ours if p.exists() or p.is_symlink()]
    if clash:
        raise QuantpipeError(f"--adopt: {run_dir} already holds {clash[0].relative_to(run_dir)}, which this run would "
                             "write; move it away or choose another output.dir")


def no_space(e: BaseException) -> bool:
    """Whether an error (an OSError, or a library's own error type wrapping one) is a full disk."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def explain_os_error(e: OSError, what: str) -> QuantpipeError:
    if e.errno == errno.ENOSPC:
        return QuantpipeError(f"no space left on the device while {what}; free space and re-run "
                              "(finished stages are kept and will not be redone)")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return QuantpipeError(f"permission denied while {what} ({e.filename}); choose a writable output.dir")
    return QuantpipeError(f"{what} failed: {e.strerror or e} ({e.filename})")
