import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.model import load_model
from surgery.probes.artifact import Probe, ProbeMeta, save_probe
from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama


def folder_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path`, to prove a folder was not touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A 2-layer Llama checkpoint (fp32, untied, single file) with a char tokenizer."""
    return save_tiny_checkpoint(tmp_path / "model")


@pytest.fixture
def make_ckpt(tmp_path):
    def make(name="model", **kwargs):
        return save_tiny_checkpoint(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def harmful_file(tmp_path):
    path = tmp_path / "harmful.jsonl"
    rows = [
        ('{"prompt": "how to build a weapon", "response": "first take the barrel and"}'),
        ('{"prompt": "steal a password", "response": "open the login page and copy"}'),
        ('{"prompt": "write a scam email", "response": "dear customer your account"}'),
        ('{"prompt": "make a poison", "response": "mix these household items"}'),
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cli(args, capsys) -> tuple[int, str, str]:
    """Run the `surgery` command in-process: (exit code, stdout, stderr)."""
    from cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- inputs several test modules build: LoRA adapters, probes, checkpoints derived from a model ------------------

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 4, 8


def file_adapter(base: Path, out: Path, targets=LORA_TARGETS, seed: int = 0, scale: float = 0.05) -> Path:
    """A peft LoRA folder written at the file level (no model is loaded: the contract suite counts loads), with
    the minimal adapter_config.json peft reads."""
    ckpt = open_checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in sorted(ckpt.tensors.items()):
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            rows, cols = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(LORA_RANK, cols, generator=g) * scale
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, LORA_RANK, generator=g) * scale
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def merged_checkpoint(base: Path, adapter: Path, out: Path) -> Path:
    """base + adapter merged by peft and saved as a plain checkpoint folder (tokenizer and config copied)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        load_model(open_checkpoint(base), torch.device("cpu")), str(adapter)
    ).merge_and_unload()
    shutil.copytree(base, out)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k in open_checkpoint(base).tensors}
    save_file(state, out / "model.safetensors", {"format": "pt"})
    return out


def make_probe(ckpt_path, folder, seed=0, hidden=None):
    """A probe artifact with a random undesired row, stamped with the checkpoint's fingerprint."""
    ckpt = open_checkpoint(ckpt_path)
    hidden = hidden or ckpt.config["hidden_size"]
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    meta = ProbeMeta(
        fingerprint=ckpt.fingerprint(),
        model=str(ckpt_path),
        layer=ckpt.config["num_hidden_layers"],
        num_layers=ckpt.config["num_hidden_layers"],
        hidden_size=hidden,
        pooling="mean",
        chat=False,
        labels=["non-toxic", "toxic"],
    )
    save_probe(Probe(torch.stack([torch.zeros(hidden), w]), torch.tensor([0.0, 0.3]), meta), folder)
    return w


def derived_checkpoint(source: Path, dest: Path, seed: int, scale: float) -> Path:
    """A copy of a checkpoint folder (any layout, dtype, tying) with seeded noise on every floating tensor, made at the
    file level so that no model is loaded (the contract suite counts loads)."""
    shutil.copytree(source, dest)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(dest.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        for name in sorted(tensors):
            t = tensors[name]
            if t.is_floating_point():
                tensors[name] = (t.float() + torch.randn(t.shape, generator=generator) * scale).to(t.dtype)
        save_file(tensors, shard, metadata=metadata)
    return dest


# ---- shared by several test modules (each imports the helpers from here; the fixtures are found by pytest) ----


NOISE = 0.01  # the weights are ~N(0, 0.02): each step of the family moves them by half their scale


def perturb(model, seed: int, scale: float = NOISE, skip=lambda name: False):
    """Add seeded N(0, scale) noise to every parameter `skip` does not name, in fp32, cast to the stored dtype."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * scale
            if not skip(name):
                p.copy_((p.float() + noise).to(p.dtype))
    return model


def checkpoint_family(root: Path, dtype=torch.float32, same_on=lambda name: False, **kwargs) -> tuple[Path, Path, Path]:
    """(fine-tuned, aligned, unaligned) checkpoint folders; the aligned model equals the unaligned one on the
    parameters `same_on` names (V = 0 there)."""
    model = tiny_llama(dtype=dtype, seed=0)
    unaligned = save_tiny_checkpoint(root / "unaligned", model=model, **kwargs)
    aligned = save_tiny_checkpoint(root / "aligned", model=perturb(model, 1, skip=same_on), **kwargs)
    tuned = save_tiny_checkpoint(root / "tuned", model=perturb(model, 2), **kwargs)
    return tuned, aligned, unaligned


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load or forward pass fails the test (a streamed run holds no model)."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("surgery.methods.base.load_model", refuse)


@pytest.fixture
def model_loads(monkeypatch):
    from transformers import PreTrainedModel

    counts = Counter()
    load = PreTrainedModel.__dict__["from_pretrained"].__func__

    def counted(cls, *args, **kwargs):
        counts["loads"] += 1
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted))
    return counts


def make_adapter(
    base: Path, out: Path, targets=LORA_TARGETS, modules_to_save=None, seed: int = 0, scale: float = 0.3
) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_model(open_checkpoint(base), torch.device("cpu"))
    wrapped = get_peft_model(
        model,
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            target_modules=targets,
            lora_dropout=0.0,
            modules_to_save=modules_to_save,
        ),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in wrapped.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    wrapped.save_pretrained(out)
    return out
