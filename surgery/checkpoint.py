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

from .arch import Family, family_of
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
# Codes whose torch dtype exists only in newer torch releases.
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)
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
    """Parse and validate a safetensors header before any library reads the file.

    A truncated or corrupt file, an entry of the wrong type, a dtype whose size disagrees with its
    byte range, overlapping or gapped data offsets, or bytes after the last tensor raise SurgeryError.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SurgeryError(f"corrupt shard {path.name}: file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or 8 + header_len > size or header_len > 100_000_000:
            raise SurgeryError(f"corrupt shard {path.name}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise SurgeryError(
                f"corrupt shard {path.name}: header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
            )
    if not isinstance(header, dict):
        raise SurgeryError(f"corrupt shard {path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeryError(f"corrupt shard {path.name}: __metadata__ must be an object of strings")
    tensors = {name: _tensor_entry(path, name, entry) for name, entry in header.items()}
    _check_data_layout(path, tensors, size - 8 - header_len)
    return ShardHeader(path.name, tensors, dict(metadata))


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object hook: a name given twice would silently keep only its last entry."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"'{key}' appears twice")
        out[key] = value
    return out


def _tensor_entry(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SurgeryError(f"corrupt shard {path.name}: header entry for tensor '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise SurgeryError(f"corrupt shard {path.name}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise SurgeryError(f"corrupt shard {path.name}: tensor '{name}' has shape {shape!r}, not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise SurgeryError(f"corrupt shard {path.name}: tensor '{name}' has data_offsets {offsets!r}, not [start, end]")
    info = TensorInfo(name, path.name, SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    if info.nbytes != info.numel * _itemsize(info.dtype):
        raise SurgeryError(
            f"corrupt shard {path.name}: tensor '{name}' is {dtype}{list(shape)} ({info.numel * _itemsize(info.dtype)} bytes) "
            f"but its data_offsets span {info.nbytes} bytes"
        )
    return info


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_data_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """The tensors must tile the data section exactly: no overlap, no gap, nothing after the last one."""
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise SurgeryError(f"corrupt shard {path.name}: tensors '{before.name}' and '{after.name}' overlap")
    end = 0
    for info in ordered:
        if info.start > end:
            raise SurgeryError(
                f"corrupt shard {path.name}: {info.start - end} unclaimed bytes before tensor '{info.name}'"
            )
        end = info.end
    if end > data_size:
        raise SurgeryError(f"truncated shard {path.name}: header needs {end} data bytes, file holds {data_size}")
    if end < data_size:
        raise SurgeryError(f"corrupt shard {path.name}: {data_size - end} bytes after the last tensor's data")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Floating-point dtypes (the only ones that can hold NaN or Inf).
FLOAT_DTYPES = frozenset(d for d in SAFETENSORS_DTYPES.values() if d.is_floating_point)
_CHECK_BYTES = 1 << 26  # bytes read at a time by the finiteness check (64 MiB)
_FINITE_FILES: set[tuple[str, int, int]] = set()  # (file, size, mtime): weight files already found finite


def refuse_nonfinite(ckpt: "Checkpoint", role: str = "") -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor and its file (--allow-nonfinite lets them through).

    One streamed pass over the floating-point tensors, in file order, at most 64 MiB read at a time, before any work;
    a file already found finite (same path, size and modification time) is not read again. A base with an adapter
    merged in is checked as its two parts; pickle weights (already in memory) are checked there.
    """
    parts = [ckpt.base, ckpt.adapter] if getattr(ckpt, "adapter", None) is not None else [ckpt]
    for part in parts:
        state = getattr(part, "state", None)
        if state is not None:
            for name, tensor in state.items():
                if tensor.dtype in FLOAT_DTYPES:
                    _refuse_if_bad(name, part.path / part.pickle_files[0], [tensor], role)
            continue
        for shard in part.shards:
            _check_file(part.path / shard, [t for t in part.tensors.values() if t.shard == shard], role)


