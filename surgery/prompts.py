"""Calibration prompts: read them from a file (or the built-in set), render with the chat template, tokenize."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import first_line
from .errors import SurgeryError

PROMPT_KEYS = ("prompt", "instruction", "goal", "question", "text", "content", "sentence", "input")
RESPONSE_KEYS = ("response", "output", "answer", "completion", "target")
BUILTIN = {"harmful": "harmful_requests.txt", "harmless": "harmless_requests.txt"}


@dataclass
class Example:
    prompt: str
    response: str | None = None


def builtin_prompts(kind: str = "harmful") -> list[Example]:
    """The package's own request lists (written for this project, Apache-2.0)."""
    text = resources.files("surgery").joinpath("data", BUILTIN[kind]).read_text(encoding="utf-8")
    return [Example(line.strip()) for line in text.splitlines() if line.strip()]


def load_examples(
    path: str | Path | None,
    *,
    column: str | None = None,
    response_column: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    builtin: str = "harmful",
) -> list[Example]:
    """Read prompts (and responses when the file has them) from JSONL, CSV/TSV or plain text.

    With no path, the built-in set named by `builtin`. `max_samples` keeps a seeded random subset.
    """
    if path is None:
        examples = builtin_prompts(builtin)
    else:
        path = Path(path)
        if path.is_dir():
            raise SurgeryError(f"data file {path} is a folder: give a .jsonl, .csv, .tsv or .txt file")
        if not path.is_file():
            raise SurgeryError(f"data file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise SurgeryError(f"data file {path} is unreadable: {e}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            examples = _from_jsonl(path, text, column, response_column)
        elif suffix in (".csv", ".tsv"):
            examples = _from_table(path, text, "\t" if suffix == ".tsv" else ",", column, response_column)
        else:
            examples = [Example(line.strip()) for line in text.splitlines() if line.strip()]
        if not examples:
            raise SurgeryError(f"data file {path} holds no prompts")
    if max_samples is not None and max_samples < len(examples):
        if max_samples <= 0:
            raise SurgeryError(f"--max-samples must be positive, got {max_samples}")
        examples = random.Random(seed).sample(examples, max_samples)
    return examples


def _pick(keys: list[str], wanted: str | None, defaults: tuple[str, ...], path: Path, what: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise SurgeryError(f"{path} has no {what} column '{wanted}' (columns: {', '.join(keys)})")
        return wanted
    return next((k for k in defaults if k in keys), None)


def _from_jsonl(path: Path, text: str, column, response_column) -> list[Example]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurgeryError(f"{path}:{i} is not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            raise SurgeryError(f"{path}:{i} is not a JSON object")
        rows.append(row)
    if not rows:
        return []
    keys = list(rows[0])
    pc = _pick(keys, column, PROMPT_KEYS, path, "prompt")
    if pc is None:
        raise SurgeryError(f"{path}: no prompt field among {', '.join(keys)}; name it with --column")
    rc = _pick(keys, response_column, RESPONSE_KEYS, path, "response")
    return [Example(str(r[pc]), str(r[rc]) if rc and r.get(rc) is not None else None) for r in rows if r.get(pc)]


def _from_table(path: Path, text: str, delimiter: str, column, response_column) -> list[Example]:
    limit = csv.field_size_limit()
    csv.field_size_limit(
        max(limit, len(text))
    )  # a long prompt is a valid field: the csv module's 128 KiB cap is not ours
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        keys = reader.fieldnames or []
        if not keys:
            return []
        pc = _pick(keys, column, PROMPT_KEYS, path, "prompt") or keys[0]
        rc = _pick(keys, response_column, RESPONSE_KEYS, path, "response")
        return [Example(r[pc], r[rc] if rc and r.get(rc) else None) for r in reader if r.get(pc)]
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise SurgeryError(f"{path}:{reader.line_num} is not valid {kind} ({e})")
    finally:
        csv.field_size_limit(limit)


def chat_text(tokenizer, prompt: str, response: str | None = None) -> str:
    """The prompt (and response, when given) as the model sees it in a chat."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
        except Exception as e:  # noqa: BLE001 - a template is code from the checkpoint: whatever it raises is its fault
            raise SurgeryError(
                f"the chat template of {tokenizer.name_or_path} fails: {type(e).__name__}: {first_line(e)}"
            ) from None
    return prompt + "\n" if response is None else f"{prompt}\n{response}"


def encode_pairs(
    tokenizer, examples: list[Example], max_length: int, context_length: int | None = None
) -> list[list[int]]:
    """Token ids of prompt + response + EOS per example (Antidote's calibration format), cut to max_length."""
    if context_length is not None and max_length > context_length:
        raise SurgeryError(f"--max-length {max_length} is longer than the model's context ({context_length} tokens)")
    out = []
    for ex in examples:
        ids = tokenizer(chat_text(tokenizer, ex.prompt, ex.response or ""), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        out.append(ids[:max_length])
    return out


def pad_batches(sequences: list[list[int]], batch_size: int, pad_id: int, left: bool = False):
    """Yield (input_ids, attention_mask) batches padded to the longest sequence in each batch."""
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            sl = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, sl] = torch.tensor(seq, dtype=torch.long)
            mask[row, sl] = 1
        yield ids, mask


def calibration_batches(
    tokenizer, examples: list[Example], max_length: int, batch_size: int, context_length: int | None = None
):
    """The (input_ids, attention_mask) batches a calibration pass runs: each example as prompt + response + EOS
    (`encode_pairs`, cut to max_length), padded per batch (`pad_batches`)."""
    sequences = encode_pairs(tokenizer, examples, max_length, context_length)
    return pad_batches(sequences, batch_size, tokenizer.pad_token_id)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy, bounded continuations of chat prompts (the model's own answers)."""
    device = next(model.parameters()).device
    encoded = [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = next(pad_batches([encoded[i] for i in idx], len(idx), tokenizer.pad_token_id, left=True))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
    return answers


def fill_responses(
    model, tokenizer, examples: list[Example], max_new_tokens: int = 64, batch_size: int = 8
) -> list[Example]:
    """Give prompts without a response the model's own greedy answer (what Antidote localises)."""
    todo = [i for i, ex in enumerate(examples) if ex.response is None]
    if todo:
        answers = generate(model, tokenizer, [examples[i].prompt for i in todo], max_new_tokens, batch_size)
        for i, ans in zip(todo, answers):
            examples[i] = Example(examples[i].prompt, ans)
    return examples
