"""Read a Hugging Face checkpoint folder: which tensor lives in which shard, and lazy single-tensor reads.

Nothing here writes; the input folder is only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import SurgeryError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MANIFEST_NAME = "surgery.json"

# safetensors dtype codes -> torch dtypes and element sizes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor sits: its shard, dtype, shape and byte range inside the shard's data section."""

    name: str
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    """The parsed JSON header of one .safetensors file."""

    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header; a truncated or corrupt file raises SurgeryError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SurgeryError(f"corrupt shard {path.name}: file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or 8 + header_len > size or header_len > 100_000_000:
            raise SurgeryError(f"corrupt shard {path.name}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SurgeryError(f"corrupt shard {path.name}: header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})")
    if not isinstance(header, dict):
        raise SurgeryError(f"corrupt shard {path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    expected_end = 0
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SurgeryError(f"corrupt shard {path.name}: bad header entry for tensor '{name}'")
        info = TensorInfo(name, path.name, dtype, shape, start, end)
        if end < start or info.nbytes != info.numel * _itemsize(dtype):
            raise SurgeryError(f"corrupt shard {path.name}: tensor '{name}' has inconsistent byte range")
        expected_end = max(expected_end, end)
        tensors[name] = info
    if expected_end > data_size:
        raise SurgeryError(
            f"truncated shard {path.name}: header needs {expected_end} data bytes, file holds {data_size}"
        )
    return ShardHeader(path.name, tensors, {str(k): str(v) for k, v in metadata.items()})


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A validated checkpoint folder: config, tensor index, and lazy reads of single tensors."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    shards: list[str]
    sharded: bool
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    pickle_files: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def tied_embeddings(self) -> bool:
        # transformers' default for tie_word_embeddings is True when the key is absent.
        return bool(self.config.get("tie_word_embeddings", True))

    def weight_files(self) -> list[Path]:
        files = [self.path / s for s in self.shards]
        if self.sharded:
            files.append(self.path / INDEX_NAME)
        return files

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (memory-mapped; only this tensor is materialised)."""
        info = self.tensors[name]
        with safe_open(str(self.path / info.shard), framework="pt") as f:
            return f.get_tensor(name)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> str:
        """A short identity of the architecture: model type and every tensor's name, shape and dtype."""
        h = hashlib.sha256(self.model_type.encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}:{t.shape}:{t.dtype}".encode())
        return h.hexdigest()[:16]


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Validate a checkpoint folder and index its tensors, without reading any weights."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise SurgeryError(f"{path} is not a folder: give the checkpoint folder, not a file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{path} is not a checkpoint folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(f"{config_path} is not valid JSON: {e}")
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SurgeryError(f"{config_path} has no model_type: cannot tell the architecture")

    index_path = path / INDEX_NAME
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SurgeryError(f"{index_path.name} is corrupt: {e}")
        shards = sorted(set(weight_map.values()))
        sharded = True
    elif (path / SINGLE_NAME).is_file():
        weight_map = None
        shards = [SINGLE_NAME]
        sharded = False
    elif pickles:
        if not allow_pickle:
            raise SurgeryError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); loading them can run arbitrary code. "
                "Convert to safetensors, or pass --allow-pickle if you trust the file"
            )
        return _open_pickle_checkpoint(path, config, pickles)
    else:
        raise SurgeryError(f"{path} has no weights: expected {SINGLE_NAME} or {INDEX_NAME}")

    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        shard_path = path / shard
        if not shard_path.is_file():
            raise SurgeryError(f"shard {shard} listed in {INDEX_NAME} is missing from {path}")
        header = read_shard_header(shard_path)
        metadata[shard] = header.metadata
        tensors.update(header.tensors)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SurgeryError(f"{INDEX_NAME} lists {len(missing)} tensors not found in any shard, e.g. {missing[0]}")
        for name, shard in weight_map.items():
            if tensors[name].shard != shard:
                raise SurgeryError(f"{INDEX_NAME} puts {name} in {shard}, but it is in {tensors[name].shard}")
    return Checkpoint(path, config, tensors, shards, sharded, metadata, pickles)


def _open_pickle_checkpoint(path: Path, config: dict, pickles: list[str]) -> Checkpoint:
    """Opted-in pickle weights: loaded once (weights_only) and served from memory."""
    state: dict[str, torch.Tensor] = {}
    for name in pickles:
        try:
            state.update(torch.load(path / name, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise SurgeryError(f"cannot read pickle weights {name}: {e}")
    ckpt = _PickleCheckpoint(path, config, {}, [], False, {}, pickles)
    ckpt.state = state
    ckpt.tensors = {
        k: TensorInfo(k, pickles[0], v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in state.items()
    }
    return ckpt


class _PickleCheckpoint(Checkpoint):
    state: dict[str, torch.Tensor]

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]

    def weight_files(self) -> list[Path]:
        return [self.path / p for p in self.pickle_files]
