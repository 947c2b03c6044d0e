"""Load a checkpoint as a transformers model, and name the modules a method may touch."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .arch import in_block, matches, model_family
from .checkpoint import Checkpoint, first_line
from .errors import SurgeryError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SurgeryError(f"unknown device '{device}': use cpu, cuda or auto")
    return torch.device(device)


def compute_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow and lossy there); the stored dtype on GPU."""
    if device.type == "cpu" or stored is None or not stored.is_floating_point:
        return torch.float32
    return stored


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader uses tqdm directly
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_config(ckpt: Checkpoint | Path):
    from transformers import AutoConfig

    _quiet_transformers()
    folder = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as e:
        model_type = ckpt.model_type if isinstance(ckpt, Checkpoint) else "?"
        raise SurgeryError(
            f"unknown architecture '{model_type}' in {folder / 'config.json'}: "
            f"this transformers cannot build it ({first_line(e)[:120]})"
        )
    except Exception as e:  # noqa: BLE001 - values no configuration accepts (zero heads, a word for a size) are the file's fault
        raise SurgeryError(
            f"{folder / 'config.json'} is not a configuration transformers can read: "
            f"{type(e).__name__}: {first_line(e)}"
        )


def meta_model(ckpt: Checkpoint) -> nn.Module:
    """The model's module tree on the meta device (names and shapes, no memory), checked against the tensors."""
    model = _build_on_meta(ckpt)
    check_tensors(ckpt, model)
    return model


def _build_on_meta(ckpt: Checkpoint) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_config(ckpt)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SurgeryError(f"architecture '{ckpt.model_type}' is not a causal language model")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - sizes no model can have (zero heads, negative layers, ...) are config.json's fault
        raise SurgeryError(f"{ckpt.path / 'config.json'} describes a model that cannot be built: {first_line(e)}")


def check_tensors(ckpt: Checkpoint, model: nn.Module | None = None) -> None:
    """Refuse a checkpoint whose tensors are not the ones its config's architecture has, from the headers alone.

    transformers fills a missing weight with random values and drops an unexpected one, then runs: every
    figure measured on such a model is wrong. Missing, unexpected, wrongly shaped and integer-for-float
    tensors are each an error naming the first offender; a tied head may be absent (it is the embedding).
    """
    model = model if model is not None else _build_on_meta(ckpt)
    if _renames_tensors(model):
        return  # this architecture's stored names are converted at load (fused MoE experts): load_model checks the result
    expected = model.state_dict()
    stored = {_model_name(model, name, expected): info for name, info in ckpt.tensors.items()}
    where = ckpt.path
    described = f"config.json's {type(model).__name__}"
    if stored and not any(name in stored for name in expected):
        raise SurgeryError(
            f"{where}: config.json describes a {ckpt.model_type} model, but none of its tensors are in the weights "
            f"(they hold {next(iter(ckpt.tensors))}, ...): config.json and the weights are of different architectures"
        )
    missing = [
        names[0]
        for names in _tied_groups(model, expected)
        if not any(n in stored for n in names) and not _ignored(model, "missing", names[0])
    ]
    if missing:
        raise SurgeryError(
            f"{where} lacks {len(missing)} tensor(s) that {described} needs, first {missing[0]}: "
            "the weights are incomplete or config.json describes another model"
        )
    unexpected = [n for n in stored if n not in expected and not _ignored(model, "unexpected", n)]
    if unexpected:
        raise SurgeryError(
            f"{where} holds {len(unexpected)} tensor(s) that {described} has no place for, first "
            f"{unexpected[0]}: config.json describes another model"
        )
    for name, want in expected.items():
        info = stored.get(name)
        if info is None:
            continue
        if tuple(info.shape) != tuple(want.shape):
            raise SurgeryError(
                f"{name} in {where} has shape {list(info.shape)}, but {described} expects {list(want.shape)}"
            )
        if want.dtype.is_floating_point and not info.dtype.is_floating_point:
            raise SurgeryError(
                f"{name} in {where} is stored as {str(info.dtype).removeprefix('torch.')}, but {described} "
                "expects floating-point weights"
            )


def _tied_groups(model: nn.Module, expected: dict) -> list[list[str]]:
    """State-dict names grouped by the parameter they are: tied names (lm_head = embed_tokens) share a group."""
    owner = {n: id(t) for n, t in model.named_parameters(remove_duplicate=False)}
    owner.update({n: id(t) for n, t in model.named_buffers(remove_duplicate=False)})
    groups: dict[int, list[str]] = {}
    for name in expected:
        groups.setdefault(owner.get(name, id(name)), []).append(name)
    return list(groups.values())


def _model_name(model: nn.Module, name: str, expected: dict) -> str:
    """A stored name as the model calls it: a base-model checkpoint lacks the head's prefix ("model.")."""
    prefix = getattr(model, "base_model_prefix", "")
    if name in expected or not prefix:
        return name
    if f"{prefix}.{name}" in expected:
        return f"{prefix}.{name}"
    return name


