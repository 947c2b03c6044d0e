"""`surgery regmean`: the fine-tune and the reference merged on their own inputs' Grams (what it prints)."""

from __future__ import annotations

from ..build import show_written
from ..console import out


def show_plan(plan, options) -> None:
    out.print(
        f"dry run: nothing is written; {len(plan.modules)} Linear weights would be merged at alpha {plan.alpha:g} on "
        "the Gram of the fine-tuned model's task inputs and of the aligned model's safety inputs, and the other "
        f"{len(plan.others)} floating tensors interpolated where they differ ({plan.entries:,} entries in all); the "
        "Grams come from forward passes of both models: run without --dry-run to see the counts",
        highlight=False,
        markup=False,
    )


def show(result, options) -> None:
    r = result.report
    c = r.calibration
    data = (
        f"; {r.groups} input groups, task Grams from {c['task_examples']} examples / {c['task_tokens']:,} tokens "
        f"({c['task_source']}), safety Grams from {c['safety_calibration_examples']} examples / "
        f"{c['safety_calibration_tokens']:,} tokens ({c['safety_responses']} responses)"
        if c
        else ""
    )
    same = f", {len(r.unchanged)} equal to the reference left as they are" if r.unchanged else ""
    out.print(
        f"merged {len(r.merged)} Linear weights and interpolated {len(r.interpolated)} other tensors at alpha "
        f"{r.alpha:g} ({r.entries:,} entries{same}){data}",
        highlight=False,
        markup=False,
    )
    show_written(result)
