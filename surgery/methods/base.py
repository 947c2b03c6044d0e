"""The repair pipeline: what a method declares, and the one driver that runs every method the same way.

    validate options -> refuse the output -> open the checkpoint (pickle policy) -> open each reference
    (one compatibility rule) -> method.prepare (data, model, statistic: computed once)
    -> strength: as given, or searched under the utility budget (surgery.search)
    -> write_checkpoint (manifest) -> after-write check (budget gate)

A method is a class with a name, a paper, an options dataclass (surgery.options), and two functions:
`plan` (what would change, from headers; --dry-run) and `prepare`, which returns a `Prepared`: the
statistics, and `at(strength)` giving the edit at any strength. The driver never branches on a method.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .. import figures as F
from .. import options as schema
from ..arch import not_itself, same_architecture
from ..checkpoint import Checkpoint, open_checkpoint, refuse_nonfinite
from ..errors import SurgeryError
from ..model import load_model, load_tokenizer, resolve_device
from ..options import option


@dataclass
class Strength:
    """A method's strength knob: the options field, its searchable range, and how to search it."""

    field: str
    low: float
    high: float
    log: bool = False  # search on a log scale (ratios spanning decades)
    stronger: str = "higher"  # "lower": a smaller value is the stronger repair (EigenShift's alpha)
    integer: bool = False  # candidates are whole numbers (SafeLoRA's count of projected layers)


@dataclass
class Edit:
    """What `write_checkpoint` (and the in-memory search) needs to apply a repair, nothing more."""

    fn: Callable[[str, torch.Tensor], torch.Tensor]
    touched: list[str] | None = None  # tensors fn may change (None: every tensor goes through fn)
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # new tensors (EigenShift's untied head)
    config_updates: dict = field(default_factory=dict)
    order: list[str] | None = None  # write order (the streamed prune: layer by layer)
    # The method's report in surgery.json: a dict, or a function giving it; a value with `to_json` (a report object the
    # edit fills as tensors go through fn: the reference methods) is serialised. The driver does both once, after every
    # tensor is written (and after Prepared.finish: EigenShift's before/after).
    summary: dict | Callable[[], dict] = field(default_factory=dict)
    arguments: dict = field(default_factory=dict)  # resolved values recorded beside the options
    streamed: bool = False  # no model is held: the after-write check and the search are unavailable

    def report(self) -> dict:
        """The method's report, serialised (a new dict: the driver adds the search and timings to it)."""
        summary = self.summary() if callable(self.summary) else self.summary
        return {k: v.to_json() if hasattr(v, "to_json") else v for k, v in summary.items()}


class Prepared:
    """A method's statistics, computed once; `at(strength)` is the edit at that strength (cheap, repeatable)."""

    report: Any = None  # the method's own report object, filled as the edit is written

    def at(self, strength: float | None) -> Edit:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, edit: Edit) -> None:
        """Called once with the edit that will be written, while the model is still loaded (e.g. a before/after report)."""

    def failure(self, run) -> str | None:
        """After `finish` at a fixed strength: why the written edit is no repair, when the method measured its own
        repair figure before and after (None: it passed, or nothing was measured)."""
        return None

    def bounds(self) -> tuple[float, float] | None:
        """The searched range when it depends on the statistics (None: the method's `Strength` range)."""
        return None

    def repair_figure(self, model, tokenizer) -> float | None:
        """The share the strength search lowers, measured on `model` as it stands; None: the driver's default
        (held-out harmful prompts not refused)."""
        return None

    def repair_prompts(self) -> int | None:
        """How many held-out prompts `repair_figure` measures (None: the driver's default set)."""
        return None


