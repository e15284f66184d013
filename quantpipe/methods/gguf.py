"""`gguf`: a .gguf file for llama.cpp (llama-server, llama-cpp-python, ollama, LM Studio), made by llama.cpp itself.

Steps: llama.cpp's convert_hf_to_gguf.py turns the baseline HF dir into a float GGUF (tokenizer and chat template
inside); llama.cpp's quantizer (`llama_model_quantize`, through llama-cpp-python) writes the requested type.
With `imatrix: true` the quantizer gets an importance matrix computed from the run's calibration ids (the very
token tensor GPTQ and AWQ calibrate on): the mean square of each input column of every Linear, collected with
forward hooks on the baseline model, named as the GGUF names the tensors, and saved beside the model as
imatrix.gguf in llama.cpp's own format (so `llama-quantize --imatrix` can redo the quantization).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.memory import Storage
from quantpipe.methods import Method, MethodParams, QuantizeJob, register

# llama.cpp file types (llama-quantize's names); the enum values come from the bindings at run time
GGUFType = Literal["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                   "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS",
                   "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # written by the converter directly
NO_IMATRIX = {"F32", "F16", "BF16", "Q8_0"}  # types whose quantization ignores an importance matrix
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
# (bytes, elements) of one block of each tensor type: bits per weight of the type a file type mostly uses
BLOCK = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q8_0": (34, 32), "Q6_K": (210, 256), "Q5_K": (176, 256),
         "Q5_1": (24, 32), "Q5_0": (22, 32), "Q4_K": (144, 256), "Q4_1": (20, 32), "Q4_0": (18, 32),
         "IQ4_NL": (18, 32), "IQ4_XS": (136, 256), "Q3_K": (110, 256), "IQ3_S": (110, 256), "IQ3_XXS": (98, 256),
         "Q2_K": (84, 256), "IQ2_S": (82, 256), "IQ2_XS": (74, 256), "IQ2_XXS": (66, 256), "IQ1_M": (56, 256),
         "IQ1_S": (50, 256)}
MAIN_TYPE = {"Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_L": "Q3_K",
             "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S", "Q2_K_S": "Q2_K",
             "IQ2_M": "IQ2_S"}
OUTTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class GGUFParams(MethodParams):
    type: GGUFType = "Q4_K_M"
    imatrix: bool = False  # importance matrix from the run's calibration set

    @model_validator(mode="after")
    def _imatrix(self) -> GGUFParams:
        if self.imatrix and self.type in NO_IMATRIX:
            raise ValueError(f"imatrix: type {self.type} does not use an importance matrix; remove imatrix "
                             "(it matters for the k-quants, IQ and Q4_0/Q5_0-style types)")
        if not self.imatrix and self.type in NEEDS_IMATRIX:
            raise ValueError(f"imatrix: llama.cpp needs an importance matrix for type {self.type}; set imatrix: true")
        return self


def file_name(params: GGUFParams) -> str:
    return f"model-{params.type}.gguf"


def quantize(job: QuantizeJob) -> dict[str, Any]:
    from quantpipe.backends import llamacpp_tools

    params: GGUFParams = job.params
    out = job.out_dir / file_name(params)
    work = job.out_dir / ".convert"
    work.mkdir()
    llamacpp_tools.ECHO = True  # this runs in the quantize worker, whose output is the stage's log file
    meta: dict[str, Any] = {"format_detail": f"GGUF {params.type}", "type": params.type, "file": out.name,
                            "library": f"llama.cpp (llama-cpp-python {llamacpp_tools.version()})"}
    if params.type in FLOAT_TYPES:
        llamacpp_tools.convert(job.base_dir, out, FLOAT_TYPES[params.type])
    else:
        src = work / f"model-{OUTTYPE[job.model.dtype]}.gguf"
        llamacpp_tools.convert(job.base_dir, src, OUTTYPE[job.model.dtype])
        imatrix = None
        if params.imatrix:
            src_info = llamacpp_tools.check_gguf(src)
            imatrix, stats = importance_matrix(job.base_dir, job.calibration, src_info["architecture"],
                                               set(src_info["tensors"]))
            write_imatrix(job.out_dir / "imatrix.gguf", imatrix, stats)
            meta["imatrix"] = {"file": "imatrix.gguf", **{k: v for k, v in stats.items() if k != "counts"}}
        quantize_file(src, out, params.type, imatrix)
        src.unlink()
    work.rmdir()
    info = llamacpp_tools.check_gguf(out, tokens=True)
    meta["tensor_types"] = info["tensor_types"]
    meta["bits_per_weight"] = 8 * info["tensor_bytes"] / sum(_numel(s) for _, s in info["tensors"].values())
    meta["vocab"] = vocabulary_check(job.base_dir, out, info["tokens"])
    meta["needs"] = f"pip install llama-cpp-python=={llamacpp_tools.version()} (or any llama.cpp build)"
    meta["usage"] = ("from llama_cpp import Llama\n"
                     f"llm = Llama(model_path=\"PATH/{out.name}\", n_ctx=4096)\n"
                     "print(llm.create_chat_completion(messages=[{\"role\": \"user\", \"content\": \"Hi!\"}]))")
    meta["serve"] = (f"llama-server -m PATH/{out.name} --port 8080            # llama.cpp's server, OpenAI API\n"
                     f"python -m llama_cpp.server --model PATH/{out.name}   # pip install 'llama-cpp-python[server]'\n"
                     f"printf 'FROM PATH/{out.name}\\n' > Modelfile && ollama create {job.variant} -f Modelfile")
    return meta


def _numel(shape: list[int]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def quantize_file(src: Path, dst: Path, type_name: str, imatrix: dict[str, torch.Tensor] | None) -> None:
    """llama.cpp's quantizer: float GGUF `src` -> `dst` of file type `type_name`, with an importance matrix."""
    from quantpipe.backends import llamacpp_tools

    lib = llamacpp_tools.bindings()
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise QuantpipeError(f"type: this llama.cpp ({llamacpp_tools.version()}) has no file type {type_name}")
    p = lib.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = torch.get_num_threads()
    keep: list[Any] = []  # the arrays llama.cpp reads must outlive the call
    if imatrix:
        entries = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = (ctypes.c_float * values.numel())(*values.float().tolist())
            keep += [arr, name.encode()]
            entries[i].name, entries[i].data, entries[i].size = keep[-1], arr, values.numel()
        entries[len(imatrix)].name = None  # the terminator llama.cpp looks for
        p.imatrix = entries
        keep.append(entries)
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not dst.is_file():
        raise QuantpipeError(f"llama.cpp could not quantize to {type_name}: {llamacpp_tools.last_error()}")