def _ignored(model: nn.Module, kind: str, name: str) -> bool:
    """The architecture's own list of names transformers tolerates missing or unexpected (old buffers...)."""
    patterns = getattr(model, f"_keys_to_ignore_on_load_{kind}", None) or []
    return any(re.search(p, name) for p in patterns)


def _renames_tensors(model: nn.Module) -> bool:
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
    except ImportError:
        return bool(getattr(model, "_checkpoint_conversion_mapping", None))
    return bool(extract_weight_conversions_for_model(model))


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the checkpoint for calibration/evaluation, in eval mode, on `device`.

    Strict: the tensors are checked against the architecture first (check_tensors), and transformers'
    own loading report must be clean. Safetensors are what transformers reads; pickle weights (opted in)
    were read by open_checkpoint's weights-only unpickler and are handed over from memory, so
    transformers never opens a pickle file.
    """
    if hasattr(ckpt, "overrides"):  # a base with an adapter merged in (surgery.adapter.MergedCheckpoint)
        overrides = ckpt.overrides()
        model = load_model(ckpt.base, device, dtype)
        with torch.no_grad():
            for name, tensor in overrides.items():
                param = model.get_parameter(name)
                param.copy_(tensor.to(param.device, param.dtype))
        return model
    meta = meta_model(ckpt)
    if dtype is None:
        stored = next((t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point), None)
        dtype = compute_dtype(device, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if ckpt.is_pickle:
                model, info = type(meta).from_pretrained(
                    None, config=meta.config, state_dict=ckpt.state, dtype=dtype, output_loading_info=True
                )
            else:
                model, info = type(meta).from_pretrained(
                    str(ckpt.path), dtype=dtype, use_safetensors=True, output_loading_info=True
                )
        except (OSError, ValueError, RuntimeError) as e:
            raise SurgeryError(f"transformers cannot load {ckpt.path}: {first_line(e)[:200]}")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = sorted(map(str, info.get(kind) or []))
        if found:
            raise SurgeryError(
                f"{ckpt.path} does not match its config.json: {len(found)} {kind.replace('_', ' ')} at load, "
                f"first {found[0]}"
            )
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, refusing one that transformers would silently replace or that the model cannot read."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    if (path / "config.json").is_file():
        load_config(path)  # AutoTokenizer reads config.json too: a bad one is named as such, not as a bad tokenizer
    _check_tokenizer_class(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - whatever transformers or tokenizers raise, the tokenizer files are unusable
            raise SurgeryError(f"no usable tokenizer in {path}: {first_line(e)[:200]}")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise SurgeryError(
                f"the tokenizer in {path} has neither a pad nor an end-of-sequence token: batches cannot be padded"
            )
        tok.pad_token = tok.eos_token
    vocab = _config_vocab_size(path)
    if vocab is not None and len(tok) > vocab:
        raise SurgeryError(
            f"the tokenizer in {path} has {len(tok)} tokens, but the model's vocabulary (vocab_size in "
            f"config.json) has {vocab}: its ids would fall outside the embedding"
        )
    return tok


def _check_tokenizer_class(folder: Path) -> None:
    """An unknown tokenizer_class makes transformers fall back to another tokenizer without saying so."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SurgeryError(f"{config_path} is not valid JSON: {e}")
    if not isinstance(config, dict):
        raise SurgeryError(f"{config_path} is not a JSON object")
    name = config.get("tokenizer_class")
    if name is None:
        return
    if not isinstance(name, str) or not any(tokenizer_class_from_name(n) for n in {name, name.removesuffix("Fast")}):
        raise SurgeryError(
            f"{config_path} names tokenizer_class {name!r}, which this transformers does not have "
            "(it would silently use another tokenizer)"
        )


def _config_vocab_size(folder: Path) -> int | None:
    try:
        vocab = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def linear_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the nn.Linear modules to edit.

    Default: every Linear inside the decoder blocks (attention and MLP projections); embeddings and
    lm_head only when a pattern names them. Patterns are shell globs matched against module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not patterns:
        family = model_family(model)
        return [n for n in names if in_block(n, family)]
    chosen = [n for n in names if matches(n, patterns)]
    if not chosen:
        raise SurgeryError(
            f"--targets {','.join(patterns)} matches no Linear module (e.g. {names[0] if names else 'none'})"
        )
    return chosen


def weight_name(ckpt: Checkpoint, module: str) -> str:
    """The checkpoint tensor holding `module`'s weight; tied heads resolve to the embedding."""
    name = f"{module}.weight"
    if name not in ckpt.tensors:
        raise SurgeryError(f"module {module} has no tensor {name} in the checkpoint (tied or renamed weights)")
    return name
