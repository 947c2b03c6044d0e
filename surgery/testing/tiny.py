"""Tiny in-process models and tokenizers: for tests and the CI model organism (no network, seconds on CPU)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def _gemma(layers: int) -> dict:
    """Local and global attention alternating, as gemma2 does by default (gemma3 has 5 local layers per global)."""
    return {
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
    }


# Config beyond the shared sizes, from the number of layers, per model type of the tiny models (one or more per
# family of surgery/arch.py).
FAMILY_CONFIGS = {
    "llama": lambda layers: {},
    "mistral": lambda layers: {},
    "qwen2": lambda layers: {},
    "gemma2": _gemma,
    "gemma3_text": _gemma,
    "phi3": lambda layers: {},
}


def char_tokenizer():
    """A character-level fast tokenizer with a chat template (about 100 symbols)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[2:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(
    model_type: str = "llama",
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    tied: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised causal LM of `model_type` (one of FAMILY_CONFIGS) small enough to train and edit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 or 1,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **FAMILY_CONFIGS[model_type](layers),
    )
    model = AutoModelForCausalLM.from_config(config)
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


def tiny_llama(**kwargs):
    """A randomly initialised Llama small enough to train and edit in a test."""
    return tiny_model("llama", **kwargs)


def save_tiny_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    shard_bytes: int | None = None,
    seed: int = 0,
    model=None,
    model_type: str = "llama",
) -> Path:
    """Save a tiny model (default: a Llama) + char tokenizer as a Hugging Face folder (sharded when shard_bytes is
    given)."""
    path = Path(path)
    model = model if model is not None else tiny_model(model_type, tied=tied, seed=seed, dtype=dtype)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(path, **kwargs)
    char_tokenizer().save_pretrained(path)
    return path