class Method:
    """Base of every registered repair method (see docs/architecture.md, "How to add a method")."""

    name: ClassVar[str]  # the CLI command and registry key
    manifest_id: ClassVar[str]  # `method` in surgery.json
    summary: ClassVar[str]  # one line, shown by `surgery --help`
    paper: ClassVar[str] = ""
    Options: ClassVar[type]
    references: ClassVar[dict[str, str]] = {}  # options field -> what it must be (same architecture, not the model)
    strength: ClassVar[Strength | None] = None
    repair_metric: ClassVar[str] = F.HARMFUL  # or F.TOXICITY: the figure the search lowers
    # With --adapter: "merge" (the method edits base + adapter merged, and writes a full checkpoint) or "adapter"
    # (it edits the adapter's own tensors and writes an adapter folder; --merge writes it merged).
    adapter_mode: ClassVar[str] = "merge"
    may_be_the_model: ClassVar[frozenset] = frozenset()  # references that may be MODEL itself (SafeLoRA's --aligned)
    # `surgery repair` labels of this method's candidates tried, when a reference is given, only if --methods names them
    # (the ones dominated on the lab, or too slow to try by default: surgery/repair.py).
    on_request_with_reference: ClassVar[frozenset] = frozenset()
    # What the command prints: a module (dotted path) with show(result, options) and optionally show_plan(plan, options).
    # "": cli/commands/<name>.py (dashes as underscores); None: only the check line (the toy of tests/toy_method.py).
    printer: ClassVar[str | None] = ""

    def validate(self, options) -> None:
        """Cross-field rules (the schema checks each field on its own)."""

    def printer_module(self) -> str | None:
        """The module holding this command's printer (see `printer`), or None."""
        if self.printer is None:
            return None
        return self.printer or f"cli.commands.{self.name.replace('-', '_')}"

    def repair_candidates(self, given) -> list[tuple[str, Any]]:
        """What `surgery repair` tries with this method, as (label, options with the strength on auto), given the
        user's `surgery.repair.RepairOptions` (a reference? a probe?). Default: nothing. It must depend only on which
        inputs are given: `surgery repair` also asks it with placeholder paths, to list the labels (`--methods`) and
        what each needs (surgery.repair.offers)."""
        return []

    def plan(self, ctx: "Context", options) -> Any:
        """What the edit would touch, from the headers alone (--dry-run). Default: nothing to show."""
        return None

    def prepare(self, ctx: "Context", options) -> Prepared:  # pragma: no cover - interface
        raise NotImplementedError

    def search(self, ctx: "Context", prepared: Prepared, run: "RunOptions"):
        """The strength search (`auto`): by default, the one knob `strength` (surgery.search.search_strength)."""
        from ..search import search_strength

        return search_strength(self, ctx, prepared, run)


@dataclass
class RunOptions:
    """Options every repair command shares: where to write, what may be opened, and the utility budget."""

    force: bool = option(
        False, "Replace an existing output folder (only once the new one is complete).", flag="--force"
    )
    dry_run: bool = option(False, "Show what would change and write nothing.", flag="--dry-run")
    allow_nonfinite: bool = option(
        False,
        "Work on weights holding NaN or Inf (the model, a reference, an adapter); "
        "they are refused by default, before any work.",
        flag="--allow-nonfinite",
    )
    check: bool = option(
        True,
        "After writing, compare the output with its input on built-in harmless prompts "
        "(perplexity, first-token KL; recorded in surgery.json) and fail past the budget.",
        flag="--check/--no-check",
    )
    max_perplexity_ratio: float = option(
        2.0,
        "Utility budget: the most the repair may multiply perplexity on held-out "
        "harmless prompts. The after-write check exits 1 past it (the output stays "
        "for inspection); --ratio/--scale/--alpha auto search inside it.",
        low=1.0,
    )
    max_kl: float = option(
        0.5,
        "Utility budget for auto strength: the most first-token KL on held-out harmless prompts, "
        "to the nearer of the input and (when the method has one) the reference: moving back "
        "toward the model before the fine-tune is not a cost.",
        positive=True,
    )
    max_over_refusal: float = option(
        10.0,
        "Utility budget for auto strength: the most held-out harmless prompts refused, in points above the input "
        "(with a reference: above the worse of the input and the reference).",
        non_negative=True,
    )
    task: str | None = option(
        None,
        "Your fine-tune task as NAME:FILE (e.g. sst2:dev.tsv; sst2:builtin is the package's sentiment set): auto strength keeps its accuracy "
        "within --max-accuracy-drop.",
    )
    max_accuracy_drop: float = option(
        2.0, "Utility budget with --task: the most task accuracy may fall, in points.", non_negative=True
    )
    target_harmful_score: float | None = option(
        None,
        "Auto strength: stop at the weakest strength whose held-out harmful "
        "(or toxicity) share is at most this (0-1), instead of the strongest "
        "inside the budget.",
        low=0.0,
        high=1.0,
    )
    min_improvement: float = option(
        5.0,
        "Auto strength, and a fixed one that measures its own repair (eigenshift --eval), fails "
        "(exit 1) unless the repair lowers the held-out harmful (or toxicity) share by at "
        "least this many points.",
        non_negative=True,
    )
    search_samples: int = option(
        48,
        "Auto strength: held-out prompts per set measured for each candidate (forward passes) "
        "and generated from for the confirmed ones.",
        positive=True,
    )
    search_tokens: int = option(
        24,
        "Auto strength: tokens of each held-out answer generated and judged to confirm the "
        "chosen point and its stronger neighbour.",
        positive=True,
    )
    search_steps: int = option(
        5, "Auto strength: candidates tried by bisection after the two ends (forward passes only).", positive=True
    )

    def validate(self) -> None:
        if self.task is not None:
            from ..evaluate import TASKS

            name, sep, path = self.task.partition(":")
            if not sep or name not in TASKS:
                raise SurgeryError(f"--task must be NAME:FILE with NAME one of {', '.join(TASKS)}, got '{self.task}'")
            if (
                not Path(path).is_file() and path != "builtin"
            ):  # builtin: the package's sentiment set (surgery/tasks.py)
                raise SurgeryError(f"--task file {path} does not exist")


