"""llama.cpp glue shared by the `gguf` method and the llama.cpp runtime: the bindings (llama-cpp-python) with
their log captured, llama.cpp's own HF->GGUF converter (taken from the llama-cpp-python source distribution of
the installed version, so converter and runtime are one llama.cpp), and the check that a file is a whole GGUF.

Nothing here imports llama_cpp at import time: `quantpipe methods` and the core install work without it.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from quantpipe.cache import user_cache_root
from quantpipe.errors import QuantpipeError, first_line

INSTALL_HINT = ("pip install 'quantpipe[gguf]' --find-links DIR_WITH_A_PREBUILT_WHEEL (llama-cpp-python compiles "
                "llama.cpp when no wheel fits: 12 min to 1.5 h on 2 cores; README.md, GGUF)")
CONVERTER_ENV = "QUANTPIPE_LLAMA_CPP_DIR"  # a llama.cpp checkout whose convert_hf_to_gguf.py to use instead
EXTRA_BUFTS_ENV = "QUANTPIPE_LLAMA_EXTRA_BUFTS"  # 1/0: force llama.cpp's extra CPU buffer types on/off
LOG_ENV = "QUANTPIPE_LLAMA_LOG"  # 1: print llama.cpp's log to stderr

_LOG: collections.deque[tuple[int, str]] = collections.deque(maxlen=400)
_CALLBACK: Any = None  # the ctypes callback must stay referenced while llama.cpp may call it
ECHO = os.environ.get(LOG_ENV) == "1"


def bindings() -> Any:
    """The llama_cpp module, its log going to our buffer (and to stderr when QUANTPIPE_LLAMA_LOG=1 or ECHO)."""
    global _CALLBACK
    try:
        import llama_cpp
    except ImportError as e:
        if importlib.util.find_spec("llama_cpp") is None:
            raise QuantpipeError(f"llama.cpp is not installed: {INSTALL_HINT}") from None
        raise QuantpipeError(f"llama.cpp (llama-cpp-python) is installed but fails to load: {first_line(e)}; "
                             f"reinstall it ({INSTALL_HINT})") from None
    except Exception as e:  # noqa: BLE001 - its shared library failed to load (OSError from ctypes, ...)
        raise QuantpipeError(f"llama.cpp (llama-cpp-python) is installed but its library fails to load: "
                             f"{type(e).__name__}: {first_line(e)}; reinstall it ({INSTALL_HINT})") from None
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", "replace")
            _LOG.append((level, line))
            if ECHO:
                sys.stderr.write(line)

        _CALLBACK = _log
        llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def last_error() -> str:
    """The last warning or error line llama.cpp logged (levels 2, 3), for one-line error messages."""
    for level, line in reversed(_LOG):
        if level in (2, 3) and line.strip():
            return line.strip()
    return "no message from llama.cpp"


def version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise QuantpipeError(f"llama.cpp is not installed: {INSTALL_HINT}") from None


def system_info() -> str:
    """llama.cpp's build features, e.g. 'CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1'."""
    return bindings().llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_features() -> list[str]:
    """The features of the CPU backend that are on in this build (AVX2, F16C, REPACK, AMX_INT8, ...)."""
    return [part.split("=")[0].strip() for part in system_info().replace("CPU :", "|").split("|")
            if part.strip().endswith("= 1")]


