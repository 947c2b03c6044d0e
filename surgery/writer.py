"""Write a checkpoint folder: planned safetensors shards filled one tensor at a time, atomically.

The layout (which tensor goes in which shard, in which order) is planned before any byte is written,
so each tensor can be written at its final offset as soon as it is ready and never held with others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__
from .checkpoint import (
    INDEX_NAME,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    TORCH_TO_SAFETENSORS,
    Checkpoint,
    sha256_file,
)
from .errors import SurgeryError


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class ShardWriter:
    """Writes one .safetensors file whose header is fixed up front; tensors may arrive in any order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str]):
        self.path = path
        self.planned = {t.name: t for t in tensors}
        header: dict = {"__metadata__": metadata} if metadata else {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": TORCH_TO_SAFETENSORS[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            self.offsets[t.name] = offset
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
        self.data_start = 8 + len(raw)
        self.written: set[str] = set()
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.planned[name]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, planned {planned.dtype}{planned.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(memoryview(data))
        self.written.add(name)

    def close(self) -> None:
        self.file.close()
        missing = set(self.planned) - self.written
        if missing:
            raise RuntimeError(f"{self.path.name}: {len(missing)} planned tensors never written, e.g. {min(missing)}")


def plan_layout(ckpt: Checkpoint, added: dict[str, torch.Tensor] | None = None) -> dict[str, list[PlannedTensor]]:
    """Mirror the input's shards (same files, same tensor order); new tensors join the last shard."""
    layout: dict[str, list[PlannedTensor]] = {}
    shard_names = ckpt.shards if ckpt.shards else [SINGLE_NAME]
    for shard in shard_names:
        layout[shard] = []
    for info in sorted(ckpt.tensors.values(), key=lambda t: (t.shard, t.start, t.name)):
        shard = info.shard if info.shard in layout else SINGLE_NAME
        layout.setdefault(shard, []).append(PlannedTensor(info.name, info.dtype, info.shape))
    for name, tensor in (added or {}).items():
        layout[shard_names[-1]].append(PlannedTensor(name, tensor.dtype, tuple(tensor.shape)))
    return layout


@contextlib.contextmanager
def staged_output(output: Path, source: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; rename it into place only if the block completes."""
    output = Path(output).absolute()
    source = Path(source).resolve()
    resolved = output.resolve()
    if resolved == source or source in resolved.parents:
        raise SurgeryError(f"output {output} is inside the input folder {source}: choose a folder elsewhere")
    if output.exists() and not force:
        raise SurgeryError(f"output {output} already exists: pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise SurgeryError(f"output {output} exists and is not a folder")
    if output.parent.exists() and not output.parent.is_dir():
        raise SurgeryError(f"the parent of {output} is not a folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.surgery-tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            trash = output.parent / f".{output.name}.surgery-old-{os.getpid()}-{time.time_ns()}"
            output.rename(trash)
            tmp.rename(output)
            shutil.rmtree(trash)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(ckpt: Checkpoint, dest: Path) -> list[str]:
    """Copy every non-weight file (config, tokenizer, chat template, README...) and return their names."""
    weights = set(ckpt.shards) | {INDEX_NAME, MANIFEST_NAME}
    copied = []
    for src in sorted(ckpt.path.rglob("*")):
        rel = src.relative_to(ckpt.path)
        if not src.is_file() or rel.parts[0].startswith(".surgery") or str(rel) in weights:
            continue
        if src.suffix in PICKLE_SUFFIXES or src.suffix == ".safetensors":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied.append(str(rel))
    return copied


@dataclass
class WriteReport:
    output: Path
    copied_files: list[str]
    changed_fraction: dict[str, float]
    input_sha256: dict[str, str]
    output_sha256: dict[str, str]
    manifest: dict = field(default_factory=dict)


def write_checkpoint(
    ckpt: Checkpoint,
    output: str | Path,
    edit: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    method: str,
    arguments: dict,
    added: dict[str, torch.Tensor] | None = None,
    config_updates: dict | None = None,
    report: dict | None = None,
    force: bool = False,
    order: list[str] | None = None,
) -> WriteReport:
    """Write `ckpt` to `output` with each tensor passed through `edit(name, tensor)`.

    Tensors are read, edited and written one at a time in `order` (default: file order), so peak
    memory is one tensor plus whatever `edit` keeps. The manifest records every argument, the
    SHA-256 of input and output weight files, and the fraction of each tensor that changed.
    """
    output = Path(output)
    added = added or {}
    input_hashes = {p.name: sha256_file(p) for p in ckpt.weight_files()}
    layout = plan_layout(ckpt, added)
    shard_of = {t.name: shard for shard, ts in layout.items() for t in ts}
    summary = {"surgery_version": __version__, "surgery_method": method, "surgery_arguments": json.dumps(arguments, default=str)}
    changed: dict[str, float] = {}
    with staged_output(output, ckpt.path, force) as tmp:
        copied = copy_side_files(ckpt, tmp)
        writers = {}
        try:
            for shard, tensors in layout.items():
                meta = dict(ckpt.shard_metadata.get(shard, {}))
                meta.setdefault("format", "pt")
                meta.update(summary)
                writers[shard] = ShardWriter(tmp / shard, tensors, meta)
            for name in order or [t.name for ts in layout.values() for t in ts if t.name not in added]:
                original = ckpt.read(name)
                new = edit(name, original)
                if new is not original:
                    changed[name] = _fraction_changed(original, new)
                writers[shard_of[name]].write(name, new)
                del original, new
            for name, tensor in added.items():
                writers[shard_of[name]].write(name, tensor)
                changed[name] = 1.0
        finally:
            for w in writers.values():
                w.file.close()
        for w in writers.values():
            w.close()
        if len(layout) > 1 or ckpt.sharded:
            _write_index(tmp, layout)
        config = json.loads((ckpt.path / "config.json").read_text())
        if config_updates:
            config.update(config_updates)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        output_hashes = {shard: sha256_file(tmp / shard) for shard in layout}
        manifest = {
            "tool": "model-surgery",
            "version": __version__,
            "method": method,
            "command": _command_line(),
            "arguments": arguments,
            "input": str(ckpt.path.resolve()),
            "input_sha256": input_hashes,
            "output_sha256": output_hashes,
            "config_updates": config_updates or {},
            "copied_files": copied,
            "changed_fraction": changed,
            "report": report or {},
        }
        previous = ckpt.path / MANIFEST_NAME
        if previous.is_file():
            manifest["previous"] = json.loads(previous.read_text())
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return WriteReport(output, copied, changed, input_hashes, output_hashes, manifest)


def _fraction_changed(old: torch.Tensor, new: torch.Tensor) -> float:
    if old.shape != new.shape:
        return 1.0
    return (old != new.to(old.dtype)).float().mean().item() if old.numel() else 0.0


def _write_index(folder: Path, layout: dict[str, list[PlannedTensor]]) -> None:
    total = sum(t.nbytes for ts in layout.values() for t in ts)
    weight_map = {t.name: shard for shard, ts in layout.items() for t in ts}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _command_line() -> str:
    import sys

    return " ".join(sys.argv)