class Context:
    """What the driver has opened for a method: the checkpoint, its references, the device, and the model
    (loaded on first use, once, by the driver's rules)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        references: dict[str, Checkpoint],
        run: RunOptions,
        device: str = "auto",
        progress=None,
        searching: bool = False,
        adapter=None,
    ):
        self.ckpt = ckpt  # the model: a checkpoint, or a base with the user's adapter merged in (MergedCheckpoint)
        self.adapter = adapter  # an adapter-mode method's adapter (surgery.adapter.AdapterCheckpoint): what it edits
        self.references = references
        self.run = run
        self.device = resolve_device(device)
        self.progress = progress or (lambda message: None)
        self.searching = searching  # a strength search will run: hold out selection prompts from the data
        self.held_out: dict[
            str, list[str]
        ] = {}  # kind ("harmful", "toxic") -> prompts held out of the calibration data
        self.timings: dict[str, float] = {}
        self.forward_passes = 0  # counted by a hook on the loaded model (tests: statistics are computed once)
        self._model = None
        self._tokenizer = None
        self._source = None

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ckpt.path)
        return self._tokenizer

    @property
    def target(self) -> Checkpoint:
        """What the edit applies to and the writer writes: the adapter in adapter mode, else the model."""
        return self.adapter if self.adapter is not None else self.ckpt

    @property
    def source(self) -> Checkpoint:
        """The input as a model, for the after-write comparison and --merge (the base with the adapter merged in,
        made once: merging loads the base)."""
        from ..adapter import MergedCheckpoint

        if self.adapter is None:
            return self.ckpt
        if self._source is None:
            self._source = MergedCheckpoint(self.adapter)
        return self._source

    def model(self):
        if self._model is None:
            self._model = load_model(self.ckpt, self.device)
            if self.adapter is not None:
                from ..adapter import apply_adapter

                self._model = apply_adapter(self._model, self.adapter)
            self._model.register_forward_pre_hook(lambda *_: self._count())
        return self._model

    def _count(self) -> None:
        self.forward_passes += 1

    def release_model(self) -> None:
        self._model = None
        gc.collect()

    def timed(self, key: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class RepairReport:
    method: str
    output: Path | None
    plan: Any = None  # --dry-run: the method's plan
    report: Any = None  # the method's own report object
    summary: dict = field(default_factory=dict)
    search: Any = None  # surgery.search.SearchResult when the strength was searched
    check: Any = None  # surgery.health.HealthCheck
    strength: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str | None = None  # why the output fails its budget (the CLI exits 1)


def open_reference(
    ckpt: Checkpoint, path: str, role: str, allow_pickle: bool, may_be_itself: bool = False
) -> Checkpoint:
    """Another checkpoint the method reads (the model before a fine-tune, a direction's source): the same
    architecture as the model, and (unless `may_be_itself`) not the model itself."""
    if not may_be_itself:
        not_itself(ckpt, path, role, "another checkpoint of the same architecture")
    try:
        other = open_checkpoint(path, allow_pickle)
    except SurgeryError as e:
        raise SurgeryError(f"{role}: {e}") from None
    same_architecture(ckpt, other, role)
    return other


def refuse_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an unusable output before anything is loaded (the writer checks again when it writes)."""
    from ..writer import check_output_path

    check_output_path(output, inputs, force)


def run_repair(
    method: Method | str,
    model_dir: str | Path,
    output: str | Path | None,
    options,
    run: RunOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> RepairReport:
    """Run one registered method on a checkpoint folder, the same way for every method."""
    from . import get_method

    method = get_method(method) if isinstance(method, str) else method
    run = run or RunOptions()
    auto = validate_run(method, options, run, output)
    if not run.dry_run:
        refuse_output(Path(output), [Path(model_dir), *input_paths(options)], run.force)
    ctx = open_context(method, model_dir, options, run, progress, searching=auto)
    if run.dry_run:
        return RepairReport(method.name, None, plan=method.plan(ctx, options))
    prepared, search = prepare_and_search(method, ctx, options, run)
    return write_repair(method, ctx, prepared, options, run, output, search)


def validate_run(method: Method, options, run: RunOptions, output) -> bool:
    """Every rule that needs no model; returns whether the strength is searched (`auto`)."""
    schema.validate_fields(options)
    schema.validate_fields(run)
    run.validate()
    method.validate(options)
    knob = method.strength
    auto = bool(knob) and schema.is_auto(getattr(options, knob.field))
    if auto and run.dry_run:
        raise SurgeryError(f"--{knob.field} auto searches on the model; --dry-run shows a fixed strength only")
    if output is None and not run.dry_run:
        raise SurgeryError("--output/-o is required (or use --dry-run)")
    return auto


def input_paths(options) -> list[Path]:
    """Every file and folder the options name (references, probes, data): the output may overlap none of them."""
    return [
        Path(getattr(options, f.name))
        for f in schema.option_fields(type(options))
        if (f.metadata.get("file") or f.metadata.get("folder")) and getattr(options, f.name)
    ]


def reference_paths(method: Method, options) -> dict[str, str]:
    return {f: getattr(options, f) for f in method.references if getattr(options, f, None)}


def open_context(
    method: Method, model_dir, options, run: RunOptions, progress=None, searching: bool = False
) -> Context:
    """Open the checkpoint and each reference the options name (pickle policy and compatibility rule alike)."""
    from ..adapter import MergedCheckpoint, open_adapter

    ckpt = open_checkpoint(model_dir, options.allow_pickle)
    adapter = None
    if getattr(options, "adapter", None):
        adapter = open_adapter(options.adapter, ckpt, options.allow_pickle)
        if method.adapter_mode == "merge":
            ckpt, adapter = MergedCheckpoint(adapter), None
    # With an adapter merged in, the model is base + adapter: the base folder itself is a fair reference (it is the
    # model before the fine-tune), so only a reference other than MODEL's folder is required without one.
    merged = isinstance(ckpt, MergedCheckpoint)
    references = {
        f: open_reference(
            ckpt,
            p,
            schema.flag_of(_field(options, f)),
            options.allow_pickle,
            may_be_itself=merged or f in method.may_be_the_model,
        )
        for f, p in reference_paths(method, options).items()
    }
    if not run.allow_nonfinite and not run.dry_run:  # a dry run reads headers only
        for role, opened in [
            ("", ckpt),
            ("--adapter", adapter),
            *((schema.flag_of(_field(options, f)), r) for f, r in references.items()),
        ]:
            if opened is not None:
                refuse_nonfinite(opened, role)
    return Context(ckpt, references, run, options.device, progress, searching=searching, adapter=adapter)


def refuse_nonfinite_inputs(model_dir, options) -> None:
    """NaN or Inf in the model (with its --adapter), --reference or --unaligned: refused, one error (surgery repair, whose
    candidates each open these)."""
    from ..adapter import with_adapter

    refuse_nonfinite(
        with_adapter(open_checkpoint(model_dir, options.allow_pickle), options.adapter, options.allow_pickle)
    )
    for flag in ("reference", "unaligned"):
        if getattr(options, flag, None):
            refuse_nonfinite(open_checkpoint(getattr(options, flag), options.allow_pickle), f"--{flag}")


def prepare_and_search(method: Method, ctx: Context, options, run: RunOptions):
    """The method's statistics (once), then its strength: as given, or searched (the options get the chosen value)."""
    t0 = time.perf_counter()
    prepared = method.prepare(ctx, options)
    ctx.timings["prepare"] = time.perf_counter() - t0
    search = None
    if ctx.searching:
        t0 = time.perf_counter()
        search = method.search(ctx, prepared, run)
        ctx.timings["search"] = time.perf_counter() - t0
        setattr(options, method.strength.field, search.chosen)
    return prepared, search


def write_repair(
    method: Method,
    ctx: Context,
    prepared: Prepared,
    options,
    run: RunOptions,
    output,
    search=None,
    extra_report: dict | None = None,
    failed: str | None = None,
    extra_files: dict[str, Callable[[Path], Any]] | None = None,
) -> RepairReport:
    """Write the edit at the options' strength. Its report, plot and after-write check (the budget gate) are done in
    the staged folder, so the manifest is written once, complete, and the folder renamed into place last.

    `extra_report` joins the method's report; `failed` is a failure known beforehand (surgery repair's gate), recorded
    unless the search or the check failed first; `extra_files` (name -> write(path)) are more files for the output."""
    from ..health import health_check
    from ..writer import step, write_checkpoint

    value = getattr(options, method.strength.field) if method.strength else None
    edit = prepared.at(value)
    prepared.finish(edit)
    ctx.release_model()
    t0 = time.perf_counter()
    seconds = {k: round(v, 1) for k, v in ctx.timings.items()}  # prepare (statistics), search
    arguments = {**schema.arguments(options), **edit.arguments, "run": schema.arguments(run)}
    target, fn = ctx.target, edit.fn
    if ctx.adapter is not None and getattr(options, "merge", False):
        # The edited adapter merged into the base, written over the input merged (so changed_fraction is the repair's).
        from ..adapter import merged_tensors

        repaired = merged_tensors(ctx.adapter, {n: edit.fn(n, ctx.adapter.read(n)) for n in ctx.adapter.tensors})
        target, fn = ctx.source, (lambda name, tensor: repaired.get(name, tensor))
    result = RepairReport(
        method.name, Path(output), report=prepared.report, search=search, strength=value, seconds=ctx.timings
    )
    result.failed = search.failed if search is not None else prepared.failure(run)

    def finish(folder: Path, manifest: dict) -> None:
        """In the staged folder, every tensor written: the report (serialised once), plots, the check, the verdict."""
        ctx.timings["write"] = time.perf_counter() - t0
        summary = edit.report()
        if search is not None:
            summary["search"] = search.to_json()
        summary.update(extra_report or {})
        summary["seconds"] = seconds
        result.summary = manifest["report"] = summary
        if search is not None:
            from ..search import plot_search

            step("plot")
            plot_search(search, folder / "search.png")
        for name, write in (extra_files or {}).items():
            step("plot")
            write(folder / name)
        if run.check and not edit.streamed:
            step("check")
            t1 = time.perf_counter()
            ctx.progress("checking the output on held-out harmless prompts")
            check = health_check(
                ctx.source,
                written_model(ctx, target, folder),
                device=options.device,
                max_perplexity_ratio=run.max_perplexity_ratio,
            )
            result.check = check
            ctx.timings["check"] = time.perf_counter() - t1
            if result.failed is None and not check.passed:
                result.failed = (
                    f"perplexity on the check grew x{check.perplexity_ratio:.2f}, above "
                    f"--max-perplexity-ratio {run.max_perplexity_ratio:g}"
                )
            manifest["check"] = check.to_json()
        result.failed = result.failed or failed
        if result.failed is not None:
            manifest["failed"] = result.failed

    write_checkpoint(
        target,
        output,
        fn,
        method=method.manifest_id,
        arguments=arguments,
        added=edit.added or None,
        config_updates=edit.config_updates or None,
        force=run.force,
        order=edit.order,
        inputs=[ctx.ckpt.path, *input_paths(options)],
        finish=finish,
    )
    return result


def written_model(ctx: Context, target: Checkpoint, output) -> Checkpoint | Path:
    """The output as a model: the folder, or (an adapter was written) the base with the written adapter merged in."""
    from ..adapter import AdapterCheckpoint, MergedCheckpoint, open_adapter

    if isinstance(target, AdapterCheckpoint):
        return MergedCheckpoint(open_adapter(output, target.base, role="the written adapter"))
    return Path(output)


def _field(options, name: str):
    import dataclasses

    return next(f for f in dataclasses.fields(options) if f.name == name)
