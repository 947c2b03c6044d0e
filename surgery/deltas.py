"""Differences between related checkpoints, one tensor at a time: the fine-tune delta, the safety vector,
their sign conflicts, DARE, and the checks that an aligned/unaligned pair can give a safety vector.

    Δ = W_ft - W_aligned            what the fine-tune changed
    V = W_aligned - W_unaligned     what alignment changed (the "safety vector")

Every difference is taken in fp32 from the stored tensors (any dtype), so a bf16 pair gives the same V
on every machine. Nothing here holds more than one tensor of each checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .arch import matches, same_architecture
from .checkpoint import Checkpoint
from .errors import SurgeryError
from .select import rows_to_remove, select_global


def same_values(aligned: torch.Tensor, unaligned: torch.Tensor) -> bool:
    """True when V is zero on this tensor: the two stored tensors hold the same numbers."""
    if aligned.dtype == unaligned.dtype:
        return torch.equal(aligned, unaligned)
    return torch.equal(aligned.float(), unaligned.float())


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b in fp32, a new tensor (the inputs are never modified: a pickle checkpoint serves its own tensors)."""
    return torch.sub(a.float(), b.float())


def sign_conflicts(delta: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries where Δ and V are both non-zero with opposite signs (IRR's "identify" step):
    the fine-tune moved the weight against the direction alignment had moved it."""
    return ((delta > 0) & (vector < 0)) | ((delta < 0) & (vector > 0))


def top_of(scores: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the k = n - int(n * (1 - fraction)) highest scores among the n candidate entries, with `select`'s count
    and tie rules (fp32 scores, NaN lowest, ties to the lower flat index); nothing outside `candidates` is chosen.
    fraction 1 chooses every candidate."""
    flat = candidates.reshape(-1)
    n = int(flat.sum())
    if rows_to_remove(n, fraction) == n:
        return candidates.clone()
    chosen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    # The candidates' scores, gathered in ascending flat order: select_global's lower-index tie rule is the original one.
    chosen[flat] = select_global(scores.reshape(-1)[flat], fraction)
    return chosen.view(candidates.shape)


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor's random draw, from the run's seed and the tensor's name: the same tensor gets the
    same draw whatever the order it is written in, and in every candidate of a strength search."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare(delta: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024, "drop and rescale"): each entry of an fp32 delta dropped with probability p, the kept
    ones multiplied by 1 / (1 - p), so the expected delta is unchanged. A new tensor; p = 0 returns `delta`."""
    if p == 0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) >= p
    return torch.where(keep, delta / (1.0 - p), torch.zeros((), dtype=delta.dtype))


def matching_tensors(names, patterns: list[str] | None) -> list[str]:
    """Tensor names chosen by shell globs, matched against the tensor name or its module's name (as `--targets` of
    the Linear methods matches module names, so one value works for both); every tensor when no pattern is given."""
    names = list(names)
    if not patterns:
        return names

    chosen = [n for n in names if matches(n, patterns) or matches(n.rpartition(".")[0], patterns)]
    if not chosen:
        raise SurgeryError(f"--targets {','.join(patterns)} matches no tensor (e.g. {names[0] if names else 'none'})")
    return chosen


def check_pair(ckpt: Checkpoint, aligned: Checkpoint, unaligned: Checkpoint, tensors: list[str]) -> None:
    """Refuse a pair that cannot give a safety vector on `tensors`: the two not the same architecture as each other
    (each was checked against the model when it was opened), or V = 0 on every one of them.

    V = 0 is found cheaply: the same folder is refused at once; otherwise the tensors are compared one by one and
    the check stops at the first that differs (the first tensor, for any real pair). Hashing the weight files first
    would read every byte of both even then, and on an equal pair it reads what the comparison reads."""
    same_architecture(aligned, unaligned, "--unaligned", tensors=sorted(ckpt.tensors), mine="--aligned")
    equal = f"--unaligned {unaligned.path} holds the same weights as --aligned {aligned.path}"
    if Path(aligned.path).resolve() == Path(unaligned.path).resolve():
        raise SurgeryError(
            f"{equal} (it is the same folder): V = W_aligned - W_unaligned is zero, nothing to add or revert"
        )
    for name in tensors:
        if not same_values(aligned.read(name), unaligned.read(name)):
            return
    where = "every tensor" if len(tensors) == len(ckpt.tensors) else f"every one of the {len(tensors)} target tensors"
    raise SurgeryError(
        f"{equal} on {where}: V = W_aligned - W_unaligned is zero, nothing to add or revert; give the "
        "model the aligned one was aligned from"
    )


def floating(ckpt: Checkpoint, names: list[str]) -> list[str]:
    """The floating-point tensors among `names` (integer buffers have no delta to take)."""
    return [n for n in names if ckpt.tensors[n].dtype.is_floating_point]


def pair_candidates(label: str, options_cls, knob: str, given) -> list[tuple[str, object]]:
    """`surgery repair`'s candidate for a safety-vector method: only with --reference (aligned) and --unaligned."""
    if given.reference is None or given.unaligned is None:
        return []
    return [
        (
            label,
            options_cls(
                **{knob: "auto"},
                aligned=given.reference,
                unaligned=given.unaligned,
                device=given.device,
                allow_pickle=given.allow_pickle,
                adapter=given.adapter,
            ),
        )
    ]
