"""What the gate rows of an edit see: their activity on two input sets (Model Surgery's Fig. 2) and mean gate inputs.

The probe edit adds alpha·(w_l·h) to the pre-activation of every selected gate_proj row of layer l, on
every token. It works as the paper says (Wang et al. 2024, §3.3 and Fig. 2) when that opens the selected
neurons (SiLU input > 0) on undesired inputs and leaves them alone on the rest. `gate_activity` counts,
by forward hooks on the selected gate_proj modules, how many (token, selected neuron) pairs are active
and the mean of w_l·h per layer; `GateCheck` compares the counts before and after the edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .prompts import pad_batches

OFFSET_RATIO = (
    1.0  # warn when |mean w·h| on generic text exceeds this many class gaps: both classes then lie on one side
)


@dataclass
class GateStats:
    """Counts over one input set in one state of the model."""

    active: int = 0  # (pooled token, selected neuron) pairs with gate pre-activation > 0
    pairs: int = 0
    active_all: int = 0  # the same over every token the model reads (the chat template included)
    pairs_all: int = 0
    projection: dict[int, list[float]] = field(
        default_factory=dict
    )  # layer -> [sum w_l·h pooled, tokens, sum all, tokens]

    @property
    def share(self) -> float:
        return self.active / self.pairs if self.pairs else 0.0

    @property
    def share_all(self) -> float:
        return self.active_all / self.pairs_all if self.pairs_all else 0.0

    def mean_projection(self, layer: int, every_token: bool = False) -> float:
        s, n, s_all, n_all = self.projection[layer]
        return s_all / max(n_all, 1) if every_token else s / max(n, 1)


def _module(model, tensor: str):
    return model.get_submodule(tensor.removesuffix(".weight"))


@torch.no_grad()
def gate_activity(
    model,
    sequences: list[list[int]],
    masks: list[list[int]],
    rows: dict[str, list[int]],
    directions: dict[str, torch.Tensor],
    layer_of: dict[str, int],
    batch_size: int = 8,
    pad_id: int = 0,
) -> GateStats:
    """Active (token, row) pairs of the selected gate rows and mean w_l·h per layer, over `masks`' tokens and all tokens.

    rows: gate tensor -> selected rows (its output features); directions: tensor -> the vector the edit adds to them
    (w or w_l).
    """
    stats = GateStats(projection={layer_of[t]: [0.0, 0, 0.0, 0] for t in rows})
    current: dict[str, torch.Tensor] = {}

    def hook(tensor: str):
        index = torch.tensor(rows[tensor], dtype=torch.long)
        direction = directions[tensor].float()

        def count(module, args, output):
            pooled, real = current["pooled"], current["real"]
            opened = output[..., index.to(output.device)] > 0  # [batch, seq, rows]
            stats.active += int((opened & pooled[..., None]).sum())
            stats.active_all += int((opened & real[..., None]).sum())
            stats.pairs += int(pooled.sum()) * len(index)
            stats.pairs_all += int(real.sum()) * len(index)
            proj = args[0].float() @ direction.to(args[0].device)  # [batch, seq]
            acc = stats.projection[layer_of[tensor]]
            acc[0] += float(proj[pooled].sum())
            acc[1] += int(pooled.sum())
            acc[2] += float(proj[real].sum())
            acc[3] += int(real.sum())

        return count

    handles = [_module(model, t).register_forward_hook(hook(t)) for t in rows]
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # no vocabulary-sized logits
    try:
        for (ids, mask), (chosen, _) in zip(
            pad_batches(sequences, batch_size, pad_id), pad_batches(masks, batch_size, 0)
        ):
            current["real"], current["pooled"] = mask.bool().to(device), chosen.bool().to(device)
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def mean_gate_inputs(
    model, sequences: list[list[int]], tensors: list[str], batch_size: int = 8, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """tensor -> the mean input of that gate (the MLP's normalised residual input) over every real token, fp32."""
    sums: dict[str, torch.Tensor] = {}
    counts = {"tokens": 0}
    current: dict[str, torch.Tensor] = {}

    def hook(tensor: str):
        def add(module, args):
            h = args[0].float()[current["real"]]  # [tokens, hidden]
            sums[tensor] = sums.get(tensor, 0) + h.sum(0).cpu()

        return add

    handles = [_module(model, t).register_forward_pre_hook(hook(t)) for t in tensors]
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    try:
        for ids, mask in pad_batches(sequences, batch_size, pad_id):
            current["real"] = mask.bool().to(device)
            counts["tokens"] += int(mask.sum())
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {t: s / max(counts["tokens"], 1) for t, s in sums.items()}


def centred(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """w_l = w - (w·mu_l / ||mu_l||²) mu_l: no component along the layer's mean gate input (beyond the paper)."""
    w, mu = w.float(), mu.float()
    norm2 = float(mu @ mu)
    return w - (float(w @ mu) / norm2) * mu if norm2 > 0 else w.clone()


@dataclass
class GateCheck:
    """Fig. 2 of the paper for this edit: selected gates active on undesired vs desired inputs, before and after."""

    alpha: float
    pool: (
        str  # the tokens counted (as the probe pooled them; `content` when it read responses and the inputs have none)
    )
    inputs: dict[str, str]  # "undesired"/"desired" -> where the inputs came from
    prompts: dict[str, int]
    rows_per_layer: dict[int, int]
    before: dict[str, GateStats]
    after: dict[str, GateStats] = field(default_factory=dict)

    def change(self, kind: str) -> float:
        return self.after[kind].share - self.before[kind].share if kind in self.after else 0.0

    def offset_and_gap(self) -> tuple[float, float]:
        """Row-weighted |mean w_l·h| on generic text (the desired inputs, every token) and mean class gap w_l·h
        (undesired - desired, pooled tokens), both before the edit."""
        total = sum(self.rows_per_layer.values()) or 1
        u, d = self.before["undesired"], self.before["desired"]
        offset = (
            sum(n * abs(d.mean_projection(layer, every_token=True)) for layer, n in self.rows_per_layer.items()) / total
        )
        gap = (
            sum(n * (u.mean_projection(layer) - d.mean_projection(layer)) for layer, n in self.rows_per_layer.items())
            / total
        )
        return offset, gap

    def warning(self) -> str | None:
        problems = []
        if self.after and self.alpha != 0:
            du, dd = self.change("undesired"), self.change("desired")
            verb, worse = ("opens", du <= dd) if self.alpha > 0 else ("closes", du >= dd)
            if worse:
                problems.append(
                    f"the edit {verb} fewer gates on undesired inputs ({100 * du:+.1f} pts) than on desired "
                    f"ones ({100 * dd:+.1f} pts): the mechanism of the paper (Fig. 2) is off"
                )
        offset, gap = self.offset_and_gap()
        if offset > OFFSET_RATIO * abs(gap):
            problems.append(
                f"|w·h| on generic text ({offset:.3g}) exceeds the class gap ({gap:+.3g}): the edit moves "
                "every input's gates the same way"
            )
        return "; ".join(problems) or None

    def to_json(self) -> dict:
        offset, gap = self.offset_and_gap()

        def shares(s: GateStats) -> dict:
            return {
                "active_share": s.share,
                "active_share_every_token": s.share_all,
                "pairs": s.pairs,
                "pairs_every_token": s.pairs_all,
            }

        return {
            "alpha": self.alpha,
            "pool": self.pool,
            "inputs": self.inputs,
            "prompts": self.prompts,
            "before": {k: shares(v) for k, v in self.before.items()},
            "after": {k: shares(v) for k, v in self.after.items()},
            "change_points": {k: 100 * self.change(k) for k in self.before},
            "generic_offset": offset,
            "class_gap": gap,
            "offset_ratio_threshold": OFFSET_RATIO,
            "mean_projection": {
                str(layer): {
                    k: {"pooled": s.mean_projection(layer), "every_token": s.mean_projection(layer, True)}
                    for k, s in self.before.items()
                }
                for layer in self.rows_per_layer
            },
            "warning": self.warning(),
        }