def _check_file(path: Path, tensors: list[TensorInfo], role: str) -> None:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _FINITE_FILES:
        return
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        start = 8 + header_len
        for info in sorted(tensors, key=lambda t: t.start):
            if info.dtype in FLOAT_DTYPES and info.nbytes:
                _refuse_if_bad(info.name, path, _chunks(f, start + info.start, info.nbytes, info.dtype), role)
    _FINITE_FILES.add(key)


def _chunks(f, offset: int, nbytes: int, dtype: torch.dtype):
    """One tensor's values, read from an open file in pieces of at most _CHECK_BYTES (whole elements)."""
    size = _itemsize(dtype)
    step = max(size, _CHECK_BYTES // size * size)
    f.seek(offset)
    for done in range(0, nbytes, step):
        raw = bytearray(f.read(min(step, nbytes - done)))
        yield torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


def _refuse_if_bad(name: str, path: Path, chunks, role: str) -> None:
    nan = inf = total = 0
    for chunk in chunks:
        if chunk.dtype.itemsize == 1:  # float8: few reductions are implemented for it
            chunk = chunk.float()
        total += chunk.numel()
        # A NaN or Inf anywhere makes the sum non-finite (cheaper than an elementwise test); a non-finite sum may also
        # be an overflow of large finite values, so only the exact count below decides.
        if nan or inf or not bool(chunk.sum(dtype=torch.float32 if chunk.dtype != torch.float64 else None).isfinite()):
            nan += int(chunk.isnan().sum())
            inf += int(chunk.isinf().sum())
    if nan or inf:
        what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        raise SurgeryError(
            f"{role + ': ' if role else ''}tensor {name} in {path} holds {what} (of {total} values): bad "
            "weights are refused before any work; pass --allow-nonfinite to use them anyway"
        )


@dataclass
class Checkpoint:
    """A validated checkpoint folder: config, tensor index, and lazy reads of single tensors."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    shards: list[str]
    sharded: bool
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    pickle_files: list[str] = field(default_factory=list)  # where the weights come from when they are pickles

    @property
    def is_pickle(self) -> bool:
        return bool(self.pickle_files)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def family(self) -> Family:
        """Which tensors are the decoder blocks, residual writers, gates and embedding (surgery/arch.py)."""
        return family_of(self.model_type, self.tensors)

    @property
    def tied_embeddings(self) -> bool:
        # transformers' default for tie_word_embeddings is True when the key is absent.
        return bool(self.config.get("tie_word_embeddings", True))

    def weight_files(self) -> list[Path]:
        files = [self.path / s for s in self.shards]
        if self.sharded:
            files.append(self.path / INDEX_NAME)
        return files

    def source_files(self) -> list[Path]:
        """Every file the checkpoint's weights come from (with an adapter: the base's and the adapter's)."""
        return self.weight_files()

    def parameter_name(self, name: str) -> str:
        """The model parameter a stored tensor is loaded into (an adapter's tensors sit elsewhere in a PeftModel)."""
        return name

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (memory-mapped; only this tensor is materialised)."""
        info = self.tensors[name]
        with safe_open(str(self.path / info.shard), framework="pt") as f:
            return f.get_tensor(name)

    def fingerprint(self) -> str:
        """A short identity of the architecture: model type and every tensor's name, shape and dtype."""
        h = hashlib.sha256(self.model_type.encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}:{t.shape}:{t.dtype}".encode())
        return h.hexdigest()[:16]


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Validate a checkpoint folder and index its tensors, without reading any weights.

    Safetensors are preferred: a pickle file beside them is ignored and never opened. A folder with
    pickle weights only needs `allow_pickle`, and even then they are read with torch's weights-only
    unpickler.
    """
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise SurgeryError(f"{path} is not a folder: give the checkpoint folder, not a file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{path} is not a checkpoint folder: config.json is missing")
    config = _read_json(config_path)
    if not isinstance(config, dict) or not config.get("model_type") or not isinstance(config["model_type"], str):
        raise SurgeryError(f"{config_path} has no model_type: cannot tell the architecture")

    index_path = path / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_weight_map(index_path)
        shards = sorted(set(weight_map.values()))
        sharded = True
    elif (path / SINGLE_NAME).is_file():
        weight_map = None
        shards = [SINGLE_NAME]
        sharded = False
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if not pickles:
            raise SurgeryError(f"{path} has no weights: expected {SINGLE_NAME} or {INDEX_NAME}")
        if not allow_pickle:
            raise SurgeryError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); loading them can run arbitrary code. "
                "Convert to safetensors, or pass --allow-pickle if you trust the file"
            )
        return _open_pickle_checkpoint(path, config, pickles)

    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        shard_path = path / shard
        if not shard_path.is_file():
            raise SurgeryError(f"shard {shard} listed in {INDEX_NAME} is missing from {path}")
        header = read_shard_header(shard_path)
        metadata[shard] = header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                raise SurgeryError(
                    f"tensor {name} is in both {tensors[name].shard} and {shard}: which one counts is ambiguous"
                )
            tensors[name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SurgeryError(f"{INDEX_NAME} lists {len(missing)} tensors not found in any shard, e.g. {missing[0]}")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise SurgeryError(
                f"shard {tensors[unlisted[0]].shard} holds {len(unlisted)} tensors that {INDEX_NAME} "
                f"does not list, e.g. {unlisted[0]}"
            )
        for name, shard in weight_map.items():
            if tensors[name].shard != shard:
                raise SurgeryError(f"{INDEX_NAME} puts {name} in {shard}, but it is in {tensors[name].shard}")
    return Checkpoint(path, config, tensors, shards, sharded, metadata)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise SurgeryError(f"{path} is not valid JSON: {e}")


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor -> shard map; every shard a plain .safetensors file name inside the folder."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SurgeryError(
            f"{index_path.name} is corrupt: weight_map must be an object mapping tensor names to shard files"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise SurgeryError(
                f"{index_path.name} is corrupt: weight_map gives {name} the shard {shard!r}, not a file name"
            )
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise SurgeryError(
                f"{index_path.name} is corrupt: shard {shard!r} of {name} is not a .safetensors file in the folder"
            )
    return weight_map


def _open_pickle_checkpoint(path: Path, config: dict, pickles: list[str]) -> Checkpoint:
    """Opted-in pickle weights: loaded once (weights only) and served from memory."""
    state: dict[str, torch.Tensor] = {}
    for name in pickles:
        loaded = _load_weights_only(path / name)
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise SurgeryError(f"pickle weights {path / name} are not a plain mapping of tensor names to tensors")
        for key in loaded:
            if key in state:
                raise SurgeryError(
                    f"tensor {key} is in more than one pickle file of {path}: which one counts is ambiguous"
                )
        state.update(loaded)
    ckpt = _PickleCheckpoint(path, config, {}, [], False, {}, pickles)
    ckpt.state = state
    ckpt.tensors = {
        k: TensorInfo(k, pickles[0], v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in state.items()
    }
    return ckpt


def _load_weights_only(file: Path):
    """torch's weights-only unpickler: it refuses anything but tensors and plain containers, and runs no code."""
    import pickle
    import re
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch explains in a paragraph; the one fact that matters is the object it would have had to create.
            named = re.search(r"GLOBAL (\S+)", str(e))
            if named:
                raise SurgeryError(
                    f"refused pickle weights {file}: they would create {named.group(1)}, which is not a "
                    "tensor and could run code (nothing was run)"
                ) from None
            detail = re.search(r"WeightsUnpickler error: *\n*([^\n]+)", str(e))
            raise SurgeryError(
                f"cannot read pickle weights {file}: not a weights file torch can read"
                + (f" ({detail.group(1).strip()})" if detail else "")
            ) from None
        except Exception as e:  # noqa: BLE001 - any other failure to unpickle is a bad file for the user
            raise SurgeryError(f"cannot read pickle weights {file}: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error from a library (torch and transformers write paragraphs), for a one-line message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


class _PickleCheckpoint(Checkpoint):
    state: dict[str, torch.Tensor]

    def read(self, name: str) -> torch.Tensor:
        return self.state[name].clone()  # a copy: an edit that works in place must not change later reads

    def weight_files(self) -> list[Path]:
        return [self.path / p for p in self.pickle_files]