def use_extra_bufts() -> tuple[bool, str]:
    """Whether to let llama.cpp put weights in its extra CPU buffer types (repacked layouts; AMX tiles on a
    native build for a CPU with AMX), and why. A native build crashed in `ggml_backend_amx_mul_mat` on batched
    evaluation of every quantized GGUF on an AMX Xeon here, so extra buffer types are off when the build has
    AMX, unless QUANTPIPE_LLAMA_EXTRA_BUFTS says otherwise."""
    forced = os.environ.get(EXTRA_BUFTS_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{EXTRA_BUFTS_ENV}={forced}"
    if any(f.startswith("AMX") for f in cpu_features()):
        return False, "off: this llama.cpp build has AMX, whose extra buffer type crashed on batched evaluation"
    return True, "on"


# -- the converter -------------------------------------------------------------------------------------------
def converter_script(fetch: bool = True) -> Path:
    """llama.cpp's convert_hf_to_gguf.py of the installed llama-cpp-python version (with its `conversion`
    package and the gguf-py it was written against). Taken from $QUANTPIPE_LLAMA_CPP_DIR if set, else from the
    cache, else fetched once from the package index (the llama-cpp-python sdist, 77 MB)."""
    if os.environ.get(CONVERTER_ENV):
        script = Path(os.environ[CONVERTER_ENV]) / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise QuantpipeError(f"{CONVERTER_ENV}={os.environ[CONVERTER_ENV]}: no convert_hf_to_gguf.py there")
        return script
    dest = user_cache_root() / "llama.cpp-converter" / version()
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    if not fetch:
        raise QuantpipeError(f"llama.cpp's converter is not in {dest}: run `quantpipe setup-gguf`")
    return fetch_converter(dest)


def fetch_converter(dest: Path) -> Path:
    """Download the llama-cpp-python sdist of the installed version and keep its converter files in `dest`."""
    ver = version()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", tmp, f"llama-cpp-python=={ver}"]
        print(f"fetching llama.cpp's converter: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            why = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise QuantpipeError(f"could not fetch the llama-cpp-python {ver} sdist for llama.cpp's converter ({why}); "
                                 f"with no network, point {CONVERTER_ENV} at a llama.cpp checkout of the same version")
        out = Path(tmp) / "converter"
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        with tarfile.open(sdists[0]) as tar:
            for m in tar.getmembers():
                rel = m.name.partition("/vendor/llama.cpp/")[2]
                if rel and rel.startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = rel
                    tar.extract(m, out, filter="data")
        if not (out / "convert_hf_to_gguf.py").is_file():
            raise QuantpipeError(f"{sdists[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest / "convert_hf_to_gguf.py"


def convert(model_dir: Path, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's converter on an HF model dir (its output goes to this process's stdout/stderr). It runs in
    its own folder, so that nothing in the user's working directory can shadow its modules: every path it gets
    is absolute."""
    script = converter_script()
    model_dir, outfile = Path(model_dir).absolute(), Path(outfile).absolute()
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr, cwd=script.parent)
    if proc.returncode != 0 or not outfile.is_file():
        raise QuantpipeError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit code {proc.returncode})")


# -- GGUF files ----------------------------------------------------------------------------------------------
def check_gguf(path: Path, tokens: bool = False) -> dict[str, Any]:
    """Parse a GGUF's header and tensor table with the gguf library and check that every tensor lies inside
    the file, so llama.cpp is never handed a corrupt or truncated file. Returns a summary; with `tokens`, also
    the stored vocabulary (tokenizer.ggml.tokens) id by id."""
    path = Path(path)
    if not path.is_file():
        raise QuantpipeError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise QuantpipeError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        tensors = reader.tensors
        end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        first = first_line(e)
        raise QuantpipeError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {first})") from None
    if end > size:
        raise QuantpipeError(f"{path}: truncated GGUF: tensor data ends at byte {end}, the file has {size}")
    types = collections.Counter(t.tensor_type.name for t in tensors)
    field = reader.fields.get("general.architecture")
    out = {"n_tensors": len(tensors), "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
           "tensor_types": dict(types.most_common()), "file_bytes": size,
           "architecture": field.contents() if field is not None else None,
           "tensors": {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in tensors}}
    if tokens:
        field = reader.fields.get("tokenizer.ggml.tokens")
        out["tokens"] = list(field.contents()) if field is not None else []
    return out


def tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of `text` with a GGUF's vocabulary (no special tokens added or parsed)."""
    lib = bindings()
    mp = lib.llama_model_default_params()
    mp.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise QuantpipeError(f"{path}: llama.cpp could not load its vocabulary: {last_error()}")
    try:
        data = text.encode("utf-8")
        buf = (lib.llama_token * (len(data) + 16))()
        n = lib.llama_tokenize(lib.llama_model_get_vocab(model), data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise QuantpipeError(f"{path}: llama.cpp tokenization needs {-n} tokens, more than the buffer")
        return list(buf[:n])
    finally:
        lib.llama_model_free(model)
