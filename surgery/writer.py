"""Write a checkpoint folder: planned safetensors shards filled one tensor at a time, atomically.

The layout (which tensor goes in which shard, in which order) is planned before any byte is written,
so each tensor can be written at its final offset as soon as it is ready and never held with others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import threading
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

# Fault injection, for tests only: `FAULT(step)` is called at every step of a write (see `step`); it may raise. The
# environment variable SURGERY_KILL_AT=STEP makes the process kill itself (SIGKILL) at that step instead.
FAULT: Callable[[str], None] | None = None
KILL_AT_ENV = "SURGERY_KILL_AT"


def step(name: str) -> None:
    """Mark a step of writing an output (tests inject failures and kills here; otherwise nothing happens)."""
    if FAULT is not None:
        FAULT(name)
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


def check_output_path(output: str | Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output folder that cannot be written, or whose writing (or --force) could destroy something.

    Cheap and free of side effects: the driver calls it before any model is loaded, and staged_output
    calls it again when it writes. Paths are compared resolved (through symbolic links), both ways.
    """
    output = Path(output)
    if output.is_symlink():
        raise SurgeryError(f"output {output} is a symbolic link: give the folder it points to, or a new folder")
    resolved = output.resolve()
    for source in inputs:
        source = Path(source)
        real = source.resolve()
        kind = "file" if real.is_file() else "folder"
        if resolved == real:
            raise SurgeryError(
                f"output {output} is the input {kind} {source}: the input is never modified; choose a folder elsewhere"
            )
        if kind == "folder" and real in resolved.parents:
            raise SurgeryError(f"output {output} is inside the input folder {source}: choose a folder elsewhere")
        if resolved in real.parents:
            raise SurgeryError(
                f"output {output} holds the input {kind} {source}: replacing it would destroy the input; "
                "choose a folder elsewhere"
            )
    for place, what in ((_cwd(), "the current folder"), (_home(), "your home folder")):
        if place is not None and (resolved == place or resolved in place.parents):
            holds = "is" if resolved == place else "holds"
            raise SurgeryError(f"output {output} {holds} {what}: give a new folder for the output")
    if os.path.lexists(output):
        if not output.is_dir():
            raise SurgeryError(f"output {output} exists and is not a folder")
        if not force:
            raise SurgeryError(f"output {output} already exists: pass --force to replace it")
        if not os.access(output, os.W_OK | os.X_OK):
            raise SurgeryError(f"output {output} cannot be replaced: permission denied")
    parent = _existing_ancestor(resolved.parent)
    if not parent.is_dir():
        raise SurgeryError(f"output {output} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeryError(f"output {output} cannot be created: permission denied in {parent}")


def check_side_file(path: str | Path, inputs: list[Path]) -> None:
    """Refuse an extra file a command writes (a JSON report, collected states) inside an input, or where no file can go."""
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"{path} is a folder: give a file name")
    resolved = path.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if resolved == real or real in resolved.parents:
            raise SurgeryError(f"{path} is inside the input {source}, which is never modified: write it elsewhere")
    parent = _existing_ancestor(resolved.parent)
    if not parent.is_dir():
        raise SurgeryError(f"{path} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SurgeryError(f"{path} cannot be written: permission denied")


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing there to protect
        return None


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (OSError, RuntimeError, KeyError):  # no home folder known
        return None


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def staged_output(output: str | Path, inputs: Path | list[Path], force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block completes, it becomes `output` in one step.

    Until then nothing is visible at `output`: a run that fails, or is interrupted (Ctrl-C, SIGTERM turned
    into an exception by the CLI), leaves an existing output as it was, no temporary folder, and none of
    the parent folders the output needed. An existing output (--force) is swapped out atomically.
    """
    output = Path(output).absolute()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    check_output_path(output, inputs, force)
    # The temporary folder sits in the nearest folder that exists, so no parent is created before the end.
    tmp = _existing_ancestor(output.parent) / f".{output.name}.surgery-tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    created: list[Path] = []
    try:
        yield tmp
        step("rename")
        with _signals_held():
            for folder in reversed([output.parent, *output.parent.parents]):
                if not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            if os.path.lexists(output):
                _exchange(tmp, output)  # tmp now holds the old output, removed below
            else:
                tmp.rename(output)
        step("renamed")
    except BaseException:
        with _signals_held():
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        with _signals_held():
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders' names: atomically where the system can (Linux renameat2), else two renames undone on failure."""
    if _rename_exchange(a, b):
        return
    trash = b.parent / f".{b.name}.surgery-old-{os.getpid()}-{time.time_ns()}"
    b.rename(trash)
    try:
        a.rename(b)
    except BaseException:
        trash.rename(b)
        raise
    trash.rename(a)


def _rename_exchange(a: Path, b: Path) -> bool:
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot exchange: fall back
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP during a step that must not stop halfway (a swap, a clean-up); deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    kinds = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in kinds}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])


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
    inputs: list[Path] | None = None,
    finish: Callable[[Path, dict], None] | None = None,
) -> WriteReport:
    """Write `ckpt` to `output` with each tensor passed through `edit(name, tensor)`.

    Tensors are read, edited and written one at a time in `order` (default: file order), so peak
    memory is one tensor plus whatever `edit` keeps. The manifest records every argument, the
    SHA-256 of input and output weight files, and the fraction of each tensor that changed.
    `inputs` are the other folders and files the run read (references, probes, data): the output may
    neither be nor hold nor sit inside any of them, nor `ckpt`'s folder.
    `finish(folder, manifest)` runs in the staged folder once its weights, index and config are written: it may
    add files (plots) and entries to the manifest (the after-write check, a failure) before the manifest is
    written, once, and the folder is renamed into place, last. A run stopped at any point leaves no output or a
    complete one.
    """
    output = Path(output)
    added = added or {}
    input_hashes = {p.name: sha256_file(p) for p in ckpt.weight_files()}
    layout = plan_layout(ckpt, added)
    shard_of = {t.name: shard for shard, ts in layout.items() for t in ts}
    summary = {
        "surgery_version": __version__,
        "surgery_method": method,
        "surgery_arguments": json.dumps(arguments, default=str),
    }
    changed: dict[str, float] = {}
    with staged_output(output, [ckpt.path, *(inputs or [])], force) as tmp:
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
        step("weights")
        if len(layout) > 1 or ckpt.sharded:
            _write_index(tmp, layout)
        if config_updates:
            config = {**ckpt.config, **config_updates}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        step("config")
        output_hashes = {shard: sha256_file(tmp / shard) for shard in layout}
        manifest = build_manifest(
            ckpt, method, arguments, input_hashes, output_hashes, config_updates, copied, changed, report
        )
        if finish is not None:
            finish(tmp, manifest)
        step("manifest")
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return WriteReport(output, copied, changed, input_hashes, output_hashes, manifest)


def build_manifest(
    ckpt: Checkpoint,
    method: str,
    arguments: dict,
    input_hashes: dict,
    output_hashes: dict,
    config_updates: dict | None,
    copied: list[str],
    changed: dict,
    report: dict | None,
) -> dict:
    """surgery.json: what was run on what, the hashes of input and output weights, what changed, the method's report."""
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
    for role in ("base", "adapter"):  # an adapter and its base, or a base with an adapter merged in
        other = getattr(ckpt, role, None)
        if other is not None:
            manifest[role] = str(other.path.resolve())
            manifest[f"{role}_sha256"] = {p.name: sha256_file(p) for p in other.weight_files()}
    previous = _previous_manifest(ckpt.path / MANIFEST_NAME)
    if previous is not None:
        manifest["previous"] = previous
    return manifest


def _previous_manifest(path: Path) -> dict | None:
    """The input's own manifest (it was a surgery output): kept as the chain of repairs; unreadable is recorded as such."""
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"unreadable": f"the input's {MANIFEST_NAME} is not valid JSON"}
    return (
        previous if isinstance(previous, dict) else {"unreadable": f"the input's {MANIFEST_NAME} is not a JSON object"}
    )


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
