"""Tried on lab/fair6 before `surgery regmean` existed (docs/results_fair_lab.md, "RegMean"): Safe Delta's output
recalibrated toward the fine-tune on the fine-tune's task inputs, to see whether the SST-2 dev bar of issue 23 could
be met. Two rules, chosen by the environment, applied to every Linear weight after `surgery safe-delta` computes it:

    MODE=columns (IRR's recalibration step, closed form): the columns Safe Delta admitted wholly (A) are solved so
        the layer's output on the task inputs stays the fine-tune's, the other columns (N) held at Safe Delta's
        values: W_A = W_ft,A - MIX · (W_N - W_ft,N) H_NA H_AA⁻¹   (H the task Gram, damped by TDAMP · mean diag)
    MODE=regmean: W = (W_ft Ĝ_t + MU · W_sd Ĝ_s)(Ĝ_t + MU · Ĝ_s)⁻¹, Ĝ the task Gram and Safe Delta's safety Hessian,
        each damped and scaled to a mean diagonal of 1 (at --budget 0, W_sd is the aligned model: this is
        `surgery regmean --alpha MU/(1+MU)`)

The task Gram is the fine-tuned model's inputs on the built-in sentiment set's train part (prompt -> label word).

    MODE=regmean MU=8 python experiments/recalibrate_safe_delta.py lab/fair6/models/attacked \\
        --reference lab/fair6/models/aligned --budget 1.359 -o OUT

then `python experiments/eval_model.py OUT --pair lab/fair6/models`. It patches the module's functions in this process
only; the installed command is not changed.
"""

from __future__ import annotations

import os
import sys

import torch

import surgery.methods.safe_delta as sd
from surgery.checkpoint import open_checkpoint
from surgery.methods.regmean import normalised, sentiment_examples
from surgery.model import load_model, load_tokenizer

TUNED = sys.argv[1]
MODE = os.environ.get("MODE", "columns")
MIX = float(os.environ.get("MIX", "1.0"))
MU = float(os.environ.get("MU", "1.0"))
DAMP = float(os.environ.get("TDAMP", "0.01"))
_calibration, _factor, _tensor = sd.calibration_hessians, sd.inverse_factor, sd.safe_delta_tensor
TASK: dict[int, torch.Tensor] = {}  # id of a safety H -> the task Gram of the same modules
BY_FACTOR: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id of a safety factor U -> (task Gram, safety H)


def calibration_hessians(ctx, options, modules):
    hessians, figures = _calibration(ctx, options, modules)
    model, tok = load_model(open_checkpoint(TUNED), torch.device("cpu")), load_tokenizer(TUNED)
    task, _ = sd.input_hessians(model, tok, sentiment_examples(), options, modules)
    for m in modules:
        TASK[id(hessians[m])] = task[m]
    return hessians, figures


def inverse_factor(hessian, damp=0.01, dtype=torch.float32):
    factor = _factor(hessian, damp, dtype)
    if id(hessian) in TASK:
        BY_FACTOR[id(factor)] = (TASK[id(hessian)], hessian)
    return factor


def safe_delta_tensor(aligned, tuned, factor, *args, **kwargs):
    new, admitted = _tensor(aligned, tuned, factor, *args, **kwargs)
    if id(factor) not in BY_FACTOR:
        return new, admitted
    task, safety = BY_FACTOR[id(factor)]
    ht, ft, w = normalised(task, DAMP), tuned.double(), new.double()
    if MODE == "regmean":
        hs = normalised(safety, DAMP)
        return ((ft @ ht + MU * w @ hs) @ torch.linalg.inv(ht + MU * hs)).to(new.dtype), admitted
    a = admitted.all(0)
    if not a.any() or a.all():
        return new, admitted
    n = ~a
    shift = torch.linalg.solve(ht[a][:, a], ((w[:, n] - ft[:, n]) @ ht[n][:, a]).T).T
    w[:, a] = ft[:, a] - MIX * shift
    return w.to(new.dtype), admitted


if __name__ == "__main__":
    sd.calibration_hessians, sd.inverse_factor, sd.safe_delta_tensor = (
        calibration_hessians,
        inverse_factor,
        safe_delta_tensor,
    )
    from cli.main import main

    sys.argv = ["surgery", "safe-delta", TUNED, *sys.argv[2:]]
    main()
