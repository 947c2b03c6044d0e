"""A tried and rejected variant of Safe Delta: admit the fine-tune's entries in an order that weighs the task beside
safety, to see whether the SST-2 dev bar of issue 23 could be met on lab/fair6 (docs/results_fair_lab.md, "Why the
SST-2 dev bar is missed").

Safe Delta admits whole input columns in the order of their safety sensitivity s_j = 1/d_j² (d_j² the diagonal of
the inverse safety Hessian as the OBS pass sees it), and never admits the last PROTECT share. Here the order key is
s_j / t_j^POWER, with t_j the same quantity from the FINE-TUNED model's inputs on the fine-tune's task (the built-in
sentiment set's train part, prompt -> label word): columns that cost safety little for what they carry of the task
are kept first, and the protected share is the columns most expensive for safety relative to the task. Everything
else (cost, budget, compensation) is `surgery safe-delta` unchanged; the one-block case only (SmolLM2-135M: every
input width is at most 2048 columns).

    python experiments/task_order_safe_delta.py lab/fair6/models/attacked POWER [surgery safe-delta options]
    e.g. ... lab/fair6/models/attacked 1 --reference lab/fair6/models/aligned --budget 100 --protect 0.3 -o OUT

then `python experiments/eval_model.py OUT --pair lab/fair6/models`. It patches the module's functions in this process
only; the installed command is not changed.
"""

from __future__ import annotations

import sys

import torch

import surgery.methods.safe_delta as sd
from surgery.checkpoint import open_checkpoint
from surgery.methods.regmean import sentiment_examples
from surgery.model import load_model, load_tokenizer

TUNED, POWER = sys.argv[1], float(sys.argv[2])
_calibration, _factor, _admitted, _tensor = (
    sd.calibration_hessians,
    sd.inverse_factor,
    sd.admitted_entries,
    sd.safe_delta_tensor,
)
TASK_H: dict[int, torch.Tensor] = {}  # id of a safety H -> the task H of the same modules
TASK_S: dict[int, torch.Tensor] = {}  # id of a safety factor U -> t = 1/d² of the task factor
CURRENT: list = [None]


def calibration_hessians(ctx, options, modules):
    hessians, figures = _calibration(ctx, options, modules)
    model, tok = load_model(open_checkpoint(TUNED), torch.device("cpu")), load_tokenizer(TUNED)
    task, _ = sd.input_hessians(model, tok, sentiment_examples(), options, modules)
    for m in modules:
        TASK_H[id(hessians[m])] = task[m]
    return hessians, figures


def inverse_factor(hessian, damp=0.01, dtype=torch.float32):
    factor = _factor(hessian, damp, dtype)
    if id(hessian) in TASK_H:
        TASK_S[id(factor)] = 1.0 / torch.diagonal(_factor(TASK_H[id(hessian)], damp, dtype)).float() ** 2
    return factor


def admitted_entries(cost, inverse_sq, limit, protect):
    task = CURRENT[0]
    if task is None or task.numel() != inverse_sq.numel():
        return _admitted(cost, inverse_sq, limit, protect)
    return _admitted(cost, inverse_sq / task**POWER, limit, protect)


def safe_delta_tensor(aligned, tuned, factor, *args, **kwargs):
    CURRENT[0] = TASK_S.get(id(factor))
    try:
        return _tensor(aligned, tuned, factor, *args, **kwargs)
    finally:
        CURRENT[0] = None


if __name__ == "__main__":
    sd.calibration_hessians, sd.inverse_factor = calibration_hessians, inverse_factor
    sd.admitted_entries, sd.safe_delta_tensor = admitted_entries, safe_delta_tensor
    from cli.main import main

    sys.argv = ["surgery", "safe-delta", TUNED, *sys.argv[3:]]
    main()
