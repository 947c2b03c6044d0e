"""Probe-direction editing (Wang et al. 2024, "Model Surgery", arXiv 2407.08770), no gradient training.

Selection (§3.2): cosine between the undesired-class probe row w and every row of every layer's MLP gate
(mlp.gate_proj; the gate half of a fused mlp.gate_up_proj, surgery/arch.py); the K rows with the most negative
cosine, ranked globally over all layers.
Edit (§3.3): gate_proj[i] += alpha * w for the selected rows, in fp32, cast back to the stored dtype.
Rows that point away from the undesired direction are those whose gate closes on it; pushing them
towards w (alpha > 0) opens them on exactly those inputs, changing what the MLP writes there.

Whether it does is measured, not assumed: the gate check (surgery/gates.py, the paper's Fig. 2) counts
the selected gates open on held-out undesired and desired inputs before and after the edit.
Beyond the paper, --centre removes from w, per layer, its component along the layer's mean gate input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import describe, gate_projections
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import SurgeryError
from ..options import option
from .base import Edit, Method, Prepared, Strength
from .common import MethodOptions

PAPER_FRACTION = 16384 / 352256  # 4.65 %: the paper's 16,384 of Llama-2-7B's 32 x 11,008 gate rows


@dataclass
class EditOptions(MethodOptions):
    probe: str | None = option(
        None, "Probe folder from `surgery probe-train` (same architecture, final layer).", folder=True, required=True
    )
    alpha: float | str = option(
        1.08,
        "gate_proj[i] += ALPHA * w (paper: 1.08 detox, 1 jailbreak, with its W[1], about half "
        "a logistic probe's w: the edit prints the paper-equivalent alpha); negative "
        "reverses; auto: the strongest inside the utility budget.",
        strength=True,
    )
    count: int | None = option(None, "Rows to edit (K), ranked globally.", non_negative=True)
    fraction: float | None = option(
        None, "Share of all gate rows to edit (default: the paper's 4.65%).", low=0.0, high=1.0
    )
    gate_check: bool = option(
        True,
        "Measure the share of selected gates open (SiLU input > 0) on held-out undesired "
        "and desired inputs before and after the edit (the paper's Fig. 2; loads the model); "
        "printed and stored in surgery.json, with a warning when the mechanism is off.",
        flag="--gate-check/--no-gate-check",
    )
    check_positive: str | None = option(
        None,
        "Undesired inputs for the gate check (default: the built-in harmful "
        "requests' selection part). With --dry-run, naming either check file "
        "runs the check (it loads the model).",
        file=True,
    )
    check_negative: str | None = option(
        None, "Desired inputs for the gate check (default: the built-in harmless requests' selection part).", file=True
    )
    centre: bool = option(
        False,
        "Beyond the paper: add w_l = w - (w·mu_l/||mu_l||^2) mu_l to layer l's rows, mu_l its "
        "mean gate input on built-in harmless text, so the edit adds nothing on average there.",
        flag="--centre",
    )

    def validate(self) -> None:
        super().validate()
        if self.count is not None and self.fraction is not None:
            raise SurgeryError("give --count or --fraction, not both")

    def rows(self, total: int) -> int:
        if self.count is not None:
            return self.count
        return int(round((self.fraction if self.fraction is not None else PAPER_FRACTION) * total))


@dataclass
class EditPlan:
    rows: dict[str, list[int]]  # gate tensor -> selected row indices of that tensor (ascending)
    cosines: dict[str, list[float]]  # the same rows' cosines with w
    total_rows: int
    requested: int
    layer_of: dict[str, int] = field(default_factory=dict)
    probe_norm: float = 0.0  # ||w||: alpha is in these units (the probe row is not normalised)
    mean_row_norm: float = 0.0  # mean norm of the selected rows
    paper_alpha_per_alpha: float = 2.0  # surgery.probes.artifact.Probe.paper_alpha_per_alpha
    probe_meta: Any = None  # surgery.probes.artifact.ProbeMeta
    gate_check: Any = None  # surgery.gates.GateCheck, when measured
    centred_norms: dict[int, float] = field(default_factory=dict)  # --centre: layer -> ||w_l||

    def relative_step(self, alpha: float) -> float:
        """How far the edit moves each selected row, as a share of the rows' mean norm: |alpha|·||w|| / mean ||row||."""
        return abs(alpha) * self.probe_norm / self.mean_row_norm if self.mean_row_norm else 0.0

    def paper_alpha(self, alpha: float) -> float:
        """The paper's alpha for the same move along the same classifier (its W[1] is about half a logistic w)."""
        return alpha * self.paper_alpha_per_alpha

    @property
    def selected(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def per_layer(self) -> dict[int, int]:
        return {self.layer_of[t]: len(r) for t, r in sorted(self.rows.items(), key=lambda kv: self.layer_of[kv[0]])}


@dataclass
class EditReport:
    output: Path | None
    plan: EditPlan
    alpha: float
    probe: str


def gate_tensors(ckpt: Checkpoint) -> dict[str, int]:
    """Every decoder layer's gate weight tensor and its layer index, named as the model's family names it."""
    family = ckpt.family
    if family.gate is None:
        raise SurgeryError(f"{ckpt.path}: probe editing edits an MLP gate, and {describe(family)} has no gated MLP")
    found = gate_projections(ckpt.tensors, family)
    if not found:
        raise SurgeryError(
            f"{ckpt.path} has no MLP gate weights ({family.gate.module} in each {family.block_list}.N block, as "
            f"{describe(family)} names them): probe editing edits their rows"
        )
    return found


def row_cosines(weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cos(W_i, w) for every row i, in fp32 (zero rows get cosine 0)."""
    weight = weight.float()
    return (weight @ w) / (weight.norm(dim=1) * w.norm()).clamp(min=1e-12)


def select_rows(cosines: dict[str, torch.Tensor], k: int) -> dict[str, list[int]]:
    """The k most negative cosines over all tensors (ties: earlier tensor, then lower row); never a row with cos >= 0."""
    names = list(cosines)
    values = torch.cat([cosines[n] for n in names])
    owner = torch.cat([torch.full((cosines[n].numel(),), i) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(cosines[n].numel()) for n in names])
    order = torch.sort(
        values, stable=True
    ).indices  # ascending: most negative first, stable keeps name/row order on ties
    order = order[values[order] < 0][:k]
    chosen: dict[str, list[int]] = {n: [] for n in names}
    for i in order.tolist():
        chosen[names[int(owner[i])]].append(int(local[i]))
    return {n: sorted(r) for n, r in chosen.items() if r}


def load_checked_probe(ckpt: Checkpoint, probe_dir: str | Path, gates: dict[str, int]):
    from ..probes.artifact import load_probe

    probe = load_probe(probe_dir, ckpt)
    width = ckpt.tensors[next(iter(gates))].shape[1]
    if probe.meta.hidden_size != width:
        raise SurgeryError(
            f"probe {probe_dir} reads {probe.meta.hidden_size}-wide hidden states, but the MLP gate reads the "
            f"{width}-wide residual stream: train the probe on the final layer of this model"
        )
    return probe


def plan_edit(model_dir: str | Path, probe_dir: str | Path, options: EditOptions) -> tuple[EditPlan, torch.Tensor]:
    """Which gate rows the edit touches (reads only the gate tensors); also returns w in fp32."""
    options.validate()
    return plan_rows(open_checkpoint(model_dir, options.allow_pickle), probe_dir, options)


def plan_rows(ckpt: Checkpoint, probe_dir: str | Path, options: EditOptions) -> tuple[EditPlan, torch.Tensor]:
    gates = gate_tensors(ckpt)
    spans = {t: ckpt.family.gate.span(ckpt.tensors[t].shape[0]) for t in gates}  # a fused tensor's gate rows
    probe = load_checked_probe(ckpt, probe_dir, gates)
    w = probe.direction.float()
    if not torch.isfinite(w).all() or w.norm() == 0:
        raise SurgeryError(f"probe {probe_dir} has a zero or non-finite undesired-class row")
    total = sum(len(span) for span in spans.values())
    k = options.rows(total)
    if k > total:
        raise SurgeryError(f"--count {k} is more than the model's {total:,} gate rows")
    cosines, norms = {}, []
    if k:
        for t, span in spans.items():
            cosines[t] = row_cosines(ckpt.read(t)[span.start : span.stop], w)
    local = select_rows(cosines, k) if k else {}  # indices into each tensor's gate rows
    rows = {t: [spans[t].start + i for i in r] for t, r in local.items()}
    for t, r in rows.items():
        norms.append(ckpt.read(t)[torch.tensor(r)].float().norm(dim=1))
    picked = {t: cosines[t][r].tolist() for t, r in local.items()}
    mean_norm = float(torch.cat(norms).mean()) if norms else 0.0
    return EditPlan(
        rows,
        picked,
        total,
        k,
        gates,
        probe_norm=float(w.norm()),
        mean_row_norm=mean_norm,
        paper_alpha_per_alpha=probe.paper_alpha_per_alpha,
        probe_meta=probe.meta,
    ), w


def edit_rows(weight: torch.Tensor, rows: list[int], w: torch.Tensor, alpha: float) -> torch.Tensor:
    """gate_proj[i] += alpha * w for i in rows (fp32 arithmetic, the stored dtype back); the input is untouched."""
    new = weight.clone()
    idx = torch.tensor(rows, dtype=torch.long)
    new[idx] = (weight[idx].float() + alpha * w).to(weight.dtype)
    return new


CHECK_SAMPLES = 64  # gate check inputs per set read from a file (a seeded subset; the built-in parts have 48)
CENTRE_SAMPLES = 64  # built-in harmless calibration prompts whose mean gate input centres w (--centre)
CHECK_MAX_LENGTH = 256  # tokens per input, as probe-train's default


def encode_for_probe(tokenizer, examples, meta, pool: str | None = None):
    """(ids, pool masks, pool) of `examples` read as the probe read its data: with its chat setting and its tokens,
    except that inputs without responses are read as content when the probe pooled responses."""
    from ..probes.collect import default_pool, encode_examples

    pool = pool or meta.pool
    if pool == "response" and any(ex.response is None for ex in examples):
        pool = default_pool(meta.chat, examples)
    ids, masks = encode_examples(tokenizer, examples, meta.chat, pool, CHECK_MAX_LENGTH)
    return ids, masks, pool


class PreparedEdit(Prepared):
    def __init__(self, plan: EditPlan, w: torch.Tensor, options: EditOptions, ctx=None):
        self.plan, self.w, self.options, self.ctx = plan, w, options, ctx
        self.directions = {
            t: w for t in plan.rows
        }  # tensor -> what its selected rows move along (w, or w_l with --centre)
        self.report = EditReport(None, plan, options.alpha, str(options.probe))
        self.check_inputs: dict[str, tuple] = {}  # "undesired"/"desired" -> (ids, masks)

    def centre(self) -> None:
        """--centre: w_l = w - (w·mu_l/||mu_l||²) mu_l, mu_l layer l's mean gate input on built-in harmless text."""
        from ..gates import centred, mean_gate_inputs
        from ..splits import CALIBRATION, examples_for

        ctx, meta = self.ctx, self.plan.probe_meta
        examples = examples_for(None, builtin="harmless", part=CALIBRATION, max_samples=CENTRE_SAMPLES)
        ids, _, _ = encode_for_probe(ctx.tokenizer(), examples, meta, pool="all")
        ctx.progress(f"mean gate inputs on {len(examples)} harmless prompts (--centre)")
        mu = mean_gate_inputs(ctx.model(), ids, list(self.plan.rows), pad_id=ctx.tokenizer().pad_token_id)
        self.directions = {t: centred(self.w, mu[t]) for t in self.plan.rows}
        self.plan.centred_norms = {self.plan.layer_of[t]: float(d.norm()) for t, d in self.directions.items()}

    def measure_before(self) -> None:
        """The gate check's inputs, and the selected gates' activity on them in the unedited model."""
        from ..gates import GateCheck
        from ..splits import SELECTION, examples_for

        ctx, meta, o = self.ctx, self.plan.probe_meta, self.options
        tok, pools, sources, prompts = ctx.tokenizer(), [], {}, {}
        for kind, path, builtin in (
            ("undesired", o.check_positive, "harmful"),
            ("desired", o.check_negative, "harmless"),
        ):
            examples = examples_for(path, builtin=builtin, part=SELECTION, max_samples=CHECK_SAMPLES)
            ids, masks, pool = encode_for_probe(tok, examples, meta)
            self.check_inputs[kind] = (ids, masks)
            pools.append(pool)
            sources[kind] = str(path) if path else f"built-in {builtin} requests, selection part"
            prompts[kind] = len(examples)
        ctx.progress(f"gate check on {sum(prompts.values())} held-out prompts")
        before = {kind: self.activity(kind) for kind in self.check_inputs}
        self.plan.gate_check = GateCheck(
            self.options.alpha if isinstance(self.options.alpha, float) else 0.0,
            "/".join(dict.fromkeys(pools)),
            sources,
            prompts,
            self.plan.per_layer(),
            before,
        )

    def activity(self, kind: str):
        from ..gates import gate_activity

        ids, masks = self.check_inputs[kind]
        return gate_activity(
            self.ctx.model(),
            ids,
            masks,
            self.plan.rows,
            self.directions,
            self.plan.layer_of,
            pad_id=self.ctx.tokenizer().pad_token_id,
        )

    def bounds(self) -> tuple[float, float] | None:
        """--alpha auto searches relative steps |alpha|·||w|| / mean row norm from 0.05 to 2 (see docs/probes.md)."""
        if not self.plan.selected or not self.plan.probe_norm:
            return None
        unit = self.plan.mean_row_norm / self.plan.probe_norm
        return 0.05 * unit, 2.0 * unit

    def at(self, alpha: float) -> Edit:
        plan, directions = self.plan, self.directions
        self.report.alpha = alpha

        def edit(name: str, weight: torch.Tensor) -> torch.Tensor:
            if name not in plan.rows or alpha == 0:
                return weight
            return edit_rows(weight, plan.rows[name], directions[name], alpha)

        summary = {
            "rows_selected": plan.selected,
            "rows_requested": plan.requested,
            "gate_rows_total": plan.total_rows,
            "rows_per_layer": {str(k): v for k, v in plan.per_layer().items()},
            "probe_norm": plan.probe_norm,
            "mean_selected_row_norm": plan.mean_row_norm,
            "relative_step": plan.relative_step(alpha),
            "paper_equivalent_alpha": plan.paper_alpha(alpha),
            "probe_classifier": plan.probe_meta.classifier,
            "probe_pool": plan.probe_meta.pool,
            "max_cosine_selected": max((max(c) for c in plan.cosines.values()), default=None),
        }
        if self.options.centre:
            summary["centred_direction_norms"] = {str(k): v for k, v in sorted(plan.centred_norms.items())}

        def report() -> dict:  # read once, after finish: the gate check's after-edit figures join it then
            check = plan.gate_check
            return summary if check is None else {**summary, "gate_check": check.to_json()}

        return Edit(
            edit, touched=list(plan.rows), summary=report, arguments={"probe": str(Path(self.options.probe).resolve())}
        )

    def finish(self, edit: Edit) -> None:
        """The gate check after the edit: the same inputs through the model as the edit leaves it (then undone)."""
        check = self.plan.gate_check
        if check is None:
            return
        from ..search import applied

        check.alpha = self.report.alpha
        if check.alpha == 0:
            check.after = dict(check.before)  # nothing moves
        else:

            def after():
                with applied(self.ctx.model(), self.ctx.target, edit):
                    check.after = {kind: self.activity(kind) for kind in self.check_inputs}

            self.ctx.progress("gate check after the edit")
            self.ctx.timed("gate_check", after)


class ProbeEdit(Method):
    name = "edit"
    manifest_id = "probe-edit"
    summary = "Model Surgery: move the gate rows most opposed to a probe's undesired direction along it."
    paper = "Wang et al. 2024, Model Surgery, arXiv 2407.08770"
    Options = EditOptions
    strength = Strength("alpha", low=0.05, high=2.0, log=True)

    def repair_candidates(self, given):
        if given.probe is None:
            return []
        return [
            (
                "edit",
                EditOptions(
                    probe=given.probe,
                    alpha="auto",
                    device=given.device,
                    allow_pickle=given.allow_pickle,
                    adapter=given.adapter,
                ),
            )
        ]

    def validate(self, options: EditOptions) -> None:
        options.validate()
        if options.probe is None:
            raise SurgeryError("--probe is required: a probe folder from `surgery probe-train`")

    def plan(self, ctx, options: EditOptions) -> EditPlan:
        """Headers only, unless a check file is named: then the gate check too (it loads the model, see docs/probes.md)."""
        if options.gate_check and (options.check_positive or options.check_negative):
            prepared = self.prepare(ctx, options)
            prepared.finish(prepared.at(options.alpha))
            ctx.release_model()
            return prepared.plan
        return plan_rows(ctx.ckpt, options.probe, options)[0]

    def prepare(self, ctx, options: EditOptions) -> PreparedEdit:
        plan, w = plan_rows(ctx.ckpt, options.probe, options)
        prepared = PreparedEdit(plan, w, options, ctx)
        if plan.selected and options.centre:
            ctx.timed("centre", prepared.centre)
        if plan.selected and options.gate_check:
            ctx.timed("gate_check", prepared.measure_before)
        return prepared


def edit_checkpoint(
    model_dir: str | Path, probe_dir: str | Path, output: str | Path, options: EditOptions, force: bool = False
) -> EditReport:
    """Write the probe-edited checkpoint; alpha 0 or K 0 writes a bit-identical copy of the weights (no check)."""
    from .base import RunOptions, run_repair

    options.probe = str(probe_dir)
    result = run_repair(ProbeEdit(), model_dir, output, options, RunOptions(force=force, check=False))
    result.report.output = Path(output)
    return result.report