@torch.inference_mode()
def importance_matrix(base_dir: Path, calib: torch.Tensor | None, arch: str, gguf_names: set[str],
                      batch: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Mean square of each input column of every Linear over the calibration tokens, keyed by the GGUF tensor
    name of its weight (llama.cpp's imatrix statistic). Linears the GGUF does not have are skipped."""
    import gguf
    from transformers import AutoModelForCausalLM

    if calib is None:
        raise QuantpipeError("imatrix: the run has no calibration ids")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise QuantpipeError(f"imatrix: the gguf library does not know architecture '{arch}'")
    tmap = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        name = tmap.get_name(mod_name)
        if name is None or f"{name}.weight" not in gguf_names:
            continue
        key = f"{name}.weight"

        def hook(_m: Any, args: tuple[torch.Tensor, ...], key: str = key) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    if not hooks:
        raise QuantpipeError(f"imatrix: no Linear of the model maps to a tensor of the GGUF ({arch})")
    for i in range(0, calib.shape[0], batch):
        x = calib[i:i + batch]
        model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    for h in hooks:
        h.remove()
    matrix = {k: (sums[k] / counts[k]).float() for k in sums}
    stats = {"n_tensors": len(matrix), "tokens": int(calib.numel()), "chunks": int(calib.shape[0]),
             "chunk_size": int(calib.shape[1]), "counts": counts,
             "source": "forward hooks on the baseline model over the run's calibration ids"}
    return matrix, stats


def write_imatrix(path: Path, matrix: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
    """Save in llama.cpp's imatrix GGUF layout: `<tensor>.in_sum2` (sum of squares) and `<tensor>.counts`."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, ["quantpipe calibration ids"])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, stats["chunks"])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, stats["chunk_size"])
    for name in sorted(matrix):
        n = stats["counts"][name]
        w.add_tensor(f"{name}.in_sum2", (matrix[name].double() * n).float().numpy()[None, :])
        w.add_tensor(f"{name}.counts", np.array([[float(n)]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def vocabulary_check(base_dir: Path, gguf_path: Path, theirs: list[str]) -> dict[str, Any]:
    """Does GGUF token id i (`theirs`: the file's stored vocabulary) hold the same token as the baseline
    tokenizer's id i, for every id? The eval feeds the same ids to every runtime, so its numbers are comparable
    only if this holds."""
    from transformers import AutoTokenizer

    from quantpipe import data
    from quantpipe.backends import llamacpp_tools

    tok = AutoTokenizer.from_pretrained(base_dir)
    ours = tok.convert_ids_to_tokens(list(range(len(tok))))
    diff = [i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i]]
    sample = data.eval_text().read_text(encoding="utf-8")[:20000]
    hf_ids = tok(sample, add_special_tokens=False).input_ids
    cpp_ids = llamacpp_tools.tokenize(gguf_path, sample)
    return {"one_to_one": not diff and len(ours) == len(theirs), "n_baseline": len(ours), "n_gguf": len(theirs),
            "n_different": len(diff) + abs(len(ours) - len(theirs)),
            "examples": [[i, ours[i], theirs[i]] for i in diff[:5]],
            # serving tokenizes with llama.cpp: does it give the ids the baseline tokenizer gives?
            "tokenization_matches": hf_ids == cpp_ids, "tokenization_sample_tokens": len(hf_ids)}


def storage(params: GGUFParams, dtype: str) -> Storage:
    """Nominal bytes: 1-D tensors (norms) F32, every matrix (token embedding included) in the type's main
    tensor type. Exact for the float types and Q8_0; the k-quant mixes put some tensors in other types, and
    llama.cpp falls back to other types where a row length is not a multiple of the block (256 for k-quants)."""
    b, n = BLOCK[MAIN_TYPE.get(params.type, params.type)]
    exact = params.type in NO_IMATRIX  # even Q4_0 files put the output matrix in Q6_K (or a fallback)
    return Storage(float_bytes=4, linear=lambda out, inp: out * inp * b // n,
                   embedding=lambda vocab, hidden: vocab * hidden * b // n, exact=exact)


class GGUF(Method):
    name = "gguf"
    summary = "llama.cpp GGUF (F16, Q8_0, k-quants, IQ types), importance matrix from the calibration set"
    Params = GGUFParams
    needs = Requirements(("llama_cpp", "gguf", "sentencepiece"), "gguf", ("llama_cpp_python", "gguf", "transformers"),
                         loads=("llama_cpp",))

    def format(self, p: GGUFParams) -> str:
        return "gguf"

    def calibrates(self, p: GGUFParams) -> bool:
        return p.imatrix

    def storage(self, p: GGUFParams, dtype: str) -> Storage:
        return storage(p, dtype)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        return quantize(job)


register(GGUF())
